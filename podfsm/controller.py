"""The Controller: runs each sandbox's state machine against the drivers.

Shape (after containerd's podsandbox controller): every forward step is followed at once by the
registration of its compensating step; a failure unwinds them LIFO, shielded from the caller's
cancellation and bounded by its own timeout, and the error says which step failed and what (if
anything) could not be undone. The record is written before each step that touches the system
(`pending` names it), so a restart knows what may be half done and can finish or unwind it.

Durability, in short (see _recover_one and _collect_orphans):
- a crash anywhere leaves every sandbox Ready (re-attached to supervision), NotReady (an
  interrupted run keeps what it made, its netns and address, until stop/remove, as containerd
  does), or gone (an interrupted remove is finished; so is an interrupted stop);
- a sandbox has a run directory (<run_dir>/sandboxes/<id>) from before its first system step
  until after its record is gone, so what a lost or corrupt record leaves is still known by id
  and collected on the next start; nothing outside our own directories, runtime root, netns pin
  tag and those ids is ever touched;
- a cancelled caller never leaves a half-made sandbox: steps whose work goes on in another
  process (namespace worker, reaper) and record writes are shielded, so cancellation lands
  between steps, and then the unwinding (shielded too) undoes exactly what was done; a stop or
  remove, once begun, is finished.

One sandbox's operations are serialized by its lock; different sandboxes run in parallel, at most
`max_parallel` doing system work at once. The embedding program's process never unshares, never
forks without exec, installs no signal handlers and never becomes a subreaper: namespaces are made
in worker subprocesses and the pause processes are reaped by the runtime's reaper process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
import shutil
import signal
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import TaskGroup

from podfsm.config import ControllerConfig
from podfsm.core import failpoints as fp
from podfsm.core import idmap
from podfsm.core.errors import (
    ControllerLocked,
    InvalidPodConfig,
    NameReserved,
    PodfsmError,
    PrerequisiteMissing,
    SandboxNotFound,
    SandboxRunError,
    StateDirError,
    StepFailed,
)
from podfsm.core.records import (
    HistoryEntry,
    SandboxRecord,
    SandboxStatus,
    TaskInfo,
    TransitionEvent,
)
from podfsm.core.spec import IDMapping, PodSandboxConfig, parse_pod_config
from podfsm.core.states import State, Trigger
from podfsm.drivers import nsutil
from podfsm.drivers.base import (
    InterfaceInfo,
    NamespaceDriver,
    NamespaceRequest,
    NetworkDriver,
    NetworkRequest,
    PauseRequest,
    RuntimeDriver,
    Store,
)
from podfsm.engine import SandboxMachine

log = logging.getLogger(__name__)

_EVENT_BACKLOG = 1024
#: What a sandbox id looks like (secrets.token_hex(32)); only such names are collected as ours.
_SANDBOX_ID = re.compile(r"^[0-9a-f]{64}$")
_CORRUPT_RECORD = re.compile(r"^corrupt record ([0-9a-f]{64})\b")


def _now() -> datetime:
    return datetime.now(UTC)


class FailpointError(StepFailed):
    """Raised by an `error` failpoint."""


@dataclass
class _Sandbox:
    record: SandboxRecord
    machine: SandboxMachine
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    supervisor: anyio.CancelScope | None = None
    removed: bool = False
    #: transitions not yet published (see Controller._save)
    unpublished: list[HistoryEntry] = field(default_factory=list)


@dataclass
class _Undo:
    label: str
    action: Callable[[], Awaitable[None]]
    trigger: Trigger | None


class Controller:
    """Runs pod sandboxes. Use as `async with Controller(cfg) as ctl:`.

    Entering recovers every persisted sandbox and re-attaches supervision to running ones;
    leaving stops supervision and the worker pool but leaves running sandboxes running.
    Drivers may be injected (tests use fakes); by default the real ones are built from `cfg`.
    """

    def __init__(
        self,
        config: ControllerConfig | None = None,
        *,
        namespaces: NamespaceDriver | None = None,
        network: NetworkDriver | None = None,
        runtime: RuntimeDriver | None = None,
        store: Store | None = None,
        failpoints: str | None = None,
    ) -> None:
        self.config = cfg = config or ControllerConfig()
        self._real = namespaces is None and network is None and runtime is None
        self._ns = namespaces or _real_namespaces(cfg)
        self._net = network or _real_network(cfg)
        self._rt = runtime or _real_runtime(cfg)
        self._store_given = store
        self._store: Store | None = store
        spec = os.environ.get("PODFSM_FAILPOINTS", "") if failpoints is None else failpoints
        self._failpoints = fp.parse(spec)
        self._sandboxes: dict[str, _Sandbox] = {}
        self._names: dict[str, str] = {}  # reserved name -> sandbox id
        self._limiter = anyio.CapacityLimiter(cfg.max_parallel)
        self._tg: TaskGroup | None = None
        self._exit_stack = contextlib.AsyncExitStack()
        self._subscribers: set[_Subscriber] = set()
        self._backlog: deque[TransitionEvent] = deque(maxlen=_EVENT_BACKLOG)
        self._seq = 0
        self._tag = hashlib.sha256(os.path.realpath(cfg.state_dir).encode()).hexdigest()[:8]
        self.recovery_problems: list[str] = []
        self.recovering = False

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Controller:
        cfg = self.config
        if self._real and os.geteuid() != 0:
            raise PrerequisiteMissing(
                "podfsm must run as root: it creates namespaces, mounts and containers"
            )
        stack = self._exit_stack
        try:
            if self._store is None:
                from podfsm.drivers.store import FileStore

                fs = FileStore(cfg.state_dir)
                fs.open()
                stack.callback(fs.close)
                self._store = fs
            for d in (cfg.run_dir, cfg.netns_dir):
                os.makedirs(d, mode=0o755, exist_ok=True)
            # run_dir holds our runtime root and sandbox directories: a second controller on
            # it (even with another state_dir) would collect our sandboxes as its orphans.
            stack.callback(os.close, _lock_dir(cfg.run_dir, "run dir"))
            await self._ns.start()
            stack.push_async_callback(self._ns.close)
            await self._rt.start()
            stack.push_async_callback(self._rt.close)
            await self._net.start()
            stack.push_async_callback(self._net.close)
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(self._tg.cancel_scope.cancel)
            self.recovering = True
            try:
                await self._recover()
            finally:
                self.recovering = False
        except BaseException:
            await stack.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sub in list(self._subscribers):
            sub.close()
        await self._exit_stack.aclose()

    @property
    def store(self) -> Store:
        assert self._store is not None, "use the Controller as an async context manager"
        return self._store

    # ------------------------------------------------------------------ public API

    async def run_sandbox(self, config: PodSandboxConfig | dict[str, Any]) -> SandboxStatus:
        """Create a sandbox and bring it to Ready. On failure everything done is unwound and
        SandboxRunError says which step failed (and what is left, if unwinding failed too)."""
        pod = config if isinstance(config, PodSandboxConfig) else parse_pod_config(config)
        async with self._limiter:
            # The sandbox is published with its lock already held, and nothing awaits between
            # admission and the run's own clean-up: a concurrent stop/remove/status waits for
            # the run, and a cancellation can never leave an admitted sandbox that never ran.
            sb = self._admit(pod)
            try:
                await self._run(sb)
                return SandboxStatus.from_record(sb.record)
            finally:
                sb.lock.release()

    async def sandbox_status(self, sandbox_id: str) -> SandboxStatus:
        """The sandbox's status. Raises SandboxNotFound for an unknown id."""
        sb = self._sandboxes.get(sandbox_id)
        if sb is None:
            raise SandboxNotFound(sandbox_id)
        return SandboxStatus.from_record(sb.record)

    async def sandbox_interfaces(self, sandbox_id: str) -> list[InterfaceInfo]:
        """The pod's interfaces and addresses, read live from its pinned netns."""
        status = await self.sandbox_status(sandbox_id)
        if not status.netns_path:
            return []
        return await self._net.interfaces(status.netns_path)

    async def runtime_containers(self) -> list[str]:
        """Ids of the containers in this controller's own runtime root."""
        return await self._rt.list_containers()

    async def reserved_addresses(self) -> set[str]:
        """Container ids holding an address in the pod network's IPAM store."""
        return await self._net.reserved_container_ids()

    async def list_sandboxes(self) -> list[SandboxStatus]:
        """Every sandbox, oldest first."""
        recs = sorted((sb.record for sb in self._sandboxes.values()), key=lambda r: r.created_at)
        return [SandboxStatus.from_record(r) for r in recs]

    async def stop_sandbox(self, sandbox_id: str) -> None:
        """Kill the task, CNI DEL, unpin: NotReady. Idempotent; an unknown id is not an error."""
        sb = self._sandboxes.get(sandbox_id)
        if sb is None:
            return
        async with self._limiter, sb.lock:
            if not sb.removed:
                with anyio.CancelScope(shield=True):  # once begun, a stop is finished
                    await self._stop(sb)

    async def remove_sandbox(self, sandbox_id: str) -> None:
        """Stop if needed, delete everything; the sandbox disappears. Idempotent."""
        sb = self._sandboxes.get(sandbox_id)
        if sb is None:
            return
        async with self._limiter, sb.lock:
            if not sb.removed:
                with anyio.CancelScope(shield=True):
                    await self._remove(sb)

    async def events(self, since: int | None = None) -> AsyncIterator[TransitionEvent]:
        """Every transition of every sandbox from now on (after `since`, a seq number, when
        given and still in the backlog). Ends when the controller closes."""
        sub = _Subscriber()
        self._subscribers.add(sub)
        try:
            if since is not None:
                for ev in list(self._backlog):
                    if ev.seq > since:
                        yield ev
            while True:
                ev_or_none = await sub.get()
                if ev_or_none is None:
                    return
                if since is None or ev_or_none.seq > since:
                    yield ev_or_none
        finally:
            self._subscribers.discard(sub)
            sub.dispose()

    @property
    def last_event_seq(self) -> int:
        return self._seq

    # ------------------------------------------------------------------ admission

    def netns_pin_path(self, sandbox_id: str) -> str:
        return os.path.join(self.config.netns_dir, f"podfsm-{self._tag}-{sandbox_id[:16]}")

    def sandbox_run_dir(self, sandbox_id: str) -> str:
        return os.path.join(self.config.run_dir, "sandboxes", sandbox_id)

    def userns_pin_path(self, sandbox_id: str) -> str:
        return os.path.join(self.sandbox_run_dir(sandbox_id), "userns")

    def _admit(self, pod: PodSandboxConfig) -> _Sandbox:
        """Reserve the name and the id range and publish the sandbox, its lock held by the
        caller. Synchronous, so reservations are atomic without a lock; nothing is written or
        touched on the system here (the run writes the first record)."""
        existing = self._names.get(pod.reserved_name)
        if existing is not None:
            raise NameReserved(pod.reserved_name, existing)
        self._check_host_support(pod)
        uid_map, gid_map, allocated = self._id_ranges(pod)
        sandbox_id = secrets.token_hex(32)
        rec = SandboxRecord(
            id=sandbox_id,
            config=pod,
            created_at=_now(),
            runtime=self._rt.name,
            uid_mapping=uid_map,
            gid_mapping=gid_map,
            allocated_ids=allocated,
            planned_netns_path=self.netns_pin_path(sandbox_id) if pod.pod_netns else None,
            planned_userns_path=self.userns_pin_path(sandbox_id) if pod.pod_userns else None,
            pending=Trigger.SETUP_NAMESPACES.value,
        )
        sb = _Sandbox(rec, SandboxMachine())
        sb.lock.acquire_nowait()
        self._sandboxes[sandbox_id] = sb
        self._names[pod.reserved_name] = sandbox_id
        return sb

    @staticmethod
    def _check_host_support(pod: PodSandboxConfig) -> None:
        """Refusals that need a look at this host: a sysctl the kernel does not have."""
        for name in pod.linux.sysctls:
            if not os.path.exists("/proc/sys/" + name.replace(".", "/")):
                raise InvalidPodConfig(f"sysctl {name!r} does not exist on this host")

    def _id_ranges(self, pod: PodSandboxConfig) -> tuple[IDMapping | None, IDMapping | None, bool]:
        if not pod.pod_userns:
            return None, None, False
        cfg = self.config
        uids_in_use = [sb.record.uid_mapping for sb in self._sandboxes.values()
                       if sb.record.uid_mapping is not None]
        gids_in_use = [sb.record.gid_mapping for sb in self._sandboxes.values()
                       if sb.record.gid_mapping is not None]
        uid_map, gid_map = pod.requested_uid_mapping, pod.requested_gid_mapping
        if uid_map is None or gid_map is None:
            try:
                uid_map = idmap.allocate(uids_in_use + gids_in_use, cfg.idmap_pool_start,
                                         cfg.idmap_pool_size)
            except ValueError as exc:
                raise InvalidPodConfig(str(exc)) from None
            return uid_map, uid_map, True
        for kind, want, used in (("uid", uid_map, uids_in_use), ("gid", gid_map, gids_in_use)):
            clash = idmap.find_overlap(want, used)
            if clash is not None:
                raise InvalidPodConfig(
                    f"{kind} mapping host ids {want.host_id}-{want.host_end - 1} overlap another "
                    f"sandbox's {clash.host_id}-{clash.host_end - 1}"
                )
        return uid_map, gid_map, False

    # ------------------------------------------------------------------ records and events

    async def _save(self, sb: _Sandbox, *triggers: Trigger, error: str | None = None,
                    persist: bool = True, **changes: Any) -> None:
        """Apply `changes`, fire `triggers` (in order) on the machine, write the record once,
        then publish one event per trigger (also when the write fails: the machine moved).
        persist=False skips the write where the next write (or the record's deletion) follows
        before anything else touches the system, so a crash in between changes nothing.

        A move back to Unknown (remove, or the last step of an unwinding) means the sandbox is
        about to disappear: its events are held until it is gone from status and list (see
        _forget), so whoever reacts to an event by asking for the status sees it gone."""
        events: list[HistoryEntry] = []
        for trig in triggers:
            source = sb.machine.current
            dest = sb.machine.fire(trig)
            events.append(HistoryEntry(source=source.value, dest=dest.value,
                                       trigger=trig.value, at=_now(), error=error))
        if events:
            changes["state"] = sb.machine.current
            changes["history"] = [*sb.record.history, *events]
        sb.record = sb.record.evolve(**changes)
        sb.unpublished.extend(events)
        try:
            if persist:
                await self._store_save(sb.record)
        finally:
            if sb.machine.current is not State.UNKNOWN:
                self._flush(sb)

    def _flush(self, sb: _Sandbox) -> None:
        events, sb.unpublished = sb.unpublished, []
        for h in events:
            self._publish(sb.record.id, h)

    async def _store_save(self, rec: SandboxRecord, durable: bool = False) -> None:
        # Never abandoned halfway: a cancelled write would go on in its thread.
        with anyio.CancelScope(shield=True):
            await self.store.save(rec, durable=durable)

    async def _save_or_log(self, sb: _Sandbox, *triggers: Trigger, error: str | None = None,
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

    # ------------------------------------------------------------------ run

    async def _run(self, sb: _Sandbox) -> None:
        undo: list[_Undo] = []
        step = Trigger.SETUP_NAMESPACES
        try:
            await self._first_save(sb)
            await self._setup_namespaces(sb, undo)
            step = Trigger.CREATE_CONTAINER
            await self._create_container(sb, undo)
            step = Trigger.START_TASK
            await self._start_task(sb, undo)
            step = Trigger.MARK_READY
            await self._mark_ready(sb)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                leftovers = await self._unwind(sb, undo, exc)
            if isinstance(exc, StateDirError) and not undo:
                raise  # nothing was touched: the store's own error says it all
            if isinstance(exc, Exception):
                cause = exc.cause if isinstance(exc, SandboxRunError) else exc
                raise SandboxRunError(step.value, cause, leftovers) from exc
            raise

    async def _unwind(self, sb: _Sandbox, undo: list[_Undo], cause: BaseException) -> list[str]:
        """Run the compensating steps LIFO. Fully unwound: the sandbox is forgotten. Otherwise
        it stays listed NotReady with what is left. Returns what is left."""
        leftovers: list[str] = []
        message = _describe(cause)
        with anyio.move_on_after(self.config.unwind_timeout) as scope:
            for u in reversed(undo):
                try:
                    await u.action()
                except Exception as exc:
                    log.error("sandbox %s: undo %s failed: %s", sb.record.id, u.label, exc)
                    leftovers.append(f"{u.label}: {_describe(exc)}")
                    continue
                if u.trigger is not None and sb.machine.may(u.trigger):
                    # The step is undone on the system: a record that cannot be written now
                    # must not stop the rest of the unwinding.
                    await self._save_or_log(sb, u.trigger, error=message)
        if scope.cancelled_caught:
            leftovers.append(f"unwinding timed out after {self.config.unwind_timeout}s")
        if not leftovers:
            try:
                await self._forget(sb)
            except PodfsmError as exc:
                leftovers.append(f"record: {_describe(exc)}")
        if leftovers:
            trig = (Trigger.FAIL,) if sb.machine.may(Trigger.FAIL) else ()
            await self._save_or_log(sb, *trig, error=message, pending=None,
                                    last_error=message, leftovers=leftovers)
        return leftovers

    async def _first_save(self, sb: _Sandbox) -> None:
        """Write the first record (it says the namespaces are about to be made), then the
        sandbox's run directory: both exist before anything else of it does, so a crash at
        any later point leaves either a record to recover or a directory that names an orphan.
        """
        await self._hit("save_record.before")
        # Durable (fsync): it precedes the CNI ADD, whose address reservation outlives a reboot
        # on disk; later writes need not be (see podfsm.drivers.store).
        await self._store_save(sb.record, durable=True)
        await self._hit("save_record.after")
        os.makedirs(self.sandbox_run_dir(sb.record.id), mode=0o700, exist_ok=True)

    async def _setup_namespaces(self, sb: _Sandbox, undo: list[_Undo]) -> None:
        rec = sb.record
        pod = rec.config
        undo.append(_Undo("unpin namespaces", lambda: self._teardown_namespaces(sb),
                          Trigger.TEARDOWN_NAMESPACES))
        if rec.planned_netns_path or rec.planned_userns_path:
            await self._hit("pin_namespaces.before")
            # Shielded, as every step whose work goes on in another process once begun: a
            # cancellation takes effect after it, and the unwinding then knows what exists.
            with anyio.CancelScope(shield=True):
                pinned = await self._ns.create(NamespaceRequest(
                    sandbox_id=rec.id,
                    netns_path=rec.planned_netns_path,
                    userns_path=rec.planned_userns_path,
                    uid_mapping=rec.uid_mapping,
                    gid_mapping=rec.gid_mapping,
                ))
            sb.record = rec = rec.evolve(namespaces=pinned)
            await self._hit("pin_namespaces.after")
            if pinned.userns_path and pinned.netns_path and (
                pinned.netns_owner_inode != pinned.userns_inode
            ):
                raise StepFailed("verify namespaces",
                                 f"netns {pinned.netns_path} is owned by user namespace inode "
                                 f"{pinned.netns_owner_inode}, not the pod's "
                                 f"{pinned.userns_inode}")
        if pod.pod_netns:
            undo.append(_Undo("CNI DEL", lambda: self._teardown_network(sb), None))
            await self._hit("cni_add.before")
            # Not shielded: a cancelled ADD kills the running plugin, and CNI DEL (registered
            # above) releases whatever it had done.
            result = await self._net.attach(self._net_request(rec))
            sb.record = rec.evolve(network=result)
            await self._hit("cni_add.after")
        await self._save(sb, Trigger.SETUP_NAMESPACES, pending=Trigger.CREATE_CONTAINER.value)

    async def _create_container(self, sb: _Sandbox, undo: list[_Undo]) -> None:
        rec = sb.record
        self._check_netns_owner(rec)
        undo.append(_Undo("runtime delete", lambda: self._teardown_container(sb),
                          Trigger.DELETE_CONTAINER))
        await self._hit("runtime_create.before")
        ns = rec.namespaces
        with anyio.CancelScope(shield=True):  # `create` runs on in the reaper once sent
            task = await self._rt.create(PauseRequest(
                container_id=rec.id,
                hostname=rec.config.effective_hostname,
                netns_path=ns.netns_path if ns else None,
                userns_path=ns.userns_path if ns else None,
                uid_mapping=rec.uid_mapping,
                gid_mapping=rec.gid_mapping,
                cgroup_parent=rec.config.linux.cgroup_parent,
                annotations=dict(rec.config.annotations),
                sysctls=dict(rec.config.linux.sysctls),
            ))
        sb.record = rec.evolve(container_created=True, task=task,
                               bundle_path=self._rt.bundle_path(rec.id))
        await self._hit("runtime_create.after")
        await self._save(sb, Trigger.CREATE_CONTAINER, pending=Trigger.START_TASK.value)

    async def _start_task(self, sb: _Sandbox, undo: list[_Undo]) -> None:
        rec = sb.record
        self._check_netns_owner(rec)
        undo.append(_Undo("kill task", lambda: self._teardown_task(sb), Trigger.KILL_TASK))
        await self._hit("runtime_start.before")
        with anyio.CancelScope(shield=True):  # so does `start`
            await self._rt.start_task(rec.id)
        await self._hit("runtime_start.after")
        # Written together with mark_ready: the check in between touches nothing, and a crash
        # there leaves `pending=start_task`, which recovery treats the same way.
        await self._save(sb, Trigger.START_TASK, persist=False)
        assert sb.record.task is not None
        self._supervise(sb, sb.record.task)

    async def _mark_ready(self, sb: _Sandbox) -> None:
        problem = self._task_problem(sb.record)
        if problem is not None:
            raise StepFailed("verify task", problem)
        await self._save(sb, Trigger.MARK_READY, pending=None)

    def _task_problem(self, rec: SandboxRecord) -> str | None:
        """None when the recorded pause process is alive, the same process (not a reuse of
        its pid), and in the pinned user and net namespaces; else what is wrong."""
        assert rec.task is not None
        ns = rec.namespaces
        pid = rec.task.pid
        want_user = (ns.userns_inode if ns and ns.userns_inode else
                     nsutil.ns_inode("/proc/self/ns/user"))
        want_net = (ns.netns_inode if ns and ns.netns_inode else
                    nsutil.ns_inode("/proc/self/ns/net"))
        try:
            if nsutil.proc_start_time(pid) != rec.task.start_time:
                raise ProcessLookupError(errno.ESRCH, "pause process exited")
            got_user = nsutil.ns_inode(f"/proc/{pid}/ns/user")
            got_net = nsutil.ns_inode(f"/proc/{pid}/ns/net")
        except OSError as exc:
            return f"pause pid {pid} is gone: {exc.strerror}"
        if got_user != want_user or got_net != want_net:
            return (f"pause pid {pid} is in user ns {got_user} / net ns {got_net}, "
                    f"expected {want_user} / {want_net}")
        return None

    def _check_netns_owner(self, rec: SandboxRecord) -> None:
        """Refuse to let the runtime near a netns that the pod's user namespace does not own:
        crun would silently bind the host's /sys if mounting sysfs failed."""
        ns = rec.namespaces
        if ns is None or not ns.netns_path or not ns.userns_path:
            return
        try:
            owner = nsutil.netns_owner_inode(ns.netns_path)
            userns = nsutil.ns_inode(ns.userns_path)
        except OSError as exc:
            raise StepFailed("verify namespaces", f"pinned namespaces unusable: {exc}") from None
        if owner != userns or userns != ns.userns_inode:
            raise StepFailed("verify namespaces",
                             f"netns {ns.netns_path} is owned by user namespace {owner}, "
                             f"not the pod's {ns.userns_inode}")

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

    # ------------------------------------------------------------------ teardown pieces

    async def _teardown_task(self, sb: _Sandbox) -> None:
        """Kill the pause task (TERM, then KILL after the grace) and wait until it is gone."""
        task = sb.record.task
        if sb.supervisor is not None:
            sb.supervisor.cancel()
            sb.supervisor = None
        if task is None:
            return
        await self._hit("runtime_kill.before")
        status = await self._kill_and_wait(task)
        changes: dict[str, Any] = {"task": None}
        if sb.record.exit_status is None and status is not None:
            changes.update(exit_status=status, finished_at=_now())
        sb.record = sb.record.evolve(**changes)
        await self._hit("runtime_kill.after")

    async def _kill_and_wait(self, task: TaskInfo) -> int | None:
        try:
            pidfd = os.pidfd_open(task.pid)
        except ProcessLookupError:
            return await self._exit_status(task, 0.05)
        try:
            if nsutil.proc_start_time(task.pid) != task.start_time:
                return None  # not our process any more: it exited long ago
            grace = self.config.stop_grace
            steps = ((signal.SIGTERM, grace),) if grace > 0 else ()
            for sig, wait in (*steps, (signal.SIGKILL, 10.0)):
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, sig)
                with anyio.move_on_after(wait):
                    await anyio.wait_readable(pidfd)
                    break
            else:
                raise StepFailed("kill task", f"pause pid {task.pid} survived SIGKILL")
        finally:
            os.close(pidfd)
        return await self._exit_status(task, 1.0)

    async def _exit_status(self, task: TaskInfo, timeout: float) -> int | None:
        """The task's exit status from the reaper, or None when it cannot be learned (the
        task's end is known either way)."""
        try:
            return await self._rt.wait_exit_status(task, timeout)
        except PodfsmError as exc:
            log.warning("exit status of pause pid %d unknown: %s", task.pid, exc)
            return None

    async def _teardown_container(self, sb: _Sandbox) -> None:
        rec = sb.record
        await self._hit("runtime_delete.before")
        await self._rt.delete(rec.id)
        sb.record = sb.record.evolve(container_created=False, bundle_path=None)
        await self._hit("runtime_delete.after")

    async def _teardown_network(self, sb: _Sandbox) -> None:
        rec = sb.record
        if not rec.config.pod_netns:
            return
        await self._hit("cni_del.before")
        await self._net.detach(self._net_request(rec), rec.network)
        sb.record = sb.record.evolve(network=None)
        await self._hit("cni_del.after")

    async def _teardown_namespaces(self, sb: _Sandbox) -> None:
        rec = sb.record
        await self._hit("unpin_namespaces.before")
        ns = rec.namespaces
        await self._ns.destroy(
            (ns.netns_path if ns else None) or rec.planned_netns_path,
            (ns.userns_path if ns else None) or rec.planned_userns_path,
        )
        # The sandbox's run directory stays until the record goes (see _forget).
        sb.record = sb.record.evolve(namespaces=None)
        await self._hit("unpin_namespaces.after")

    # ------------------------------------------------------------------ stop, remove, forget

    def _nothing_left(self, sb: _Sandbox) -> bool:
        rec = sb.record
        return (sb.machine.current is State.NOT_READY and rec.task is None
                and not rec.container_created and rec.network is None
                and rec.namespaces is None and rec.pending is None and not _pins_exist(rec))

    async def _stop(self, sb: _Sandbox, intent: str = "stop") -> None:
        """Tear down everything on the system, keep the record: NotReady. Tries every piece,
        then reports all failures together. The record says `pending=intent` until it is done
        (and, for a remove, until the record is gone), so a restart finishes it."""
        if self._nothing_left(sb) and intent == "stop":
            return
        await self._save(sb, pending=intent)
        errors: list[str] = []
        for label, piece in (("kill task", self._teardown_task),
                             ("runtime delete", self._teardown_container),
                             ("CNI DEL", self._teardown_network),
                             ("unpin namespaces", self._teardown_namespaces)):
            try:
                await piece(sb)
            except Exception as exc:
                errors.append(f"{label}: {_describe(exc)}")
        trig = (Trigger.STOP,) if sb.machine.may(Trigger.STOP) else ()
        error = "; ".join(errors) or None
        pending = None if intent == "stop" and not errors else intent
        await self._save(sb, *trig, error=error, pending=pending, leftovers=errors)
        if errors:
            raise StepFailed("stop", error or "")

    async def _remove(self, sb: _Sandbox) -> None:
        if not self._nothing_left(sb):
            await self._stop(sb, intent="remove")
        # not written: the record is deleted next (a crash before that leaves the record of the
        # stop, which a remove finishes)
        await self._save(sb, Trigger.REMOVE, pending="remove", persist=False)
        await self._forget(sb)

    async def _forget(self, sb: _Sandbox) -> None:
        """Drop the record, then the run directory and the name and id reservations."""
        if sb.supervisor is not None:
            sb.supervisor.cancel()
            sb.supervisor = None
        try:
            with anyio.CancelScope(shield=True):
                await self.store.delete(sb.record.id)
            sb.removed = True
            self._sandboxes.pop(sb.record.id, None)
            if self._names.get(sb.record.config.reserved_name) == sb.record.id:
                del self._names[sb.record.config.reserved_name]
        finally:
            self._flush(sb)
        with contextlib.suppress(OSError):
            nsutil.remove_flat_dir(self.sandbox_run_dir(sb.record.id))

    # ------------------------------------------------------------------ supervision

    def _supervise(self, sb: _Sandbox, task: TaskInfo) -> None:
        """Watch the pause task through a pidfd: readable the moment it exits, no polling."""
        assert self._tg is not None
        try:
            pidfd = os.pidfd_open(task.pid)
        except ProcessLookupError:
            pidfd = -1
        if pidfd >= 0 and nsutil.proc_start_time(task.pid) != task.start_time:
            os.close(pidfd)
            pidfd = -1
        scope = anyio.CancelScope()
        sb.supervisor = scope
        self._tg.start_soon(self._watch, sb, task, pidfd, scope)

    async def _watch(self, sb: _Sandbox, task: TaskInfo, pidfd: int,
                     scope: anyio.CancelScope) -> None:
        try:
            with scope:
                if pidfd >= 0:
                    await anyio.wait_readable(pidfd)
                status = await self._exit_status(task, 1.0)
                async with sb.lock:
                    if sb.removed or sb.record.task != task or sb.supervisor is not scope:
                        return
                    sb.supervisor = None
                    if sb.machine.may(Trigger.TASK_EXIT):
                        await self._save(sb, Trigger.TASK_EXIT, exit_status=status,
                                         finished_at=_now())
        except Exception:
            log.exception("sandbox %s: supervising pid %d failed", sb.record.id, task.pid)
        finally:
            if pidfd >= 0:
                os.close(pidfd)

    # ------------------------------------------------------------------ recovery

    async def _recover(self) -> None:
        records, problems = await self.store.load_all()
        self.recovery_problems = problems
        for rec in records:
            sb = _Sandbox(rec, SandboxMachine(rec.state))
            self._sandboxes[rec.id] = sb
            self._names[rec.config.reserved_name] = rec.id
        # What the runtime and the IPAM store say, asked once for all sandboxes: one
        # `runtime list` and one directory read instead of a runtime call and a CNI CHECK per
        # sandbox (which made a restart with 250 sandboxes take 3 s).
        world = _World(await self._rt.states(), await self._net.reserved_container_ids())
        async with anyio.create_task_group() as tg:
            for sb in list(self._sandboxes.values()):
                tg.start_soon(self._recover_one, sb, world)
        await self._collect_orphans()

    async def _recover_one(self, sb: _Sandbox, world: _World) -> None:
        """Reconcile one record with the system.

        - a stop or remove that was under way is finished;
        - a Ready sandbox whose pause process is alive (the same process, in the pinned
          namespaces, running for the runtime, its address still reserved) is supervised
          again; one whose
          task died meanwhile goes NotReady (TASK_EXIT, with the status the reaper kept);
        - an interrupted run goes NotReady (FAIL) keeping what it made (its netns path, its
          address) until stop/remove, as containerd does.
        Nothing is ever left in between: every record ends Ready, NotReady, or removed.
        """
        async with self._limiter, sb.lock:
            rec = sb.record
            try:
                if rec.pending == "remove":
                    await self._remove(sb)
                elif rec.pending == "stop":
                    await self._stop(sb)
                elif rec.state is State.READY and rec.pending is None:
                    await self._reattach(sb, world)
                elif rec.state is not State.NOT_READY:
                    what = rec.pending or rec.state.value
                    msg = f"interrupted by a controller restart during {what}"
                    await self._save(sb, Trigger.FAIL, error=msg, last_error=msg, pending=None)
            except Exception as exc:
                log.error("sandbox %s: recovery failed: %s", rec.id, exc)
                self.recovery_problems.append(f"sandbox {rec.id}: {_describe(exc)}")

    async def _reattach(self, sb: _Sandbox, world: _World) -> None:
        rec = sb.record
        task = rec.task
        if task is None or not _same_process(task):
            status = await self._exit_status(task, 0.2) if task is not None else None
            msg = "task exited while podfsm was down"
            await self._save(sb, Trigger.TASK_EXIT, exit_status=status,
                             finished_at=rec.finished_at or _now(), error=msg)
            return
        problem = self._task_problem(rec) or _pin_problem(rec)
        if problem is None and world.runtime_states.get(rec.id) != "running":
            problem = (f"the runtime says the container is "
                       f"{world.runtime_states.get(rec.id) or 'gone'}")
        if problem is None and rec.network is not None and rec.id not in world.reserved:
            problem = "pod network check failed: its address is no longer reserved"
        if problem is not None:
            msg = f"found broken after a controller restart: {problem}"
            await self._save(sb, Trigger.FAIL, error=msg, last_error=msg)
            return
        self._supervise(sb, task)

    async def _collect_orphans(self) -> None:
        """Remove what this controller made but has no record of; nothing else is touched.

        What is ours: containers in our own runtime root, sandbox run directories and bundles
        under our run_dir (every sandbox has a run directory from before its first system
        step until after its record is gone), ids of records set aside as corrupt, and netns
        pins carrying our tag. For each such id: runtime delete, CNI DEL, unpin, directory.
        """
        known = set(self._sandboxes)
        ids: set[str] = set()
        try:
            ids.update(await self._rt.list_containers())
        except PodfsmError as exc:
            self.recovery_problems.append(f"orphan containers: {exc}")
        bundles_dir = os.path.dirname(self._rt.bundle_path("0" * 64))
        for d in (os.path.join(self.config.run_dir, "sandboxes"), bundles_dir):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                ids.update(n for n in os.listdir(d) if _SANDBOX_ID.match(n))
        ids.update(self._corrupt_ids)
        for sid in sorted(ids - known):
            await self._collect_orphan(sid)
        prefix = f"podfsm-{self._tag}-"
        known_prefixes = {sid[:16] for sid in known}
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.config.netns_dir):
                if name.startswith(prefix) and name[len(prefix):] not in known_prefixes:
                    log.warning("unpinning orphan netns %s", name)
                    try:
                        await self._ns.destroy(os.path.join(self.config.netns_dir, name), None)
                    except PodfsmError as exc:
                        self.recovery_problems.append(f"orphan netns pin {name}: {exc}")

    async def _collect_orphan(self, sid: str) -> None:
        log.warning("collecting orphan sandbox %s (no record of it)", sid)
        netns = self.netns_pin_path(sid)
        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("runtime delete", lambda: self._rt.delete(sid)),
            ("CNI DEL", lambda: self._net.detach(
                NetworkRequest(sandbox_id=sid,
                               netns_path=netns if os.path.lexists(netns) else None), None)),
            ("unpin", lambda: self._ns.destroy(netns, self.userns_pin_path(sid))),
        ]
        failed = False
        for label, action in steps:
            try:
                await action()
            except Exception as exc:
                failed = True
                self.recovery_problems.append(f"orphan {sid}: {label}: {_describe(exc)}")
        if not failed:
            shutil.rmtree(self.sandbox_run_dir(sid), ignore_errors=True)

    @property
    def _corrupt_ids(self) -> set[str]:
        """Ids of the records set aside as corrupt this time (named in the store's problems)."""
        return {m.group(1) for p in self.recovery_problems
                if (m := _CORRUPT_RECORD.match(p)) is not None}


