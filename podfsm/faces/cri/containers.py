"""The container RPCs of runtime.v1.RuntimeService (a mixin of the CRI face's
RuntimeService), each one Controller call; the messages to and from the library's models."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import grpc
from cri_api.v1 import api_pb2 as pb
from google.protobuf.json_format import MessageToDict

from podfsm.controller import Controller
from podfsm.core.containerrecords import ContainerStatus
from podfsm.core.containerspec import ContainerConfig, parse_container_config
from podfsm.core.containerstates import ContainerState
from podfsm.core.errors import ContainerNotFound, ExecTimeout
from podfsm.core.spec import LinuxContainerResources
from podfsm.faces.cri.convert import ns

STATES = {
    ContainerState.CREATED: pb.CONTAINER_CREATED,
    ContainerState.RUNNING: pb.CONTAINER_RUNNING,
    ContainerState.EXITED: pb.CONTAINER_EXITED,
    ContainerState.UNKNOWN: pb.CONTAINER_UNKNOWN,
}
_BY_PB = {v: k for k, v in STATES.items()}
_PROPAGATION = {0: pb.PROPAGATION_PRIVATE, 1: pb.PROPAGATION_HOST_TO_CONTAINER,
                2: pb.PROPAGATION_BIDIRECTIONAL}


def container_config(msg: pb.ContainerConfig) -> ContainerConfig:
    data: dict[str, Any] = MessageToDict(msg, preserving_proto_field_name=True)
    data.setdefault("metadata", {})
    data.setdefault("image", {})
    sig = data.pop("stop_signal", None)
    if sig is not None:
        data["stop_signal"] = sig if isinstance(sig, str) else pb.Signal.Name(sig)
    for m in data.get("mounts", ()):
        for key in ("uidMappings", "gidMappings"):
            if key in m:
                m[key[:3] + "_mappings"] = m.pop(key)
    return parse_container_config(data)


def _metadata(st: ContainerStatus) -> pb.ContainerMetadata:
    return pb.ContainerMetadata(name=st.name, attempt=st.attempt)


def container(st: ContainerStatus) -> pb.Container:
    return pb.Container(
        id=st.id, pod_sandbox_id=st.sandbox_id, metadata=_metadata(st),
        image=pb.ImageSpec(image=st.image), image_ref=st.image_ref, image_id=st.image_id,
        state=STATES[st.state], created_at=ns(st.created_at), labels=st.labels,
        annotations=st.annotations)


def container_status(st: ContainerStatus) -> pb.ContainerStatus:
    return pb.ContainerStatus(
        id=st.id, metadata=_metadata(st), state=STATES[st.state],
        created_at=ns(st.created_at), started_at=ns(st.started_at),
        finished_at=ns(st.finished_at), exit_code=st.exit_code or 0,
        image=pb.ImageSpec(image=st.image), image_ref=st.image_ref, image_id=st.image_id,
        reason=st.reason, message=st.message, labels=st.labels, annotations=st.annotations,
        mounts=[pb.Mount(container_path=m["container_path"], host_path=m["host_path"],
                         readonly=m["readonly"], selinux_relabel=m["selinux_relabel"],
                         propagation=_PROPAGATION[int(m["propagation"])])
                for m in st.mounts],
        log_path=st.log_path)


def _stats(ctl: Controller, s: Any) -> pb.ContainerStats:
    st: ContainerStatus = s.status
    cg = s.cgroup
    ts = s.timestamp_ns
    cpu = pb.CpuUsage(timestamp=ts)
    mem = pb.MemoryUsage(timestamp=ts)
    if cg is not None:
        cpu.usage_core_nano_seconds.value = cg.cpu_usage_ns
        mem.working_set_bytes.value = cg.memory_working_set_bytes
        mem.usage_bytes.value = cg.memory_usage_bytes
        mem.rss_bytes.value = cg.memory_rss_bytes
        mem.page_faults.value = cg.page_faults
        mem.major_page_faults.value = cg.major_page_faults
    fs = pb.FilesystemUsage(timestamp=ts, fs_id=pb.FilesystemIdentifier(mountpoint=""))
    fs.used_bytes.value = s.writable_bytes
    fs.inodes_used.value = s.writable_inodes
    return pb.ContainerStats(
        attributes=pb.ContainerAttributes(id=st.id, metadata=_metadata(st), labels=st.labels,
                                          annotations=st.annotations),
        cpu=cpu, memory=mem, writable_layer=fs)


class ContainerRpcs:
    """CreateContainer .. ReopenContainerLog; `self.ctl` is the Controller. The `_rpc`
    decorator (the server's) is applied by the server module to each of these."""

    ctl: Controller

    async def CreateContainer(self, request: pb.CreateContainerRequest,
                              context: grpc.aio.ServicerContext) -> pb.CreateContainerResponse:
        cfg = container_config(request.config)
        sid = self.ctl.resolve_id(request.pod_sandbox_id)
        cid = await self.ctl.create_container(sid, cfg)
        return pb.CreateContainerResponse(container_id=cid)

    async def StartContainer(self, request: pb.StartContainerRequest,
                             context: grpc.aio.ServicerContext) -> pb.StartContainerResponse:
        await self.ctl.start_container(request.container_id)
        return pb.StartContainerResponse()

    async def StopContainer(self, request: pb.StopContainerRequest,
                            context: grpc.aio.ServicerContext) -> pb.StopContainerResponse:
        with contextlib.suppress(ContainerNotFound):
            await self.ctl.stop_container(request.container_id, float(request.timeout))
        return pb.StopContainerResponse()

    async def RemoveContainer(self, request: pb.RemoveContainerRequest,
                              context: grpc.aio.ServicerContext) -> pb.RemoveContainerResponse:
        await self.ctl.remove_container(request.container_id)
        return pb.RemoveContainerResponse()

    async def ListContainers(self, request: pb.ListContainersRequest,
                             context: grpc.aio.ServicerContext) -> pb.ListContainersResponse:
        f = request.filter
        sts = await self.ctl.list_containers(
            id_prefix=f.id or None,
            state=[_BY_PB[f.state.state]] if f.HasField("state") else None,
            sandbox_id=f.pod_sandbox_id or None, labels=dict(f.label_selector))
        return pb.ListContainersResponse(containers=[container(st) for st in sts])

    async def ContainerStatus(self, request: pb.ContainerStatusRequest,
                              context: grpc.aio.ServicerContext) -> pb.ContainerStatusResponse:
        st = await self.ctl.container_status(request.container_id)
        info: dict[str, str] = {}
        if request.verbose:
            info = {"info": json.dumps(await self.ctl.container_info(st.id))}
        return pb.ContainerStatusResponse(status=container_status(st), info=info)

    async def ContainerStats(self, request: pb.ContainerStatsRequest,
                             context: grpc.aio.ServicerContext) -> pb.ContainerStatsResponse:
        s = await self.ctl.container_stats(request.container_id)
        return pb.ContainerStatsResponse(stats=_stats(self.ctl, s))

    async def ListContainerStats(
        self, request: pb.ListContainerStatsRequest, context: grpc.aio.ServicerContext,
    ) -> pb.ListContainerStatsResponse:
        f = request.filter
        out = []
        for st in await self.ctl.list_containers(
                id_prefix=f.id or None, sandbox_id=f.pod_sandbox_id or None,
                labels=dict(f.label_selector)):
            with contextlib.suppress(ContainerNotFound):
                out.append(_stats(self.ctl, await self.ctl.container_stats(st.id)))
        return pb.ListContainerStatsResponse(stats=out)

    async def UpdateContainerResources(
        self, request: pb.UpdateContainerResourcesRequest, context: grpc.aio.ServicerContext,
    ) -> pb.UpdateContainerResourcesResponse:
        data = MessageToDict(request.linux, preserving_proto_field_name=True)
        await self.ctl.update_container_resources(
            request.container_id, LinuxContainerResources.model_validate(data))
        return pb.UpdateContainerResourcesResponse()

    async def ReopenContainerLog(
        self, request: pb.ReopenContainerLogRequest, context: grpc.aio.ServicerContext,
    ) -> pb.ReopenContainerLogResponse:
        await self.ctl.reopen_container_log(request.container_id)
        return pb.ReopenContainerLogResponse()

    async def ExecSync(self, request: pb.ExecSyncRequest,
                       context: grpc.aio.ServicerContext) -> pb.ExecSyncResponse:
        try:
            res = await self.ctl.exec_sync(request.container_id, list(request.cmd),
                                           float(request.timeout))
        except ExecTimeout as exc:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
            raise AssertionError("unreachable") from None
        return pb.ExecSyncResponse(stdout=res.stdout.encode(), stderr=res.stderr.encode(),
                                   exit_code=res.exit_code)

