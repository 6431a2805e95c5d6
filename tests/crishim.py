"""A test-only CRI endpoint for the real crictl: Version, Exec, Attach and PortForward answer
URLs of a StreamServer whose ContainerStreams runs each "container" as a local command (in a
network namespace when one is given), so crictl's own SPDY client drives exec and attach
sessions before podfsm has containers."""

from __future__ import annotations

import os
from collections.abc import Sequence

import grpc
from cri_api.v1 import api_pb2 as pb
from cri_api.v1 import api_pb2_grpc as pb_grpc

from podfsm.drivers.conmonattach import ConmonAttach
from podfsm.drivers.procstreams import ProcessStreams, exec_in_netns
from podfsm.faces.stream import AttachRequest, ExecRequest, PortForwardRequest, StreamServer


class CommandContainers:
    """Container id -> the network namespace its commands run in ('' : the host's). Attach
    goes through conmon's attach socket and control FIFO when `monitors` names the
    container's bundle directory, else runs the container's `attach_cmd`."""

    def __init__(self, netns: dict[str, str], attach_cmd: Sequence[str] = ("cat",),
                 monitors: dict[str, str] | None = None) -> None:
        self.netns = netns
        self.attach_cmd = list(attach_cmd)
        self.monitors = monitors or {}
        self.started: list[ProcessStreams] = []

    def _netns(self, container_id: str) -> str | None:
        if container_id not in self.netns:
            raise LookupError(f"container {container_id} not found")
        return self.netns[container_id] or None

    async def exec_stream(self, container_id: str, cmd: Sequence[str], *, tty: bool,
                          stdin: bool, stdout: bool, stderr: bool) -> ProcessStreams:
        proc = await exec_in_netns(self._netns(container_id), cmd, tty=tty, stdin=stdin)
        self.started.append(proc)
        return proc

    async def attach_stream(self, container_id: str, *, tty: bool, stdin: bool, stdout: bool,
                            stderr: bool) -> ProcessStreams:
        bundle = self.monitors.get(container_id)
        if bundle is not None:
            return await ConmonAttach.open(os.path.join(bundle, "attach"),
                                           os.path.join(bundle, "ctl"))
        return await self.exec_stream(container_id, self.attach_cmd, tty=tty, stdin=stdin,
                                      stdout=stdout, stderr=stderr)


class _Runtime(pb_grpc.RuntimeServiceServicer):
    def __init__(self, stream: StreamServer) -> None:
        self.stream = stream

    async def Version(self, request: pb.VersionRequest,
                      context: grpc.aio.ServicerContext) -> pb.VersionResponse:
        return pb.VersionResponse(version="0.1.0", runtime_name="crishim",
                                  runtime_version="0", runtime_api_version="v1")

    async def Exec(self, request: pb.ExecRequest,
                   context: grpc.aio.ServicerContext) -> pb.ExecResponse:
        return pb.ExecResponse(url=self.stream.url_for(ExecRequest(
            request.container_id, tuple(request.cmd), tty=request.tty, stdin=request.stdin,
            stdout=request.stdout, stderr=request.stderr)))

    async def Attach(self, request: pb.AttachRequest,
                     context: grpc.aio.ServicerContext) -> pb.AttachResponse:
        return pb.AttachResponse(url=self.stream.url_for(AttachRequest(
            request.container_id, tty=request.tty, stdin=request.stdin,
            stdout=request.stdout, stderr=request.stderr)))

    async def PortForward(self, request: pb.PortForwardRequest,
                          context: grpc.aio.ServicerContext) -> pb.PortForwardResponse:
        return pb.PortForwardResponse(url=self.stream.url_for(PortForwardRequest(
            request.pod_sandbox_id, tuple(request.port))))


async def serve(stream: StreamServer, socket_path: str) -> grpc.aio.Server:
    server = grpc.aio.server()
    pb_grpc.add_RuntimeServiceServicer_to_server(_Runtime(stream), server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    os.chmod(socket_path, 0o600)
    return server
