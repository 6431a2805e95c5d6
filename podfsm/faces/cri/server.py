"""The CRI v1 gRPC server: runtime.v1.RuntimeService and runtime.v1.ImageService for pod
sandboxes, each RPC one Controller call (see docs/cri.md).

Served: Version, Status, RuntimeConfig, UpdateRuntimeConfig, RunPodSandbox, StopPodSandbox,
RemovePodSandbox, PodSandboxStatus, ListPodSandbox, PodSandboxStats, ListPodSandboxStats,
GetContainerEvents (sandbox and container events), the container RPCs (faces/cri/containers.py:
CreateContainer, StartContainer, StopContainer, RemoveContainer, ListContainers,
ContainerStatus, ContainerStats, ListContainerStats, UpdateContainerResources,
ReopenContainerLog, ExecSync; see docs/containers.md) and the whole ImageService (PullImage,
ListImages, ImageStatus, RemoveImage, ImageFsInfo; see docs/images.md). Every other RPC (Exec,
Attach, PortForward: streaming arrives later) answers UNIMPLEMENTED.

Errors, as containerd maps them: a refused config INVALID_ARGUMENT, a name in use
ALREADY_EXISTS, an unknown id (status, stats) NOT_FOUND, a missing prerequisite
FAILED_PRECONDITION, a recovering or closing controller UNAVAILABLE, a failed step UNKNOWN with
the step's error; a bad image reference INVALID_ARGUMENT, a failed pull UNKNOWN naming what
failed (a digest that did not match), a pull past its deadline DEADLINE_EXCEEDED, an image in
use FAILED_PRECONDITION. Stop and remove of an unknown id succeed (they are idempotent), and so
does the removal of an unknown image.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import grpc
from cri_api.v1 import api_pb2 as pb
from cri_api.v1 import api_pb2_grpc as pb_grpc

from podfsm import __version__
from podfsm.controller import Controller
from podfsm.core.errors import (
    ContainerNotFound,
    ImageInUse,
    ImageNotFound,
    ImageNotInRegistry,
    InvalidImageReference,
    InvalidPodConfig,
    InvalidPullRequest,
    NameReserved,
    PodfsmError,
    PrerequisiteMissing,
    SandboxNotFound,
    StateDirError,
)
from podfsm.core.registryhosts import auth_from_cri
from podfsm.faces.cri import convert
from podfsm.faces.cri.containers import ContainerRpcs
from podfsm.faces.sockets import stale_socket_problem, unlink_if_ours

log = logging.getLogger(__name__)

DEFAULT_CRI_SOCKET = "/run/podfsm/cri.sock"
SOCKET_MODE = 0o660
#: The CRI API version this server speaks (VersionResponse.version is the kubelet API's).
KUBELET_API_VERSION = "0.1.0"
RUNTIME_NAME = "podfsm"
ONLY_SANDBOXES = ("podfsm does not serve {rpc} yet (streaming: Exec, Attach and PortForward "
                  "arrive with a later issue)")

R = TypeVar("R")
Rpc = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[R]]


def status_code(exc: PodfsmError) -> grpc.StatusCode:
    """The gRPC status of a podfsm error."""
    if isinstance(exc, InvalidPodConfig | InvalidPullRequest):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, NameReserved):
        return grpc.StatusCode.ALREADY_EXISTS
    if isinstance(exc, SandboxNotFound | ImageNotFound | ImageNotInRegistry
                  | ContainerNotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, PrerequisiteMissing | ImageInUse):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, StateDirError):
        return grpc.StatusCode.INTERNAL
    return grpc.StatusCode.UNKNOWN


def _rpc(fn: Rpc[R]) -> Rpc[R]:
    """Refuse while the controller is not serving; turn podfsm errors into gRPC statuses."""

    @functools.wraps(fn)
    async def call(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        ctl: Controller = self.ctl
        if ctl.recovering or not self.serving:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "podfsm is not ready: recovering or shutting down")
        try:
            return await fn(self, request, context)
        except PodfsmError as exc:
            code, message = status_code(exc), str(exc)
        log.info("CRI %s: %s: %s", fn.__name__, code.name, message)
        await context.abort(code, message)
        raise AssertionError("unreachable: abort raises")

    return call


class RuntimeService(ContainerRpcs, pb_grpc.RuntimeServiceServicer):
    """runtime.v1.RuntimeService: pod sandboxes here, containers in ContainerRpcs."""

    def __init__(self, ctl: Controller) -> None:
        self.ctl = ctl
        self.serving = True
        self._streams: set[anyio.CancelScope] = set()
        #: the pod CIDRs the kubelet gave in UpdateRuntimeConfig (reported, not applied)
        self.pod_cidrs: list[str] = []

    @_rpc
    async def Version(self, request: pb.VersionRequest,
                      context: grpc.aio.ServicerContext) -> pb.VersionResponse:
        return pb.VersionResponse(version=KUBELET_API_VERSION, runtime_name=RUNTIME_NAME,
                                  runtime_version=__version__, runtime_api_version="v1")

    @_rpc
    async def Status(self, request: pb.StatusRequest,
                     context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        ctl = self.ctl
        conditions = [pb.RuntimeCondition(type=c.type, status=c.status, reason=c.reason,
                                          message=c.message) for c in ctl.conditions()]
        handlers = [pb.RuntimeHandler(name=name, features=pb.RuntimeHandlerFeatures(
            user_namespaces=True, recursive_read_only_mounts=False))
            for name in ctl.runtime_handlers]
        info: dict[str, str] = {}
        if request.verbose:
            net = next(c for c in ctl.conditions() if c.type == "NetworkReady")
            info = {
                "config": ctl.config.model_dump_json(),
                "runtimeHandlers": json.dumps(ctl.runtime_handlers),
                "defaultRuntimeHandler": json.dumps(ctl.runtime_handlers[0]),
                "cgroupDriver": json.dumps(ctl.cgroup_driver),
                "lastCNILoadStatus": json.dumps("OK" if net.status else net.message),
                "recoveryProblems": json.dumps(ctl.recovery_problems),
                "sandboxes": json.dumps(len(await ctl.list_sandboxes())),
                "podCIDRs": json.dumps(self.pod_cidrs),
            }
        return pb.StatusResponse(status=pb.RuntimeStatus(conditions=conditions), info=info,
                                 runtime_handlers=handlers)

    @_rpc
    async def UpdateRuntimeConfig(
        self, request: pb.UpdateRuntimeConfigRequest, context: grpc.aio.ServicerContext,
    ) -> pb.UpdateRuntimeConfigResponse:
        """The kubelet sends the node's pod CIDRs at start. containerd uses them only to write
        a CNI config from its conf_template and, without one, accepts them and leaves the
        network to the CNI config on disk; so does podfsm (it has no template), after checking
        them, and reports them in the verbose Status."""
        text = request.runtime_config.network_config.pod_cidr
        try:
            cidrs = convert.pod_cidrs(text)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if cidrs:
            self.pod_cidrs = cidrs
            log.info("CRI UpdateRuntimeConfig: pod CIDRs %s (the CNI network is the one on "
                     "disk: podfsm writes no config from them)", ", ".join(cidrs))
        return pb.UpdateRuntimeConfigResponse()

    @_rpc
    async def RuntimeConfig(self, request: pb.RuntimeConfigRequest,
                            context: grpc.aio.ServicerContext) -> pb.RuntimeConfigResponse:
        driver = pb.CgroupDriver.Value(self.ctl.cgroup_driver.upper())
        return pb.RuntimeConfigResponse(linux=pb.LinuxRuntimeConfiguration(cgroup_driver=driver))

    @_rpc
    async def RunPodSandbox(self, request: pb.RunPodSandboxRequest,
                            context: grpc.aio.ServicerContext) -> pb.RunPodSandboxResponse:
        pod = convert.pod_config(request.config)
        st = await self.ctl.run_sandbox(pod, runtime_handler=request.runtime_handler or None)
        return pb.RunPodSandboxResponse(pod_sandbox_id=st.id)

    @_rpc
    async def StopPodSandbox(self, request: pb.StopPodSandboxRequest,
                             context: grpc.aio.ServicerContext) -> pb.StopPodSandboxResponse:
        with contextlib.suppress(SandboxNotFound):
            await self.ctl.stop_sandbox(self.ctl.resolve_id(request.pod_sandbox_id))
        return pb.StopPodSandboxResponse()

    @_rpc
    async def RemovePodSandbox(self, request: pb.RemovePodSandboxRequest,
                               context: grpc.aio.ServicerContext) -> pb.RemovePodSandboxResponse:
        with contextlib.suppress(SandboxNotFound):
            await self.ctl.remove_sandbox(self.ctl.resolve_id(request.pod_sandbox_id))
        return pb.RemovePodSandboxResponse()

    @_rpc
    async def PodSandboxStatus(self, request: pb.PodSandboxStatusRequest,
                               context: grpc.aio.ServicerContext) -> pb.PodSandboxStatusResponse:
        ctl = self.ctl
        sid = ctl.resolve_id(request.pod_sandbox_id)
        st = await ctl.sandbox_status(sid)
        status = convert.sandbox_status(st, await ctl.sandbox_config(sid))
        info = {"info": json.dumps(await ctl.sandbox_info(sid))} if request.verbose else {}
        return pb.PodSandboxStatusResponse(status=status, info=info, timestamp=time.time_ns())

    @_rpc
    async def ListPodSandbox(self, request: pb.ListPodSandboxRequest,
                             context: grpc.aio.ServicerContext) -> pb.ListPodSandboxResponse:
        f = request.filter
        items = await self.ctl.list_sandboxes(
            id_prefix=f.id or None,
            state=convert.states(f.state) if f.HasField("state") else None,
            labels=dict(f.label_selector))
        return pb.ListPodSandboxResponse(items=[convert.pod_sandbox(st) for st in items])

    @_rpc
    async def PodSandboxStats(self, request: pb.PodSandboxStatsRequest,
                              context: grpc.aio.ServicerContext) -> pb.PodSandboxStatsResponse:
        sid = self.ctl.resolve_id(request.pod_sandbox_id)
        st = await self.ctl.sandbox_status(sid)
        stats = await self.ctl.sandbox_stats(sid)
        return pb.PodSandboxStatsResponse(stats=convert.sandbox_stats(st, stats))

    @_rpc
    async def ListPodSandboxStats(
        self, request: pb.ListPodSandboxStatsRequest, context: grpc.aio.ServicerContext,
    ) -> pb.ListPodSandboxStatsResponse:
        f = request.filter
        out = []
        for st in await self.ctl.list_sandboxes(id_prefix=f.id or None,
                                                labels=dict(f.label_selector)):
            with contextlib.suppress(SandboxNotFound):  # removed meanwhile
                out.append(convert.sandbox_stats(st, await self.ctl.sandbox_stats(st.id)))
        return pb.ListPodSandboxStatsResponse(stats=out)

    async def GetContainerEvents(self, request: pb.GetEventsRequest,
                                 context: grpc.aio.ServicerContext) -> None:
        """Sandbox lifecycle events from now on, until the client goes or the server stops
        (which ends the stream with OK at once instead of holding its shutdown open)."""
        if self.ctl.recovering or not self.serving:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "podfsm is not ready: recovering or shutting down")
        with anyio.CancelScope() as scope:
            self._streams.add(scope)
            try:
                async with contextlib.aclosing(self.ctl.lifecycle_events()) as events:
                    async for ev in events:
                        await context.write(convert.container_event(ev, ev.config))
            finally:
                self._streams.discard(scope)

    def end_streams(self) -> None:
        """End every open event stream (at shutdown)."""
        self.serving = False
        for scope in list(self._streams):
            scope.cancel()


# the container RPCs (faces/cri/containers.py) get the same refusal and error mapping
for _name, _fn in list(vars(ContainerRpcs).items()):
    if _name[:1].isupper() and callable(_fn):
        setattr(RuntimeService, _name, _rpc(_fn))


class ImageService(pb_grpc.ImageServiceServicer):
    """runtime.v1.ImageService: pull, list, status, remove, and the image store's usage."""

    def __init__(self, ctl: Controller) -> None:
        self.ctl = ctl
        self.serving = True

    @_rpc
    async def PullImage(self, request: pb.PullImageRequest,
                        context: grpc.aio.ServicerContext) -> pb.PullImageResponse:
        a = request.auth
        auth = auth_from_cri(a.username, a.password, a.auth, a.identity_token, a.registry_token)
        left = context.time_remaining()
        try:
            img = await self.ctl.pull_image(request.image.image, auth, timeout=left)
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"pulling {request.image.image}: deadline exceeded; nothing "
                                "of it was kept")
        return pb.PullImageResponse(image_ref=img.id)

    @_rpc
    async def ListImages(self, request: pb.ListImagesRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListImagesResponse:
        ref = request.filter.image.image if request.HasField("filter") else ""
        try:
            images = await self.ctl.list_images(ref or None)
        except InvalidImageReference:
            images = []
        return pb.ListImagesResponse(images=[convert.image(i) for i in images])

    @_rpc
    async def ImageStatus(self, request: pb.ImageStatusRequest,
                          context: grpc.aio.ServicerContext) -> pb.ImageStatusResponse:
        """An unknown image is no error: the answer has no image (as containerd)."""
        try:
            img = await self.ctl.image_status(request.image.image)
        except ImageNotFound:
            return pb.ImageStatusResponse()
        info = ({"info": json.dumps(await self.ctl.image_info(img.id))}
                if request.verbose else {})
        return pb.ImageStatusResponse(image=convert.image(img), info=info)

    @_rpc
    async def RemoveImage(self, request: pb.RemoveImageRequest,
                          context: grpc.aio.ServicerContext) -> pb.RemoveImageResponse:
        await self.ctl.remove_image(request.image.image)
        return pb.RemoveImageResponse()

    @_rpc
    async def ImageFsInfo(self, request: pb.ImageFsInfoRequest,
                          context: grpc.aio.ServicerContext) -> pb.ImageFsInfoResponse:
        usage = [convert.filesystem_usage(fs) for fs in await self.ctl.image_fs_info()]
        return pb.ImageFsInfoResponse(image_filesystems=usage)


def _unimplemented(rpc: str) -> Callable[..., Any]:
    # A coroutine serves streaming RPCs too (grpc.aio awaits it; it writes nothing).
    message = ONLY_SANDBOXES.format(rpc=rpc)

    async def refuse(self: Any, request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    refuse.__name__ = rpc
    return refuse


def _fill_unimplemented(cls: type, service: str) -> None:
    """Answer every RPC of `service` that `cls` does not serve with UNIMPLEMENTED (the
    generated base class would answer it too, but with a message that says nothing)."""
    for method in pb.DESCRIPTOR.services_by_name[service].methods:
        if method.name not in cls.__dict__:
            setattr(cls, method.name, _unimplemented(method.name))


_fill_unimplemented(RuntimeService, "RuntimeService")
_fill_unimplemented(ImageService, "ImageService")


class CriServer:
    """The gRPC server of one Controller on a unix socket.

    `start()` binds a temporary name beside `socket_path`, narrows its mode to 0660 and renames
    it into place, so the socket appears only when it answers; call it after the Controller
    has recovered. `stop()` ends open streams after `grace` seconds and removes the socket.
    """

    def __init__(self, ctl: Controller, socket_path: str = DEFAULT_CRI_SOCKET) -> None:
        self.ctl = ctl
        self.socket_path = os.path.abspath(socket_path)
        self._runtime = RuntimeService(ctl)
        self._image = ImageService(ctl)
        self._server: grpc.aio.Server | None = None
        self._inode: int | None = None

    async def start(self) -> None:
        path = self.socket_path
        if len(os.fsencode(path)) > 100:  # room for the temporary name's suffix
            raise PrerequisiteMissing(f"CRI socket path {path!r} is over 100 bytes")
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        _clear_stale_socket(path)
        tmp = f"{path}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        server = grpc.aio.server()
        pb_grpc.add_RuntimeServiceServicer_to_server(self._runtime, server)  # type: ignore[no-untyped-call]
        pb_grpc.add_ImageServiceServicer_to_server(self._image, server)  # type: ignore[no-untyped-call]
        try:
            server.add_insecure_port(f"unix:{tmp}")
            await server.start()
        except Exception as exc:
            await server.stop(None)
            raise PrerequisiteMissing(f"cannot listen on CRI socket {tmp}: {exc}") from None
        try:
            os.chmod(tmp, SOCKET_MODE)
            os.rename(tmp, path)
            self._inode = os.lstat(path).st_ino
        except OSError as exc:
            await server.stop(None)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise PrerequisiteMissing(f"cannot put the CRI socket at {path}: {exc}") from None
        self._server = server
        log.info("CRI v1 (runtime.v1) on unix socket %s (mode %o), handlers %s", path,
                 SOCKET_MODE, ", ".join(self.ctl.runtime_handlers))

    async def stop(self, grace: float | None = 2.0) -> None:
        self._image.serving = False
        self._runtime.end_streams()
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace)
        if self._inode is not None:
            unlink_if_ours(self.socket_path, self._inode)
            self._inode = None


def _clear_stale_socket(path: str) -> None:
    problem = stale_socket_problem(path)
    if problem is not None:
        raise PrerequisiteMissing(f"CRI socket: {problem}")
