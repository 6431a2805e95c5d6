"""start_container: Created -> Running (runtime start, then exit supervision); a failed start
makes the container Exited with the runtime's message."""

from __future__ import annotations

from podfsm.controller.base import describe, now
from podfsm.controller.containers.base import ContainerBase
from podfsm.core.containerstates import ContainerState, ContainerTrigger
from podfsm.core.errors import ContainerPrecondition, PodfsmError


class StartContainer(ContainerBase):

    async def start_container(self, container_id: str) -> None:
        """Start a Created container; ContainerPrecondition in any other state. A failed
        start leaves it Exited (exit code 128, reason StartError) and raises the error."""
        c = self._ctr(container_id)
        async with c.lock:
            rec = c.record
            if rec.state is not ContainerState.CREATED:
                raise ContainerPrecondition(
                    f"container {rec.id} is {rec.state.value}: only a Created container "
                    "can be started")
            await self._csave(c, pending="start")
            try:
                async with self._failpoints_around("container_start"):
                    await self._cd.start(rec.runtime, rec.id)
            except BaseException as exc:
                if isinstance(exc, PodfsmError | OSError):
                    msg = describe(exc)
                    await self._csave(c, ContainerTrigger.FAIL, error=msg, pending=None,
                                      exit_code=128, reason="StartError", message=msg,
                                      finished_at=now(), last_error=msg)
                raise
            await self._csave(c, ContainerTrigger.START, pending=None, started_at=now())
            self._supervise_container(c)
