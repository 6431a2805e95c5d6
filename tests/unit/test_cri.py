"""The CRI face (podfsm.faces.cri) on a real gRPC server on a unix socket, over a Controller with
the fake drivers and two runtime handlers: every served RPC, every error code, the event stream,
the UNIMPLEMENTED answers, the socket's life; and the library calls it maps onto (runtime handler
per sandbox, list filters, id prefixes, lifecycle events). No root needed; the same against real
sandboxes, crictl and critest is tests/integration/test_cri.py."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest
from cri_api.v1 import api_pb2 as pb
from cri_api.v1 import api_pb2_grpc as pb_grpc

from podfsm import Controller
from podfsm.core.errors import (
    InvalidPodConfig,
    PrerequisiteMissing,
    SandboxNotFound,
    StepFailed,
)
from podfsm.core.states import State, lifecycle_kind
from podfsm.drivers.base import NetworkDriver
from podfsm.faces.cri import CriServer
from podfsm.faces.stream import PortForwardRequest, StreamServer
from tests.fakes import FakeRuntime, Rig


class OtherRuntime(FakeRuntime):
    name = "fake2"


def cri_pod(name: str, **labels: str) -> pb.PodSandboxConfig:
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, namespace="ns", uid=f"uid-{name}"),
        labels=labels,
        linux=pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(
            namespace_options=pb.NamespaceOption(userns_options=pb.UserNamespace(mode=pb.POD)))))


async def code_of(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details()


class World:
    def __init__(self, ctl: Controller, server: CriServer, channel: grpc.aio.Channel,
                 other: OtherRuntime) -> None:
        self.ctl = ctl
        self.server = server
        self.rt = pb_grpc.RuntimeServiceStub(channel)
        self.img = pb_grpc.ImageServiceStub(channel)
        self.other = other


@contextlib.asynccontextmanager
async def serving(rig: Rig, sock_dir: str, network: NetworkDriver | None = None,
                  stream: StreamServer | None = None) -> AsyncIterator[World]:
    """The CRI server over an entered Controller on the rig's fakes (and `network`, when
    given), with a second runtime handler; not a fixture: the Controller's task group must be
    entered and left in one task."""
    other = OtherRuntime(rig.faults)
    ctl = Controller(rig.cfg, namespaces=rig.ns, network=network or rig.net, runtime=rig.rt,
                     runtimes=[other], store=rig.store)
    path = os.path.join(sock_dir, "cri.sock")
    async with ctl:
        server = CriServer(ctl, path, stream)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
                yield World(ctl, server, channel, other)
        finally:
            rig.faults.fail.clear()
            ctl.recovering = False
            for st in await ctl.list_sandboxes():
                await ctl.remove_sandbox(st.id)
            await server.stop()
    await rig.rt.kill_all()
    await other.kill_all()
    rig.nothing_left()
    assert other.containers == {}


async def test_status_says_user_namespaces_false_for_a_handler_that_cannot_idmap(
        rig: Rig, sock_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with serving(rig, sock_dir) as world:
        monkeypatch.setattr(world.ctl, "user_namespaces_problem",
                            lambda name: "kernel 5.15 is older than 5.19" if name == "fake"
                            else None)
        s = await world.rt.Status(pb.StatusRequest())
        assert [(h.name, h.features.user_namespaces) for h in s.runtime_handlers] == [
            ("fake", False), ("", False), ("fake2", True)]


async def test_version_status_runtime_config_and_image_fs(rig: Rig, sock_dir: str) -> None:
    async with serving(rig, sock_dir) as world:
        v = await world.rt.Version(pb.VersionRequest(version="v1"))
        assert (v.runtime_name, v.runtime_api_version) == ("podfsm", "v1") and v.runtime_version
        s = await world.rt.Status(pb.StatusRequest(verbose=True))
        conds = {c.type: c.status for c in s.status.conditions}
        assert conds == {"RuntimeReady": True, "NetworkReady": True}
        # the default handler is listed again under "", as containerd does
        assert [(h.name, h.features.user_namespaces) for h in s.runtime_handlers] == [
            ("fake", True), ("", True), ("fake2", True)]
        assert json.loads(s.info["runtimeHandlers"]) == ["fake", "fake2"]
        assert json.loads(s.info["config"])["state_dir"] == world.ctl.config.state_dir
        rc = await world.rt.RuntimeConfig(pb.RuntimeConfigRequest())
        assert rc.linux.cgroup_driver == pb.CGROUPFS
        fs = await world.img.ImageFsInfo(pb.ImageFsInfoRequest())
        assert fs.image_filesystems and fs.image_filesystems[0].used_bytes.value > 0
        assert fs.image_filesystems[0].fs_id.mountpoint.startswith("/")


async def test_update_runtime_config_takes_the_pod_cidrs_and_reports_them(
    rig: Rig, sock_dir: str,
) -> None:
    """What a kubelet sends at start: accepted as containerd does without a conf template
    (the network stays the CNI config on disk), reported in the verbose Status; a value that is
    not a CIDR is refused naming it, and changes nothing."""
    def update(cidr: str) -> Any:
        return world.rt.UpdateRuntimeConfig(pb.UpdateRuntimeConfigRequest(
            runtime_config=pb.RuntimeConfig(network_config=pb.NetworkConfig(pod_cidr=cidr))))

    async def reported() -> Any:
        s = await world.rt.Status(pb.StatusRequest(verbose=True))
        return json.loads(s.info["podCIDRs"])

    async with serving(rig, sock_dir) as world:
        assert await reported() == []
        await update("")  # nothing to take: OK
        await update("10.244.1.7/24, fd00:10:244:1::/64")
        assert await reported() == ["10.244.1.0/24", "fd00:10:244:1::/64"]
        for bad in ("10.244.1.0", "10.244.1.0/24,bogus/8", "10.244.1.0/33"):
            code, msg = await code_of(update(bad))
            assert code is grpc.StatusCode.INVALID_ARGUMENT and "is not a CIDR" in msg, msg
        assert await reported() == ["10.244.1.0/24", "fd00:10:244:1::/64"]
        await update("")  # an empty one leaves them as they were, as containerd
        assert await reported() == ["10.244.1.0/24", "fd00:10:244:1::/64"]


async def test_a_sandbox_through_its_life_on_the_handler_it_asked_for(
        rig: Rig, sock_dir: str) -> None:
    async with serving(rig, sock_dir) as world:
        run = await world.rt.RunPodSandbox(pb.RunPodSandboxRequest(
            config=cri_pod("a", app="x"), runtime_handler="fake2"))
        sid = run.pod_sandbox_id
        assert sid in world.other.containers  # made by the handler asked for
        st = (await world.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(
            pod_sandbox_id=sid[:12], verbose=True)))
        assert st.status.id == sid and st.status.state == pb.SANDBOX_READY
        assert st.status.runtime_handler == "fake2" and st.status.labels == {"app": "x"}
        assert st.status.metadata.name == "a" and st.status.network.ip
        us = st.status.linux.namespaces.options.userns_options
        assert us.mode == pb.POD and us.uids[0].length == 65536 and us.uids[0].host_id >= 65536
        info = json.loads(st.info["info"])
        assert info["runtimeHandler"] == "fake2" and info["pid"] > 0
        assert info["config"]["metadata"]["name"] == "a"
        assert [h["dest"] for h in info["podfsm"]["history"]][-1] == "Ready"
        stats = await world.rt.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id=sid))
        assert stats.stats.attributes.id == sid and stats.stats.attributes.labels == {"app": "x"}
        listed = await world.rt.ListPodSandboxStats(pb.ListPodSandboxStatsRequest())
        assert [s.attributes.id for s in listed.stats] == [sid]
        for _ in range(2):  # idempotent
            await world.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid))
        assert world.other.containers == {}  # torn down by its own handler
        st = await world.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid))
        assert st.status.state == pb.SANDBOX_NOTREADY
        for _ in range(2):
            await world.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid))
        assert (await world.rt.ListPodSandbox(pb.ListPodSandboxRequest())).items == []


async def test_remove_of_a_ready_sandbox_stops_it_first(rig: Rig, sock_dir: str) -> None:
    async with serving(rig, sock_dir) as world:
        sid = (await world.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cri_pod("r")))
               ).pod_sandbox_id
        assert sid in world.ctl._runtime("fake").containers  # type: ignore[attr-defined]
        await world.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid))
        code, _ = await code_of(world.rt.PodSandboxStatus(
            pb.PodSandboxStatusRequest(pod_sandbox_id=sid)))
        assert code is grpc.StatusCode.NOT_FOUND


async def test_list_filters_are_applied_by_the_server(rig: Rig, sock_dir: str) -> None:
    async with serving(rig, sock_dir) as world:
        ids = {}
        for name, app in (("p1", "web"), ("p2", "web"), ("p3", "db")):
            ids[name] = (await world.rt.RunPodSandbox(pb.RunPodSandboxRequest(
                config=cri_pod(name, app=app, tier=name)))).pod_sandbox_id
        await world.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=ids["p2"]))

        async def listed(**f: Any) -> list[str]:
            resp = await world.rt.ListPodSandbox(pb.ListPodSandboxRequest(
                filter=pb.PodSandboxFilter(**f)))
            return sorted(next(k for k, v in ids.items() if v == i.id) for i in resp.items)

        assert await listed() == ["p1", "p2", "p3"]
        assert await listed(id=ids["p3"][:10]) == ["p3"]
        assert await listed(id=ids["p3"]) == ["p3"]
        assert await listed(id="") == ["p1", "p2", "p3"]
        assert await listed(id="zz") == []
        ready = pb.PodSandboxStateValue(state=pb.SANDBOX_READY)
        notready = pb.PodSandboxStateValue(state=pb.SANDBOX_NOTREADY)
        assert await listed(state=ready) == ["p1", "p3"]
        assert await listed(state=notready) == ["p2"]
        assert await listed(label_selector={"app": "web"}) == ["p1", "p2"]
        assert await listed(label_selector={"app": "web", "tier": "p1"}) == ["p1"]
        assert await listed(label_selector={"app": "web"}, state=ready) == ["p1"]
        assert await listed(label_selector={"nope": "web"}) == []
        stats = await world.rt.ListPodSandboxStats(pb.ListPodSandboxStatsRequest(
            filter=pb.PodSandboxStatsFilter(label_selector={"app": "db"})))
        assert [s.attributes.id for s in stats.stats] == [ids["p3"]]


async def test_every_error_code(rig: Rig, sock_dir: str) -> None:
    async with serving(rig, sock_dir) as world:
        rt = world.rt
        code, msg = await code_of(rt.RunPodSandbox(pb.RunPodSandboxRequest(
            config=cri_pod("h"), runtime_handler="youki")))
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "youki" in msg
        bad = cri_pod("bad")
        bad.hostname = "Not_A_Label"
        code, msg = await code_of(rt.RunPodSandbox(pb.RunPodSandboxRequest(config=bad)))
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "hostname" in msg
        await rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cri_pod("dup")))
        code, msg = await code_of(rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cri_pod("dup"))))
        assert code is grpc.StatusCode.ALREADY_EXISTS and "reserved" in msg
        for call in (rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id="f" * 64)),
                     rt.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id="nope")),
                     rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=""))):
            code, msg = await code_of(call)
            assert code is grpc.StatusCode.NOT_FOUND and "not found" in msg
        # stop and remove of an unknown id succeed
        await rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id="f" * 64))
        await rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id="f" * 64))
        rig.faults.fail.add("runtime.create")
        code, msg = await code_of(rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cri_pod("f"))))
        assert code is grpc.StatusCode.UNKNOWN
        assert "create_container" in msg and "fake runtime.create failure" in msg
        rig.faults.fail.clear()
        assert [s.name for s in await world.ctl.list_sandboxes()] == ["dup"]  # nothing of "f"
        for call in (rt.Exec(pb.ExecRequest()), rt.Attach(pb.AttachRequest())):
            code, msg = await code_of(call)  # no streaming server in this world
            assert code is grpc.StatusCode.UNIMPLEMENTED and "streaming server" in msg
        # a container config without metadata and image is refused naming them
        code, msg = await code_of(rt.CreateContainer(pb.CreateContainerRequest()))
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert "metadata.name" in msg and "image.image" in msg, msg
        code, msg = await code_of(rt.ContainerStatus(pb.ContainerStatusRequest(
            container_id="nope")))
        assert code is grpc.StatusCode.NOT_FOUND and "not found" in msg
        world.ctl.recovering = True
        try:
            for call in (rt.Version(pb.VersionRequest()),
                         rt.ListPodSandbox(pb.ListPodSandboxRequest()),
                         world.img.ImageFsInfo(pb.ImageFsInfoRequest())):
                code, _ = await code_of(call)
                assert code is grpc.StatusCode.UNAVAILABLE
        finally:
            world.ctl.recovering = False


async def test_the_event_stream_carries_each_sandbox_event_with_its_status(
        rig: Rig, sock_dir: str) -> None:
    async with serving(rig, sock_dir) as world:
        got: list[pb.ContainerEventResponse] = []
        stream = world.rt.GetContainerEvents(pb.GetEventsRequest())

        async def read() -> None:
            async for ev in stream:
                got.append(ev)
                if ev.container_event_type == pb.CONTAINER_DELETED_EVENT:
                    return

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            while not world.ctl._lifecycle_subscribers:  # noqa: ASYNC110
                await anyio.sleep(0.01)
            sid = (await world.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cri_pod("e")))
                   ).pod_sandbox_id
            await world.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid))
            await world.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid))
            with anyio.fail_after(10):
                while len(got) < 4:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
        stream.cancel()
        assert [(e.container_id, e.container_event_type) for e in got] == [
            (sid, pb.CONTAINER_CREATED_EVENT), (sid, pb.CONTAINER_STARTED_EVENT),
            (sid, pb.CONTAINER_STOPPED_EVENT), (sid, pb.CONTAINER_DELETED_EVENT)]
        assert [e.pod_sandbox_status.state for e in got][1:3] == [pb.SANDBOX_READY,
                                                                  pb.SANDBOX_NOTREADY]
        assert all(e.pod_sandbox_status.id == sid and e.created_at > 0 for e in got)
        assert got[0].pod_sandbox_status.metadata.name == "e"


async def test_the_socket_appears_at_start_mode_0660_and_goes_at_stop(
        rig: Rig, sock_dir: str) -> None:
    path = os.path.join(sock_dir, "cri.sock")
    async with rig.controller() as ctl:
        server = CriServer(ctl, path)
        assert not os.path.exists(path)
        await server.start()
        try:
            assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660
            assert os.listdir(sock_dir) == ["cri.sock"]  # no temporary name left
            with pytest.raises(PrerequisiteMissing, match="already answers"):
                await CriServer(ctl, path).start()
        finally:
            await server.stop()
        assert not os.path.exists(path)
        # a stale socket (nobody answers) is replaced; any other file is refused
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(path)
        await server.start()
        await server.stop()
        Path(path).touch()
        with pytest.raises(PrerequisiteMissing, match="not a socket"):
            await CriServer(ctl, path).start()
        os.unlink(path)


async def test_the_library_calls_the_face_maps_onto(rig: Rig) -> None:
    other = OtherRuntime(rig.faults)
    ctl = Controller(rig.cfg, namespaces=rig.ns, network=rig.net, runtime=rig.rt,
                     runtimes=[other], store=rig.store)
    async with ctl:
        assert ctl.runtime_handlers == ["fake", "fake2"]
        pod = {"metadata": {"name": "lib"}, "labels": {"k": "v"}}
        with pytest.raises(InvalidPodConfig, match=r"'nope'.*installed: fake, fake2"):
            await ctl.run_sandbox(pod, runtime_handler="nope")
        a = await ctl.run_sandbox(pod, runtime_handler="fake2")
        b = await ctl.run_sandbox({"metadata": {"name": "lib2"}}, runtime_handler="")
        assert (a.runtime, b.runtime) == ("fake2", "fake")
        assert ctl.resolve_id(a.id[:8]) == a.id
        with pytest.raises(SandboxNotFound):
            ctl.resolve_id("")
        assert [s.id for s in await ctl.list_sandboxes(labels={"k": "v"})] == [a.id]
        assert [s.id for s in await ctl.list_sandboxes(state=State.READY)] == [a.id, b.id]
        assert await ctl.list_sandboxes(state=[State.NOT_READY]) == []
        stats = await ctl.sandbox_stats(a.id)
        assert stats.id == a.id
        for st in (a, b):
            await ctl.remove_sandbox(st.id)
    await other.kill_all()
    rig.nothing_left()
    assert other.containers == {}


@pytest.mark.parametrize(("trigger", "source", "dest", "kind"), [
    ("create_container", "NamespacesReady", "ContainerCreated", "created"),
    ("mark_ready", "TaskRunning", "Ready", "started"),
    ("task_exit", "Ready", "NotReady", "stopped"),
    ("stop", "Ready", "NotReady", "stopped"),
    ("stop", "NotReady", "NotReady", None),
    ("kill_task", "TaskRunning", "ContainerCreated", "stopped"),
    ("delete_container", "ContainerCreated", "NamespacesReady", "deleted"),
    ("remove", "NotReady", "Unknown", "deleted"),
    ("setup_namespaces", "Unknown", "NamespacesReady", None),
])
def test_lifecycle_kinds(trigger: str, source: str, dest: str, kind: str | None) -> None:
    assert lifecycle_kind(trigger, source, dest) == kind


async def test_recovery_puts_each_sandbox_back_on_its_own_handler(rig: Rig) -> None:
    other = OtherRuntime(rig.faults)

    def controller(*extra: FakeRuntime) -> Controller:
        return Controller(rig.cfg, namespaces=rig.ns, network=rig.net, runtime=rig.rt,
                          runtimes=list(extra), store=rig.store)

    async with controller(other) as ctl:
        a = await ctl.run_sandbox({"metadata": {"name": "a"}}, runtime_handler="fake2")
        b = await ctl.run_sandbox({"metadata": {"name": "b"}})
    async with controller(other) as ctl:  # fake2 still says a's container runs
        assert (await ctl.sandbox_status(a.id)).state is State.READY
        assert (await ctl.sandbox_status(b.id)).state is State.READY
        await ctl.stop_sandbox(a.id)
        assert other.containers == {} and b.id in rig.rt.containers
        a2 = await ctl.run_sandbox({"metadata": {"name": "a2"}}, runtime_handler="fake2")
    # without its handler a sandbox cannot be recovered, nor torn down: it says why
    async with controller() as ctl:
        st = await ctl.sandbox_status(a2.id)
        assert st.state is State.NOT_READY and "gone (fake2)" in (st.last_error or "")
        with pytest.raises(StepFailed, match="'fake2' is not installed"):
            await ctl.remove_sandbox(a2.id)
    async with controller(other) as ctl:
        for sid in (a.id, b.id, a2.id):
            await ctl.remove_sandbox(sid)
    await rig.rt.kill_all()
    await other.kill_all()
    rig.nothing_left()
    assert other.containers == {}


async def test_stopping_the_server_ends_open_event_streams_at_once(
        rig: Rig, sock_dir: str) -> None:
    path = os.path.join(sock_dir, "cri.sock")
    async with rig.controller() as ctl:
        server = CriServer(ctl, path)
        await server.start()
        async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
            stream = pb_grpc.RuntimeServiceStub(channel).GetContainerEvents(
                pb.GetEventsRequest())
            while not ctl._lifecycle_subscribers:  # noqa: ASYNC110
                await anyio.sleep(0.01)
            t0 = anyio.current_time()
            await server.stop(grace=30)
            assert anyio.current_time() - t0 < 5  # not the grace
            assert [ev async for ev in stream] == []
            assert await stream.code() is grpc.StatusCode.OK
        assert not ctl._lifecycle_subscribers


async def test_network_ready_is_false_once_a_plugin_or_the_config_goes(
        rig: Rig, tmp_path: Path, sock_dir: str) -> None:
    from podfsm.core import cniconf
    from podfsm.drivers.cni import CniNetwork

    bins, conf = tmp_path / "bin", tmp_path / "net.d"
    bins.mkdir()
    conf.mkdir()
    for d in ("/usr/lib/cni", "/opt/cni/bin"):
        if os.path.isdir(d):
            for name in os.listdir(d):
                if not (bins / name).exists():
                    (bins / name).symlink_to(os.path.join(d, name))
    (conf / "10-t.conflist").write_text(json.dumps(
        cniconf.default_conflist("t-net", "t-br0", "10.251.0.0/24")))
    net = CniNetwork(conf_dir=str(conf), bin_dirs=[str(bins)])
    async with serving(rig, sock_dir, network=net) as world:

        async def network() -> pb.RuntimeCondition:
            conds = (await world.rt.Status(pb.StatusRequest())).status.conditions
            return next(c for c in conds if c.type == "NetworkReady")

        assert (await network()).status
        plugin = sorted(net.plugin_paths)[0]
        target = os.readlink(bins / plugin)
        (bins / plugin).unlink()
        cond = await network()
        assert not cond.status and cond.reason == "NetworkPluginNotReady"
        assert plugin in cond.message
        (bins / plugin).symlink_to(target)
        assert (await network()).status
        (conf / "10-t.conflist").unlink()
        cond = await network()
        assert not cond.status and "10-t.conflist is gone" in cond.message


def test_serve_refuses_a_cri_socket_another_server_answers_on(rig: Rig, sock_dir: str) -> None:
    import asyncio

    from podfsm.faces.http import Daemon

    cri = os.path.join(sock_dir, "cri.sock")
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(cri)
        live.listen()
        daemon = Daemon(rig.cfg, os.path.join(sock_dir, "podfsm.sock"),
                        controller=rig.controller(), cri_socket=cri)
        with pytest.raises(PrerequisiteMissing, match="CRI socket: another server already answers"):
            asyncio.run(daemon.run())
        assert os.listdir(sock_dir) == ["cri.sock"]  # its own socket is gone, the other's kept
    os.unlink(cri)


async def test_port_forward_answers_a_single_use_url_for_a_ready_sandbox(
        rig: Rig, sock_dir: str) -> None:
    stream = StreamServer()
    await stream.start()
    try:
        async with serving(rig, sock_dir, stream=stream) as world:
            rt = world.rt
            sid = (await rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cri_pod("pf")))
                   ).pod_sandbox_id
            url = (await rt.PortForward(pb.PortForwardRequest(pod_sandbox_id=sid[:13],
                                                              port=[80]))).url
            assert url.startswith(f"http://127.0.0.1:{stream.port}/portforward/")
            token = url.rsplit("/", 1)[1]
            request = stream.cache.consume(token)
            assert request == PortForwardRequest(sid, (80,))
            assert stream.cache.consume(token) is None  # once
            code, msg = await code_of(rt.PortForward(pb.PortForwardRequest(
                pod_sandbox_id=sid, port=[0])))
            assert code is grpc.StatusCode.INVALID_ARGUMENT and "[0]" in msg
            code, _ = await code_of(rt.PortForward(pb.PortForwardRequest(
                pod_sandbox_id="f" * 64)))
            assert code is grpc.StatusCode.NOT_FOUND
            await rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid))
            code, msg = await code_of(rt.PortForward(pb.PortForwardRequest(pod_sandbox_id=sid)))
            assert code is grpc.StatusCode.FAILED_PRECONDITION and "not running" in msg
            assert len(stream.cache) == 0
    finally:
        await stream.stop()


async def test_port_forward_without_a_streaming_server_is_unimplemented(
        rig: Rig, sock_dir: str) -> None:
    async with serving(rig, sock_dir) as world:
        code, msg = await code_of(world.rt.PortForward(pb.PortForwardRequest(
            pod_sandbox_id="x")))
        assert code is grpc.StatusCode.UNIMPLEMENTED and "streaming server" in msg


async def test_exec_and_attach_refusals_hand_out_no_url(rig: Rig, sock_dir: str) -> None:
    """Streams that make no sense and an empty command are INVALID_ARGUMENT (as kubelet's
    server answers), an unknown container NOT_FOUND; none of them leaves a token behind."""
    stream = StreamServer()
    await stream.start()
    try:
        async with serving(rig, sock_dir, stream=stream) as world:
            rt = world.rt
            for call, code, words in (
                    (rt.Exec(pb.ExecRequest(container_id="c", cmd=["sh"], tty=True,
                                            stdout=True, stderr=True)),
                     grpc.StatusCode.INVALID_ARGUMENT, "tty and stderr"),
                    (rt.Attach(pb.AttachRequest(container_id="c")),
                     grpc.StatusCode.INVALID_ARGUMENT, "one of stdin, stdout, or stderr"),
                    (rt.Exec(pb.ExecRequest(container_id="c", stdout=True)),
                     grpc.StatusCode.INVALID_ARGUMENT, "cmd is empty"),
                    (rt.Exec(pb.ExecRequest(container_id="f" * 64, cmd=["sh"], stdout=True)),
                     grpc.StatusCode.NOT_FOUND, "not found"),
                    (rt.Attach(pb.AttachRequest(container_id="f" * 64, stdout=True)),
                     grpc.StatusCode.NOT_FOUND, "not found")):
                got, msg = await code_of(call)
                assert got is code and words in msg, msg
            assert len(stream.cache) == 0
    finally:
        await stream.stop()