@dataclass(frozen=True)
class _World:
    """What the drivers report once, at recovery."""

    runtime_states: dict[str, str]
    reserved: set[str]


class _Subscriber:
    """One events() consumer: an unbounded-but-capped queue that never blocks the publisher."""

    _CAP = 10_000

    def __init__(self) -> None:
        send, recv = anyio.create_memory_object_stream[TransitionEvent | None](self._CAP)
        self._send = send
        self._recv = recv

    def put(self, ev: TransitionEvent) -> None:
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

    async def get(self) -> TransitionEvent | None:
        try:
            return await self._recv.receive()
        except anyio.EndOfStream:
            return None


def _lock_dir(path: str, what: str) -> int:
    """Take the controller lock of directory `path` (non-blocking); the fd holds it."""
    fd = os.open(os.path.join(path, "controller.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ControllerLocked(f"another podfsm controller is using {what} {path}") from None
    return fd


def _same_process(task: TaskInfo) -> bool:
    return nsutil.proc_start_time(task.pid) == task.start_time


def _pin_problem(rec: SandboxRecord) -> str | None:
    """None when the recorded pins still hold the recorded namespaces."""
    ns = rec.namespaces
    if ns is None:
        return None
    for kind, path, inode in (("netns", ns.netns_path, ns.netns_inode),
                              ("userns", ns.userns_path, ns.userns_inode)):
        if not path or not inode:
            continue
        try:
            ok = nsutil.ns_inode(path) == inode
        except OSError:
            ok = False
        if not ok:
            return f"the {kind} pin {path} no longer holds the pod's namespace"
    return None


def _pins_exist(rec: SandboxRecord) -> bool:
    return any(p and os.path.lexists(p) for p in (rec.planned_netns_path, rec.planned_userns_path))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SandboxRunError):
        return _describe(exc.cause)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, PodfsmError) else text


def _real_namespaces(cfg: ControllerConfig) -> NamespaceDriver:
    from podfsm.drivers.namespaces import WorkerPoolNamespaces

    return WorkerPoolNamespaces(workers=cfg.workers)


def _real_network(cfg: ControllerConfig) -> NetworkDriver:
    from podfsm.drivers.cni import CniNetwork

    return CniNetwork(
        conf_dir=cfg.cni_conf_dir,
        bin_dirs=cfg.cni_bin_dirs,
        default_name=cfg.default_network_name,
        default_bridge=cfg.default_bridge,
        default_subnet=cfg.default_subnet,
        reaper_run_dir=cfg.run_dir,
    )


def _real_runtime(cfg: ControllerConfig) -> RuntimeDriver:
    from podfsm.drivers.runtime import OciRuntime

    return OciRuntime(cfg.runtime, cfg.run_dir, binary=cfg.runtime_binary,
                      pause_binary=cfg.pause_binary)
