"""container_status, list_containers, container_stats and the verbose info: what the records
say, with an exit the monitor recorded since taken in first."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from podfsm.controller.base import now
from podfsm.controller.containers.base import Container, ContainerBase
from podfsm.core.containerrecords import ContainerStatus
from podfsm.core.containerstates import ContainerState
from podfsm.core.records import CgroupStats


@dataclass(frozen=True)
class ContainerStats:
    """CPU and memory of a container's cgroup (None when not running), and the bytes and
    inodes of its writable layer."""

    status: ContainerStatus
    cgroup: CgroupStats | None
    writable_bytes: int
    writable_inodes: int
    timestamp_ns: int


class QueryContainers(ContainerBase):

    async def _fresh(self, c: Container) -> ContainerStatus:
        if c.record.state is ContainerState.RUNNING and not c.lock.locked():
            async with c.lock:
                await self._note_exit(c)
        return ContainerStatus.from_record(c.record)

    async def container_status(self, container_id: str) -> ContainerStatus:
        """The container's status (ContainerNotFound for an unknown id or prefix)."""
        return await self._fresh(self._ctr(container_id))

    async def list_containers(self, *, id_prefix: str | None = None,
                              state: Collection[ContainerState] | None = None,
                              sandbox_id: str | None = None,
                              labels: Mapping[str, str] | None = None,
                              ) -> list[ContainerStatus]:
        """The containers, oldest first, filtered as the CRI's ContainerFilter: an id prefix,
        states, a sandbox (id or prefix), labels that must all match."""
        out = []
        for c in list(self._containers.values()):
            rec = c.record
            if c.removed or (id_prefix and not rec.id.startswith(id_prefix)):
                continue
            if sandbox_id and not rec.sandbox_id.startswith(sandbox_id):
                continue
            if labels and any(rec.config.labels.get(k) != v for k, v in labels.items()):
                continue
            st = await self._fresh(c)
            if state is not None and st.state not in state:
                continue
            out.append(st)
        return sorted(out, key=lambda s: (s.created_at, s.id))

    async def container_stats(self, container_id: str) -> ContainerStats:
        c = self._ctr(container_id)
        st = await self._fresh(c)
        cg = None
        if st.state is ContainerState.RUNNING and c.record.task is not None:
            cg = self._host.cgroup_stats(c.record.task.pid)
        size, inodes = self._cd.usage(c.record.id)
        ts = cg.timestamp_ns if cg is not None else int(now().timestamp() * 1e9)
        return ContainerStats(st, cg, size, inodes, ts)

    async def container_info(self, container_id: str) -> dict[str, Any]:
        """The verbose status's info: pid, the OCI spec, the record's history and problems."""
        c = self._ctr(container_id)
        rec = c.record
        return {
            "sandboxID": rec.sandbox_id,
            "pid": rec.task.pid if rec.task else 0,
            "monitorPid": rec.monitor.pid if rec.monitor else 0,
            "runtimeHandler": rec.runtime,
            "runtimeSpec": self._cd.read_spec(rec.id),
            "config": rec.config.model_dump(mode="json"),
            "bundle": rec.dir,
            "lastError": rec.last_error,
            "history": [h.model_dump(mode="json") for h in rec.history],
        }
