"""Containers at the controller's start: the driver opened, every record loaded and reconciled
with the system (a half-done create unwound, a stop or remove finished, an exit that happened
while podfsm was down taken in, a running container supervised again), and what is ours but
has no record (a container directory, a runtime container) collected."""

from __future__ import annotations

import logging

from podfsm.controller.base import now
from podfsm.controller.containers.base import Container
from podfsm.controller.containers.remove import RemoveContainer
from podfsm.core.containerstates import ContainerState, ContainerTrigger
from podfsm.core.errors import PodfsmError

log = logging.getLogger(__name__)


class RecoverContainers(RemoveContainer):

    def _open_containers(self) -> None:
        self._cd.open(self._runtimes)

    async def _recover_containers(self) -> None:
        records, problems = self._cd.load_all()
        self.recovery_problems.extend(problems)
        for rec in records:
            c = Container(rec)
            self._containers[rec.id] = c
            sb = self._sandboxes.get(rec.sandbox_id)
            if sb is not None:
                self._ctr_names[self.reserved_container_name(rec, sb)] = rec.id
        for c in list(self._containers.values()):
            try:
                await self._recover_container(c)
            except PodfsmError as exc:
                self.recovery_problems.append(f"container {c.record.id}: {exc}")
        known = set(self._containers)
        orphans: set[str] = set()
        for ids in self._cd.runtime_ids().values():
            orphans.update(ids)
        orphans.update(self._cd.dir_ids())
        for cid in sorted(orphans - known):
            log.warning("collecting orphan container %s (no record of it)", cid)
            try:
                for rt in self._cd.runtime_ids():
                    await self._cd.delete(rt, cid)
                await self._cd.remove_dir(cid)
            except (PodfsmError, OSError) as exc:
                self.recovery_problems.append(f"orphan container {cid}: {exc}")

    async def _recover_container(self, c: Container) -> None:
        rec = c.record
        if rec.sandbox_id not in self._sandboxes:
            log.warning("container %s: its sandbox %s is gone: removing it", rec.id,
                        rec.sandbox_id)
            await self.remove_container(rec.id)
            return
        if rec.pending == "remove":
            await self.remove_container(rec.id)
            return
        if rec.state is ContainerState.UNKNOWN:
            # a create cut short: unwind what it did
            async with c.lock:
                await self._unwind_create(c, RuntimeError("interrupted by a controller crash"))
            return
        if rec.state is ContainerState.RUNNING:
            async with c.lock:
                if not await self._note_exit(c):
                    self._supervise_container(c)
        if rec.pending == "stop":
            await self.stop_container(rec.id, 0)
        elif rec.pending == "start" and rec.state is ContainerState.CREATED:
            # the start may have happened: the runtime says whether the process was started
            said = await self._cd.state(rec.runtime, rec.id)
            async with c.lock:
                if said in ("running", "stopped"):
                    await self._csave(c, ContainerTrigger.START, pending=None,
                                      started_at=now())
                    if not await self._note_exit(c):
                        self._supervise_container(c)
                else:
                    await self._csave(c, pending=None)
