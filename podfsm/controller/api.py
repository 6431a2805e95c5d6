"""The Controller's public API: entering and leaving, run, status, list, stop, remove, events."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import anyio

from podfsm.controller.base import Subscriber, lock_dir
from podfsm.controller.recovery import Recovery
from podfsm.core.errors import PrerequisiteMissing, SandboxNotFound
from podfsm.core.records import SandboxStatus, TransitionEvent
from podfsm.core.spec import PodSandboxConfig, parse_pod_config
from podfsm.drivers import nsutil
from podfsm.drivers.base import InterfaceInfo


class Controller(Recovery):
    """Runs pod sandboxes. Use as `async with Controller(cfg) as ctl:`.

    Entering recovers every persisted sandbox and re-attaches supervision to running ones;
    leaving stops supervision and the worker pool but leaves running sandboxes running.
    Drivers may be injected (tests use fakes); by default the real ones are built from `cfg`.
    """

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
            # run_dir 0711: the pod's root (a high host uid) walks down to the pause rootfs;
            # netns_dir 0755, as `ip netns` makes /run/netns
            nsutil.secure_dir(cfg.run_dir, 0o711, "run dir")
            nsutil.secure_dir(cfg.netns_dir, 0o755, "netns dir")
            # run_dir holds our runtime root and sandbox directories: a second controller on
            # it (even with another state_dir) would collect our sandboxes as its orphans.
            stack.callback(os.close, lock_dir(cfg.run_dir, "run dir"))
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
        sub = Subscriber()
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

