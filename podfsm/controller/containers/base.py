"""What the container verbs share: the containers in memory and their locks, record writes with
the machine's moves and their events, lookups, and exit supervision."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import anyio

from podfsm.controller.base import ControllerBase, Sandbox, now
from podfsm.controller.images import ImageManager
from podfsm.core.containerrecords import ContainerRecord, exit_reason
from podfsm.core.containerstates import (
    ContainerState,
    ContainerTrigger,
    lifecycle_kind,
    next_state,
)
from podfsm.core.errors import ContainerNotFound, ContainerPrecondition, PodfsmError
from podfsm.core.records import HistoryEntry, LifecycleEvent, SandboxStatus, TransitionEvent
from podfsm.drivers.base import ContainerDriver

log = logging.getLogger(__name__)


@dataclass
class Container:
    record: ContainerRecord
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    supervisor: anyio.CancelScope | None = None
    removed: bool = False


class ContainerBase(ControllerBase):
    """The containers of a Controller (see podfsm.controller.containers)."""

    def __init__(self, *args: Any, containers: ContainerDriver | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._containers: dict[str, Container] = {}
        self._ctr_names: dict[str, str] = {}  # reserved name -> container id
        self._ctr_driver: ContainerDriver | None = containers

    _image_manager: ImageManager | None

    @property
    def _imgs(self) -> ImageManager:
        if self._image_manager is None:
            raise ContainerPrecondition("containers need an image store")
        return self._image_manager

    @property
    def _cd(self) -> ContainerDriver:
        if self._ctr_driver is None:
            raise ContainerPrecondition("containers need the real drivers (conmon, an image "
                                        "store): this controller runs on fakes")
        return self._ctr_driver

    # -- lookups -----------------------------------------------------------------------------

    def resolve_container_id(self, id_or_prefix: str) -> str:
        """The id of the container `id_or_prefix` names (a full id or a unique prefix)."""
        if id_or_prefix in self._containers:
            return id_or_prefix
        found = [cid for cid in self._containers if id_or_prefix and cid.startswith(id_or_prefix)]
        if len(found) != 1:
            raise ContainerNotFound(id_or_prefix)
        return found[0]

    def _ctr(self, container_id: str) -> Container:
        c = self._containers.get(self.resolve_container_id(container_id))
        if c is None or c.removed:
            raise ContainerNotFound(container_id)
        return c

    def _pod_containers(self, sandbox_id: str) -> list[Container]:
        return [c for c in self._containers.values()
                if c.record.sandbox_id == sandbox_id and not c.removed]

    def container_using_image(self, image_id: str) -> str | None:
        """The id of a container made from the image `image_id`, if any."""
        return next((cid for cid, c in self._containers.items()
                     if c.record.image_id == image_id and not c.removed), None)

    @staticmethod
    def reserved_container_name(rec: ContainerRecord, sb: Sandbox) -> str:
        """Unique per pod as containerd forms it: name, pod name, namespace, uid, attempt."""
        md, pmd = rec.config.metadata, sb.record.config.metadata
        return f"{md.name}_{pmd.name}_{pmd.namespace}_{pmd.uid}_{md.attempt}"

    # -- records, machine and events ---------------------------------------------------------

    async def _csave(self, c: Container, *triggers: ContainerTrigger, error: str | None = None,
                     persist: bool = True, **changes: Any) -> None:
        """Apply `changes`, move the machine by `triggers`, write the record, publish."""
        entries: list[HistoryEntry] = []
        state = c.record.state
        for trig in triggers:
            try:
                dest = next_state(state, trig)
            except ValueError as exc:  # a move the table does not have
                raise ContainerPrecondition(f"container {c.record.id}: {exc}") from None
            entries.append(HistoryEntry(source=state.value, dest=dest.value,
                                        trigger=trig.value, at=now(), error=error))
            state = dest
        if entries:
            changes["state"] = state
            changes["history"] = [*c.record.history, *entries]
        c.record = c.record.evolve(**changes)
        try:
            if persist:
                with anyio.CancelScope(shield=True):
                    await self._cd.save(c.record)
        finally:
            for h in entries:
                self._publish_container(c.record, h)

    def _publish_container(self, rec: ContainerRecord, h: HistoryEntry) -> None:
        self._seq += 1
        ev = TransitionEvent(seq=self._seq, sandbox_id=rec.sandbox_id, source=h.source,
                             dest=h.dest, trigger=h.trigger, at=h.at, error=h.error,
                             container_id=rec.id)
        self._backlog.append(ev)
        for sub in list(self._subscribers):
            sub.put(ev)
        kind = lifecycle_kind(ContainerTrigger(h.trigger), ContainerState(h.source),
                              ContainerState(h.dest))
        sb = self._sandboxes.get(rec.sandbox_id)
        if kind is None or sb is None or not self._lifecycle_subscribers:
            return
        lev = LifecycleEvent(kind=kind, at=h.at, status=SandboxStatus.from_record(sb.record),
                             config=sb.record.config, container_id=rec.id)
        for lsub in list(self._lifecycle_subscribers):
            lsub.put(lev)

    # -- exits -------------------------------------------------------------------------------

    async def _note_exit(self, c: Container) -> bool:
        """If the monitor recorded the container's exit, move it to Exited with the code,
        time and reason; True when it has exited."""
        if c.record.state is not ContainerState.RUNNING:
            return c.record.state is ContainerState.EXITED
        ex = self._cd.exit_of(c.record.id)
        if ex is None:
            if c.record.monitor is not None and not self._cd.alive(c.record.monitor):
                ex = self._cd.exit_of(c.record.id)  # written just before it exited
                if ex is None:
                    await self._csave(c, ContainerTrigger.EXIT, exit_code=255, reason="Error",
                                      message="the monitor exited without an exit code",
                                      finished_at=now())
                    return True
            return False
        await self._csave(c, ContainerTrigger.EXIT, exit_code=ex.code,
                          reason=exit_reason(ex.code, ex.oom), finished_at=ex.at,
                          message="OOM killed" if ex.oom else "")
        return True

    def _supervise_container(self, c: Container) -> None:
        """Watch the monitor in the background: once it exits, record the container's exit."""
        if self._tg is None or c.record.monitor is None:
            return
        scope = anyio.CancelScope()
        c.supervisor = scope
        monitor = c.record.monitor

        async def watch() -> None:
            with scope:
                await self._cd.wait_exit(monitor)
                async with c.lock:
                    if not c.removed:
                        with contextlib.suppress(PodfsmError):
                            await self._note_exit(c)

        self._tg.start_soon(watch)

    def _unsupervise_container(self, c: Container) -> None:
        if c.supervisor is not None:
            c.supervisor.cancel()
            c.supervisor = None
