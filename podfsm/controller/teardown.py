"""Tearing down: the compensating steps, stop, remove, and supervision of the pause task's exit."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import anyio

from podfsm.controller.base import ControllerBase, Sandbox, describe, now
from podfsm.core import steps
from podfsm.core.errors import PodfsmError, StepFailed
from podfsm.core.records import TaskInfo
from podfsm.core.states import State, Trigger

log = logging.getLogger(__name__)


class Teardown(ControllerBase):
    """The compensating steps and what is built on them: stop, remove, forget, supervision."""

    async def _teardown_task(self, sb: Sandbox) -> None:
        """Kill the pause task (TERM, then KILL after the grace) and wait until it is gone."""
        task = sb.record.task
        if sb.supervisor is not None:
            sb.supervisor.cancel()
            sb.supervisor = None
        if task is None:
            return
        async with self._failpoints_around(steps.KILL_TASK.failpoint):
            rt = self._runtime(sb.record.runtime)
            status = await rt.kill_task(task, self.config.stop_grace)
            changes: dict[str, Any] = {"task": None}
            if sb.record.exit_status is None and status is not None:
                changes.update(exit_status=status, finished_at=now())
            sb.record = sb.record.evolve(**changes)

    async def _exit_status(self, runtime: str, task: TaskInfo, timeout: float) -> int | None:
        """The task's exit status from the reaper, or None when it cannot be learned (the
        task's end is known either way)."""
        try:
            return await self._runtime(runtime).wait_exit_status(task, timeout)
        except PodfsmError as exc:
            log.warning("exit status of pause pid %d unknown: %s", task.pid, exc)
            return None

    async def _teardown_container(self, sb: Sandbox) -> None:
        rec = sb.record
        async with self._failpoints_around(steps.DELETE_CONTAINER.failpoint):
            await self._runtime(rec.runtime).delete(rec.id)
            sb.record = sb.record.evolve(container_created=False, bundle_path=None)
            # The runtime removes only the container's own cgroup; the parents podfsm caused to
            # exist under its cgroup root go too when no other pod's container is in them. Only
            # pods whose container exists or is being created count (one admitted but not
            # created yet makes its parent at its create; one whose container is deleted
            # beside this one must not keep it, or two
            # unwinding pods of one parent each leave it to the other), and this pod counts as
            # gone before the await, so of two teardowns side by side the later one removes it.
            await self._host.remove_cgroup_parent(
                self.cgroup_parent(rec), self.config.cgroup_root,
                [self.cgroup_parent(s.record) for s in self._others(sb)
                 if s.record.container_created or s.creating])

    async def _teardown_network(self, sb: Sandbox) -> None:
        rec = sb.record
        if not rec.config.pod_netns:
            return
        async with self._failpoints_around(steps.DETACH_NETWORK.failpoint):
            await self._net.detach(self._net_request(rec), rec.network)
            sb.record = sb.record.evolve(network=None)

    async def _release_shm(self, sb: Sandbox) -> None:
        """Unmount the pod's /dev/shm tmpfs (at stop, as containerd does; the files stay
        until remove). The path is derived, not read from the record, so a crash before the
        record named it still finds it."""
        if not sb.record.config.host_ipc:
            await self._host.release_shm(self.shm_path(sb.record.id))

    async def _remove_files(self, sb: Sandbox) -> None:
        files = sb.record.files
        if files is None:  # a crash before the record named them: the tmpfs may be there
            await self._release_shm(sb)
            return
        # the tmpfs first, if still mounted; no log directory another sandbox uses
        await self._host.remove_files(files, *self._log_directories_in_use(sb))
        sb.record = sb.record.evolve(files=None)

    async def _teardown_namespaces(self, sb: Sandbox) -> None:
        rec = sb.record
        async with self._failpoints_around(steps.UNPIN_NAMESPACES.failpoint):
            ns = rec.namespaces
            await self._ns.destroy(
                (ns.netns_path if ns else None) or rec.planned_netns_path,
                (ns.userns_path if ns else None) or rec.planned_userns_path,
            )
            # The sandbox's run directory stays until the record goes (see _forget).
            sb.record = sb.record.evolve(namespaces=None)

    def _nothing_left(self, sb: Sandbox) -> bool:
        rec = sb.record
        return (sb.machine.current is State.NOT_READY and rec.task is None
                and not rec.container_created and rec.network is None
                and rec.namespaces is None and rec.pending is None
                and not self._ns.pins_exist(rec.planned_netns_path, rec.planned_userns_path))

    async def _stop(self, sb: Sandbox, intent: str = "stop") -> None:
        """Tear down everything on the system, keep the record: NotReady. Tries every piece,
        then reports all failures together. The record says `pending=intent` until it is done
        (and, for a remove, until the record is gone), so a restart finishes it."""
        if self._nothing_left(sb) and intent == "stop":
            return
        await self._save(sb, pending=intent)
        errors: list[str] = []
        pieces = {steps.KILL_TASK: self._teardown_task,
                  steps.DELETE_CONTAINER: self._teardown_container,
                  steps.DETACH_NETWORK: self._teardown_network,
                  steps.UNPIN_NAMESPACES: self._teardown_namespaces,
                  steps.RELEASE_SHM: self._release_shm}
        for step in steps.STOP_ORDER:
            try:
                await pieces[step](sb)
            except Exception as exc:
                errors.append(f"{step.label}: {describe(exc)}")
        trig = (Trigger.STOP,) if sb.machine.may(Trigger.STOP) else ()
        error = "; ".join(errors) or None
        pending = None if intent == "stop" and not errors else intent
        await self._save(sb, *trig, error=error, pending=pending, leftovers=errors)
        if errors:
            raise StepFailed("stop", error or "")

    async def _remove(self, sb: Sandbox) -> None:
        if not self._nothing_left(sb):
            await self._stop(sb, intent="remove")
        # not written: the record is deleted next (a crash before that leaves the record of the
        # stop, which a remove finishes)
        await self._save(sb, Trigger.REMOVE, pending="remove", persist=False)
        await self._forget(sb)

    async def _forget(self, sb: Sandbox) -> None:
        """Drop the sandbox's files, the record, then the run directory and the name and id
        reservations."""
        try:
            await self._remove_files(sb)
        except OSError as exc:
            raise StepFailed(steps.REMOVE_FILES.label, describe(exc)) from exc
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
            self._host.remove_sandbox_dir(self.sandbox_run_dir(sb.record.id))

    def _supervise(self, sb: Sandbox, task: TaskInfo) -> None:
        """Watch the pause task in the background: its runtime driver returns the moment it
        exits (no polling). The scope is the supervision: stop and remove cancel it."""
        assert self._tg is not None
        scope = anyio.CancelScope()
        sb.supervisor = scope
        self._tg.start_soon(self._watch, sb, task, scope)

    async def _watch(self, sb: Sandbox, task: TaskInfo, scope: anyio.CancelScope) -> None:
        try:
            with scope:
                await self._task_driver(sb.record).wait_task_exit(task)
                status = await self._exit_status(sb.record.runtime, task, 1.0)
                async with sb.lock:
                    if sb.removed or sb.record.task != task or sb.supervisor is not scope:
                        return
                    sb.supervisor = None
                    if sb.machine.may(Trigger.TASK_EXIT):
                        await self._save(sb, Trigger.TASK_EXIT, exit_status=status,
                                         finished_at=now())
        except Exception:
            log.exception("sandbox %s: supervising pid %d failed", sb.record.id, task.pid)
