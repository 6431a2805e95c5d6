"""remove_container: stop if needed (SIGKILL), runtime delete, rootfs unmounted, the
container's directory and record removed; it disappears. RemovePodSandbox removes every
container of the pod first."""

from __future__ import annotations

import logging

import anyio

from podfsm.controller.base import describe
from podfsm.controller.containers.create import CreateContainer
from podfsm.controller.containers.stop import StopContainer
from podfsm.core.containerstates import ContainerState, ContainerTrigger
from podfsm.core.errors import ContainerNotFound, PodfsmError

log = logging.getLogger(__name__)


class RemoveContainer(StopContainer, CreateContainer):

    async def remove_container(self, container_id: str) -> None:
        """Remove the container (a running one is killed first). Idempotent: an unknown id
        is not an error."""
        try:
            c = self._ctr(container_id)
        except ContainerNotFound:
            return
        async with c.lock:
            if c.removed:
                return
            with anyio.CancelScope(shield=True):
                if c.record.state in (ContainerState.RUNNING, ContainerState.CREATED):
                    await self._stop_locked(c, 0)
                await self._csave(c, pending="remove")
                try:
                    async with self._failpoints_around("container_remove"):
                        await self._undo_create(c)
                except (PodfsmError, OSError) as exc:
                    await self._csave(c, pending=None, last_error=(
                        f"remove failed: {describe(exc)}"))
                    raise
                self._unsupervise_container(c)
                entry_source = c.record.state
                if entry_source is not ContainerState.UNKNOWN:
                    await self._csave(c, ContainerTrigger.REMOVE, persist=False)
                self._forget_container(c)

    async def _remove_pod_containers(self, sandbox_id: str) -> None:
        for c in self._pod_containers(sandbox_id):
            try:
                await self.remove_container(c.record.id)
            except PodfsmError as exc:
                log.error("container %s: remove: %s", c.record.id, exc)
