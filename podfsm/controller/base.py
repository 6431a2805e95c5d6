"""What every part of the Controller shares: the sandboxes and their locks, record writes and
events, failpoints, pin paths and the checks of a pause process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import anyio
from anyio.abc import TaskGroup

from podfsm.config import ControllerConfig
from podfsm.controller.calls import CallGroup
from podfsm.core import failpoints as fp
from podfsm.core import sizes
from podfsm.core.errors import PodfsmError, SandboxRunError, StepFailed
from podfsm.core.ocispec import cgroup_parent_path
from podfsm.core.records import (
    HistoryEntry,
    LifecycleEvent,
    SandboxRecord,
    SandboxStatus,
    TransitionEvent,
)
from podfsm.core.requests import NetworkRequest
from podfsm.core.states import State, Trigger, lifecycle_kind
from podfsm.core.steps import Compensation
from podfsm.drivers import factory
from podfsm.drivers.base import HostDriver, NamespaceDriver, NetworkDriver, RuntimeDriver, Store
from podfsm.engine import SandboxMachine

log = logging.getLogger(__name__)

E = TypeVar("E")

#: how many past events a late subscriber can still ask for (events(since=...))
EVENT_BACKLOG = 1024
#: What a sandbox id looks like (secrets.token_hex(32)); only such names are collected as ours.
SANDBOX_ID = re.compile(r"^[0-9a-f]{64}$")


#: what _failpoints_around gives when no failpoint is set (stateless, so shared)
_NO_FAILPOINTS: AbstractAsyncContextManager[None] = contextlib.nullcontext()


def now() -> datetime:
    return datetime.now(UTC)


class FailpointError(StepFailed):
    """Raised by an `error` failpoint."""


@dataclass
class Sandbox:
    record: SandboxRecord
    machine: SandboxMachine
    lock: anyio.Lock = field(default_factory=lambda: anyio.Lock(fast_acquire=True))
    supervisor: anyio.CancelScope | None = None
    removed: bool = False
    #: the runtime's `create` of the pause is under way (it makes the cgroup parent)
    creating: bool = False
    #: transitions not yet published (see Controller._save)
    unpublished: list[HistoryEntry] = field(default_factory=list)
    #: what the sandbox takes of a list answer (podfsm.core.sizes.list_entry_bytes)
    list_bytes: int = 0


@dataclass
class Undo:
    step: Compensation
    action: Callable[[], Awaitable[None]]


class ControllerBase:
    """State and helpers shared by the run, teardown, recovery and API layers."""

    def __init__(
        self,
        config: ControllerConfig | None = None,
        *,
        namespaces: NamespaceDriver | None = None,
        network: NetworkDriver | None = None,
        runtime: RuntimeDriver | None = None,
        runtimes: Sequence[RuntimeDriver] | None = None,
        store: Store | None = None,
        host: HostDriver | None = None,
        failpoints: str | None = None,
    ) -> None:
        self.config = cfg = config or ControllerConfig()
        self._real = namespaces is None and network is None and runtime is None
        self._ns = namespaces or factory.namespaces(cfg)
        self._net = network or factory.network(cfg)
        #: the default runtime handler (cfg.runtime) and every installed one, by name; a
        #: sandbox keeps the name of its own (SandboxRecord.runtime) for its whole life
        self._rt = runtime or factory.runtime(cfg, cfg.runtime)
        self._runtimes: dict[str, RuntimeDriver] = {self._rt.name: self._rt}
        extra = runtimes if runtimes is not None else (
            factory.other_runtimes(cfg) if self._real else ())
        for rt in extra:
            self._runtimes.setdefault(rt.name, rt)
        # With fake drivers no pause ever runs: the files are written, no tmpfs is mounted.
        self._host = host or factory.host(mount_shm=self._real)
        self._store: Store | None = store
        spec = os.environ.get("PODFSM_FAILPOINTS", "") if failpoints is None else failpoints
        self._failpoints = fp.parse(spec)
        self._sandboxes: dict[str, Sandbox] = {}
        #: reserved name (name, namespace, uid, attempt) -> sandbox id
        self._names: dict[tuple[str, str, str, int], str] = {}
        # fast_acquire, here and on each sandbox's lock: a free token or lock is taken without
        # a trip through the event loop (a checkpoint per acquisition cost ~50 us of CPU, five
        # a lifecycle); every holder awaits I/O soon after, so nobody starves.
        self._limiter = anyio.Semaphore(cfg.max_parallel, fast_acquire=True)
        self._tg: TaskGroup | None = None
        self._exit_stack = contextlib.AsyncExitStack()
        #: run, stop and remove in flight, each in a task its caller cannot cancel natively
        self._calls = CallGroup("controller")
        self._subscribers: set[Subscriber[TransitionEvent]] = set()
        self._lifecycle_subscribers: set[Subscriber[LifecycleEvent]] = set()
        self._backlog: deque[TransitionEvent] = deque(maxlen=EVENT_BACKLOG)
        self._seq = 0
        self._tag = factory.controller_tag(cfg)
        self.recovery_problems: list[str] = []
        self._set_aside_ids: set[str] = set()
        self.recovering = False

    @property
    def runtime_handlers(self) -> list[str]:
        """The names of the installed runtime handlers, the default one first."""
        return list(self._runtimes)

    def user_namespaces_problem(self, handler: str) -> str | None:
        """None when handler `handler` runs user-namespaced pods' containers: podfsm idmaps
        their rootfs and volumes itself (runc 1.1 ignores OCI mount idmaps), so what it takes
        is the kernel's support, the same for runc and crun, which both join the pod's user
        namespace by path. Else why not (what the CRI Status reports as false)."""
        if handler not in self._runtimes:
            return f"runtime handler {handler!r} is not installed"
        return factory.user_namespaces_problem() if self._real else None

    def _runtime(self, name: str) -> RuntimeDriver:
        """The driver of runtime handler `name` (a sandbox's own, from its record)."""
        rt = self._runtimes.get(name)
        if rt is None:
            raise StepFailed("runtime", f"runtime handler {name!r} is not installed "
                                        f"(installed: {', '.join(self._runtimes)})")
        return rt

    @property
    def store(self) -> Store:
        assert self._store is not None, "use the Controller as an async context manager"
        return self._store

    def netns_pin_path(self, sandbox_id: str) -> str:
        return os.path.join(self.config.netns_dir, f"podfsm-{self._tag}-{sandbox_id[:16]}")

    @property
    def sandboxes_dir(self) -> str:
        """Where the sandboxes' run directories live."""
        return os.path.join(self.config.run_dir, "sandboxes")

    def sandbox_run_dir(self, sandbox_id: str) -> str:
        return os.path.join(self.sandboxes_dir, sandbox_id)

    def shm_path(self, sandbox_id: str) -> str:
        """Where the sandbox's /dev/shm tmpfs is mounted (see drivers.hostfiles)."""
        return os.path.join(self.sandbox_run_dir(sandbox_id), "shm")

    def cgroup_parent(self, rec: SandboxRecord) -> str:
        """The cgroup parent of the sandbox's pause: the pod's, else the configured root, as
        the runtime is given it and the teardown removes it (ocispec.cgroup_parent_path)."""
        return cgroup_parent_path(rec.config.linux.cgroup_parent, self.config.cgroup_root)

    def _others(self, sb: Sandbox) -> list[Sandbox]:
        """Every sandbox but `sb` (admitted, running or being removed)."""
        return [s for s in self._sandboxes.values() if s is not sb]

    def _log_directories_in_use(self, sb: Sandbox) -> tuple[list[str], list[str]]:
        """What the other sandboxes use of the host's directories for logs: their log
        directories and the directories podfsm made for them, symlinks resolved; and the log
        directories, as named, of those whose files are not made yet (or whose record, of an
        older podfsm, does not say how they resolved)."""
        resolved, named = [], []
        for s in self._others(sb):
            files = s.record.files
            if files is not None and files.log_directory_real:
                resolved += [files.log_directory_real, *files.log_directories_made]
            elif s.record.config.log_directory:
                named.append(s.record.config.log_directory)
        return resolved, named

    def userns_pin_path(self, sandbox_id: str) -> str:
        return os.path.join(self.sandbox_run_dir(sandbox_id), "userns")

    async def _save(self, sb: Sandbox, *triggers: Trigger, error: str | None = None,
                    persist: bool = True, **changes: Any) -> None:
        """Apply `changes`, fire `triggers` (in order) on the machine, write the record once,
        then publish one event per trigger (also when the write fails: the machine moved).
        persist=False skips the write where the next write (or the record's deletion) follows
        before anything else touches the system, so a crash in between changes nothing.

        A move back to Unknown (remove, or the last step of an unwinding) means the sandbox is
        about to disappear: its events are held until it is gone from status and list (see
        _forget), so whoever reacts to an event by asking for the status sees it gone."""
        events: list[HistoryEntry] = []
        entry_error = sizes.clip(error, sizes.MAX_ENTRY_ERROR)
        for trig in triggers:
            source = sb.machine.current
            dest = sb.machine.fire(trig)
            events.append(HistoryEntry(source=source.value, dest=dest.value,
                                       trigger=trig.value, at=now(), error=entry_error))
        if events:
            changes["state"] = sb.machine.current
            # the newest transitions only: a record's size stays bounded (core.sizes)
            changes["history"] = [*sb.record.history, *events][-sizes.MAX_HISTORY:]
        if "last_error" in changes:
            changes["last_error"] = sizes.clip(changes["last_error"], sizes.MAX_LAST_ERROR)
        if changes.get("leftovers"):
            changes["leftovers"] = [sizes.clip(x, sizes.MAX_ENTRY_ERROR) or "" for x in
                                    changes["leftovers"][:sizes.MAX_LEFTOVERS]]
        sb.record = sb.record.evolve(**changes)
        sb.unpublished.extend(events)
        try:
            if persist:
                await self._store_save(sb.record)
        finally:
            if sb.machine.current is not State.UNKNOWN:
                self._flush(sb)

    def _flush(self, sb: Sandbox) -> None:
        events, sb.unpublished = sb.unpublished, []
        for h in events:
            self._publish(sb.record.id, h)
        if self._lifecycle_subscribers:
            kinds = [(k, h.at) for h in events
                     if (k := lifecycle_kind(h.trigger, h.source, h.dest)) is not None]
            if kinds:
                status = SandboxStatus.from_record(sb.record)
                for kind, at in kinds:
                    ev = LifecycleEvent(kind=kind, at=at, status=status, config=sb.record.config)
                    for sub in list(self._lifecycle_subscribers):
                        sub.put(ev)

    async def _store_save(self, rec: SandboxRecord, durable: bool = False) -> None:
        if not durable:
            # A write that need not be durable completes without suspending (FileStore writes
            # in place, inline), so no cancellation can cut it short: no scope needed.
            await self.store.save(rec)
            return
        # Never abandoned halfway: a cancelled write would go on in its thread.
        with anyio.CancelScope(shield=True):
            await self.store.save(rec, durable=True)

    async def _save_or_log(self, sb: Sandbox, *triggers: Trigger, error: str | None = None,
                           **changes: Any) -> None:
        """_save for the unwinding: the change is kept in memory (and so reported) even when
        the record cannot be written."""
        try:
            await self._save(sb, *triggers, error=error, **changes)
        except PodfsmError as exc:
            log.error("sandbox %s: %s", sb.record.id, exc)

    def _publish(self, sandbox_id: str, h: HistoryEntry) -> None:
        self._seq += 1
        ev = TransitionEvent(seq=self._seq, sandbox_id=sandbox_id, source=h.source, dest=h.dest,
                             trigger=h.trigger, at=h.at, error=h.error)
        self._backlog.append(ev)
        for sub in list(self._subscribers):
            sub.put(ev)

    def _failpoints_around(self, step: str | None) -> AbstractAsyncContextManager[None]:
        """The `step.before` failpoint, the step, then `step.after` (not reached when the
        step raises). None: a step without failpoints."""
        if step is None or not self._failpoints:
            return _NO_FAILPOINTS  # the usual case: no generator made and run per step
        return self._failpoints_of(step)

    @contextlib.asynccontextmanager
    async def _failpoints_of(self, step: str) -> AsyncIterator[None]:
        await self._hit(f"{step}.before")
        yield
        await self._hit(f"{step}.after")

    async def _hit(self, name: str) -> None:
        point = self._failpoints.get(name)
        if point is None or not point.take():
            return
        if point.kind == "crash":
            log.warning("failpoint %s: crashing", name)
            os.kill(os.getpid(), signal.SIGKILL)
        elif point.kind == "delay":
            await anyio.sleep(point.delay_ms / 1000)
        else:
            raise FailpointError(name, "injected failure")

    def _task_driver(self, rec: SandboxRecord) -> RuntimeDriver:
        """The driver that checks and watches the pause process of `rec`: its own handler's,
        else the default one (these read the process, not the runtime's state, so any handler
        answers alike, also for a record whose handler is no longer installed)."""
        return self._runtimes.get(rec.runtime, self._rt)

    def _task_problem(self, rec: SandboxRecord) -> str | None:
        """None when the recorded pause process is alive, the same process (not a reuse of
        its pid), and in the pinned user and net namespaces; else what is wrong."""
        assert rec.task is not None
        return self._task_driver(rec).task_problem(rec.task, rec.namespaces)

    def _check_netns_owner(self, rec: SandboxRecord) -> None:
        """Refuse to let the runtime near a netns that the pod's user namespace does not own:
        crun would silently bind the host's /sys if mounting sysfs failed."""
        problem = self._ns.owner_problem(rec.namespaces) if rec.namespaces else None
        if problem is not None:
            raise StepFailed("verify namespaces", problem)

    def _net_request(self, rec: SandboxRecord) -> NetworkRequest:
        md = rec.config.metadata
        ns = rec.namespaces
        return NetworkRequest(
            sandbox_id=rec.id,
            netns_path=(ns.netns_path if ns else None) or rec.planned_netns_path,
            pod_name=md.name,
            pod_namespace=md.namespace,
            pod_uid=md.uid,
            port_mappings=tuple(rec.config.port_mappings),
        )


class Subscriber(Generic[E]):
    """One events() consumer: an unbounded-but-capped queue that never blocks the publisher."""

    _CAP = 10_000

    def __init__(self) -> None:
        send, recv = anyio.create_memory_object_stream[E | None](self._CAP)
        self._send = send
        self._recv = recv

    def put(self, ev: E) -> None:
        with contextlib.suppress(anyio.WouldBlock, anyio.BrokenResourceError,
                                 anyio.ClosedResourceError):
            self._send.send_nowait(ev)

    def close(self) -> None:
        with contextlib.suppress(anyio.WouldBlock, anyio.BrokenResourceError,
                                 anyio.ClosedResourceError):
            self._send.send_nowait(None)

    def dispose(self) -> None:
        self._send.close()
        self._recv.close()

    async def get(self) -> E | None:
        try:
            return await self._recv.receive()
        except anyio.EndOfStream:
            return None


def describe(exc: BaseException) -> str:
    if isinstance(exc, SandboxRunError):
        return describe(exc.cause)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, PodfsmError) else text
