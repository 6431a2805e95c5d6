"""stop_container: Running or Created -> Exited. The stop signal (the config's, the image's
StopSignal, else SIGTERM), then SIGKILL once the timeout passes, until the monitor has recorded
the exit. StopPodSandbox stops every container of the pod first."""

from __future__ import annotations

import logging
import signal

import anyio

from podfsm.controller.base import now
from podfsm.controller.containers.base import Container, ContainerBase
from podfsm.core.containeroci import signal_number
from podfsm.core.containerrecords import exit_reason
from podfsm.core.containerstates import ContainerState, ContainerTrigger
from podfsm.core.errors import PodfsmError, StepFailed

#: how long after SIGKILL the monitor may take to record the exit
KILL_WAIT = 10.0

log = logging.getLogger(__name__)


class StopContainer(ContainerBase):

    async def stop_container(self, container_id: str, timeout: float = 0) -> None:
        """Stop the container, giving it `timeout` seconds after its stop signal before
        SIGKILL. Idempotent: an Exited container is left as it is."""
        c = self._ctr(container_id)
        async with c.lock:
            with anyio.CancelScope(shield=True):  # once begun, a stop is finished
                await self._stop_locked(c, timeout)

    async def _stop_locked(self, c: Container, timeout: float) -> None:
        rec = c.record
        if rec.state is ContainerState.RUNNING and await self._note_exit(c):
            return
        if rec.state not in (ContainerState.RUNNING, ContainerState.CREATED):
            return
        await self._csave(c, pending="stop")
        async with self._failpoints_around("container_stop"):
            if rec.state is ContainerState.RUNNING and timeout > 0:
                try:
                    sig = signal_number(rec.stop_signal)
                except ValueError:
                    sig = signal.SIGTERM
                await self._cd.kill(rec.runtime, rec.id, sig)
                if await self._wait_exit(c, timeout):
                    return
            await self._cd.kill(rec.runtime, rec.id, signal.SIGKILL)
            if not await self._wait_exit(c, KILL_WAIT):
                raise StepFailed("stop", f"container {rec.id} did not exit after SIGKILL")

    async def _wait_exit(self, c: Container, timeout: float) -> bool:
        """Wait up to `timeout` s for the monitor to record the exit; True once Exited."""
        monitor = c.record.monitor
        if monitor is not None:
            with anyio.move_on_after(timeout):
                await self._cd.wait_exit(monitor)
        ex = self._cd.exit_of(c.record.id)
        if ex is None:
            return False
        await self._csave(c, ContainerTrigger.STOP, pending=None, exit_code=ex.code,
                          reason=exit_reason(ex.code, ex.oom), finished_at=ex.at or now(),
                          message="OOM killed" if ex.oom else "")
        self._unsupervise_container(c)
        return True

    async def _stop_pod_containers(self, sandbox_id: str) -> None:
        """Stop every container of the sandbox (SIGKILL at once, as containerd does when the
        pod is stopped); errors are logged, the sandbox's stop goes on."""
        async with anyio.create_task_group() as tg:
            for c in self._pod_containers(sandbox_id):
                tg.start_soon(self._stop_quietly, c)

    async def _stop_quietly(self, c: Container) -> None:
        try:
            async with c.lock:
                if not c.removed:
                    await self._stop_locked(c, 0)
        except PodfsmError as exc:
            log.error("container %s: stop: %s", c.record.id, exc)
