"""The CRI face of a real `podfsm serve` (runc AND crun, real CNI plugins and catatonit), held to
tools someone else wrote: crictl and critest 1.26.1 (built by .ci/setup from ../shared/cri-tools),
and a gRPC client of every served RPC, its event stream and its error codes.

Each daemon has both runtime handlers; the `runtime` fixture picks its default. Each test has
its own directories, CNI network and CRI socket (beside the HTTP one, see serve_argv), and
leaves nothing in either handler's runtime root, nor anything else (env.leftovers).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cri_api.v1 import api_pb2 as pb
from cri_api.v1 import api_pb2_grpc as pb_grpc

from tests.integration.conftest import Env
from tests.integration.test_faces import (
    PODS,
    Daemon,
    podfsm,
    serving,
    use_env_network,
    wait_for_state,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "crictl"
HANDLERS = ("runc", "crun")
CRITEST_FOCUS = ("PodSandbox runtime should support basic operations on PodSandbox|"
                 "Runtime info runtime should support returning runtime info")


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed: .ci/setup builds it from ../shared/cri-tools"
    return path


def handler_containers(env: Env, handler: str) -> list[str]:
    root = os.path.join(env.cfg.run_dir, "runtime", handler)
    if not os.path.isdir(root):
        return []
    out = subprocess.run([handler, "--root", root, "list", "-q"], capture_output=True,
                         text=True, check=True).stdout
    return out.split()


@pytest.fixture
def daemon(env: Env) -> Iterator[Daemon]:
    use_env_network(env)
    with serving(env) as d:
        yield d
        assert d.terminate() == 0
        assert not os.path.exists(d.cri_socket), "the CRI socket outlived the daemon"
    for h in HANDLERS:
        assert handler_containers(env, h) == [], h
    assert env.leftovers() == {}


class Crictl:
    def __init__(self, d: Daemon) -> None:
        self.config = os.path.join(d.env.tmp, "crictl.yaml")
        # the example config, pointed at this daemon's socket
        text = (EXAMPLES / "crictl.yaml").read_text()
        Path(self.config).write_text(text.replace("/run/podfsm/cri.sock", d.cri_socket))
        self.tmp = d.env.tmp

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([tool("crictl"), "--config", self.config, *args],
                              capture_output=True, text=True, timeout=120, cwd=self.tmp,
                              env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                              check=False)

    def ok(self, *args: str) -> str:
        r = self.run(*args)
        assert r.returncode == 0, f"crictl {' '.join(args)}: {r.stderr}"
        return r.stdout

    def pod_file(self, example: str, name: str) -> str:
        pod = json.loads((EXAMPLES / example).read_text())
        pod["metadata"].update(name=name, uid=f"uid-{name}")
        path = os.path.join(self.tmp, f"{name}.json")
        Path(path).write_text(json.dumps(pod))
        return path


def test_a_crictl_session(env: Env, daemon: Daemon) -> None:
    c = Crictl(daemon)
    assert re.search(r"RuntimeName:\s+podfsm", c.ok("version"))
    assert re.search(r"RuntimeApiVersion:\s+v1", c.ok("version"))
    info = json.loads(c.ok("info"))
    assert {x["type"]: x["status"] for x in info["status"]["conditions"]} == {
        "RuntimeReady": True, "NetworkReady": True}
    assert info["cgroupDriver"] == "cgroupfs" and info["runtimeHandlers"] == [
        env.cfg.runtime, *(h for h in HANDLERS if h != env.cfg.runtime)]

    ids = {
        "a": c.ok("runp", c.pod_file("pod.json", "pod-a")).strip(),
        "b": c.ok("runp", "--runtime", "runc", c.pod_file("pod-host-userns.json",
                                                          "pod-b")).strip(),
        "c": c.ok("runp", "--runtime", "crun", c.pod_file("pod-mapped.json", "pod-c")).strip(),
    }
    assert all(re.fullmatch(r"[0-9a-f]{64}", i) for i in ids.values()), ids
    handler = {"a": env.cfg.runtime, "b": "runc", "c": "crun"}
    for k, sid in ids.items():  # each made by its own handler, in that handler's root
        assert sid in handler_containers(env, handler[k])
        assert sid not in handler_containers(env, "crun" if handler[k] == "runc" else "runc")
    bad = c.run("runp", "--runtime", "youki", c.pod_file("pod.json", "pod-x"))
    assert bad.returncode != 0 and "InvalidArgument" in bad.stderr and "youki" in bad.stderr

    def pods(*args: str) -> list[str]:
        return sorted(k for line in c.ok("pods", "-q", *args).split()
                      for k, v in ids.items() if v == line)

    assert pods() == ["a", "b", "c"]
    assert pods("--id", ids["b"][:13]) == ["b"]  # crictl shows 13-character ids
    assert pods("--label", "app=mapped") == ["c"]
    assert pods("--label", "app=web", "--label", "tier=front") == ["a"]
    assert pods("--name", "pod-b") == ["b"]
    assert pods("--state", "ready") == ["a", "b", "c"]
    assert pods("--state", "notready") == []
    table = c.ok("pods")
    assert "pod-c" in table and "crun" in table and "Ready" in table

    # inspectp: the CRI status with the ACTUAL mappings, and containerd-like verbose info
    ins = json.loads(c.ok("inspectp", ids["c"][:13]))
    st, inf = ins["status"], ins["info"]
    assert st["id"] == ids["c"] and st["state"] == "SANDBOX_READY"
    assert st["runtimeHandler"] == "crun" and st["network"]["ip"]
    us = st["linux"]["namespaces"]["options"]["usernsOptions"]
    assert us["mode"] == "POD" and us["uids"] == [
        {"containerId": 0, "hostId": 3000000, "length": 65536}]
    with open(f"/proc/{inf['pid']}/uid_map") as f:
        assert f.read().split() == ["0", "3000000", "65536"]
    assert inf["runtimeHandler"] == "crun" and inf["processStatus"] == "running"
    assert inf["runtimeSpec"]["linux"]["uidMappings"][0]["hostID"] == 3000000
    assert inf["cniResult"]["ips"][0]["address"].startswith(st["network"]["ip"] + "/")
    assert inf["config"]["metadata"]["name"] == "pod-c"
    assert inf["netnsPath"].startswith(env.cfg.netns_dir) and inf["usernsPath"]
    assert [h["dest"] for h in inf["podfsm"]["history"]][-1] == "Ready"
    plain = json.loads(c.ok("inspectp", ids["b"]))["status"]
    assert plain["linux"]["namespaces"]["options"]["usernsOptions"]["mode"] == "NODE"

    # statsp: the cgroup's CPU and memory, the pod's interface counters
    stats = json.loads(c.ok("statsp", "-o", "json"))["stats"]
    assert sorted(s["attributes"]["id"] for s in stats) == sorted(ids.values())
    one = json.loads(c.ok("statsp", "-o", "json", "--id", ids["a"]))["stats"]
    assert [s["attributes"]["id"] for s in one] == [ids["a"]]
    lin = one[0]["linux"]
    assert int(lin["cpu"]["usageCoreNanoSeconds"]["value"]) > 0
    assert int(lin["memory"]["workingSetBytes"]["value"]) > 0
    assert lin["network"]["defaultInterface"]["name"] == "eth0"
    assert "rxBytes" in lin["network"]["defaultInterface"]

    # stopp twice; rmp refused on a Ready pod, then after stop, then again (gone)
    for _ in range(2):
        assert f"Stopped sandbox {ids['b']}" in c.ok("stopp", ids["b"])
    assert pods("--state", "notready") == ["b"]
    refused = c.run("rmp", ids["a"])
    assert refused.returncode != 0 and "stop it first" in refused.stderr
    assert pods("--state", "ready") == ["a", "c"]
    assert f"Removed sandbox {ids['b']}" in c.ok("rmp", ids["b"])
    again = c.run("rmp", ids["b"])
    assert again.returncode != 0 and "NotFound" in again.stderr
    assert "Removed sandbox" in c.ok("rmp", "-f", ids["a"])  # crictl -f stops it first
    # unknown ids: stop is idempotent (OK); crictl's rmp asks the status first (NotFound)
    unknown = "0" * 64
    assert "Stopped sandbox" in c.ok("stopp", unknown)
    gone = c.run("rmp", unknown)
    assert gone.returncode != 0 and "NotFound" in gone.stderr
    assert c.ok("stopp", ids["c"]) and c.ok("rmp", ids["c"])
    assert pods() == []
    # a container verb: no container, the header only
    assert c.ok("ps").split() == ["CONTAINER", "IMAGE", "CREATED", "STATE", "NAME",
                                  "ATTEMPT", "POD", "ID", "POD"]


def test_critest_basic_pod_sandbox_and_runtime_info(env: Env, daemon: Daemon) -> None:
    """critest's own specs, with --runtime-handler the env's runtime (the daemon's default is
    the same handler; the crictl session above covers picking the other)."""
    sock = f"unix://{daemon.cri_socket}"
    r = subprocess.run([tool("critest"), "--runtime-endpoint", sock, "--image-endpoint", sock,
                        f"--runtime-handler={env.cfg.runtime}", "--ginkgo.no-color",
                        f"--ginkgo.focus={CRITEST_FOCUS}"],
                       capture_output=True, text=True, timeout=300, cwd=env.tmp, check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "Ran 5 of " in out and "SUCCESS! -- 5 Passed | 0 Failed" in out, out


# ---------------------------------------------------------------------- a gRPC client


def grpc_code(fn: Any, request: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn(request, timeout=60)
    return info.value.code(), info.value.details()


def config(name: str, **extra: Any) -> pb.PodSandboxConfig:
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, namespace="grpc-test", uid=f"uid-{name}"),
        labels={"who": name},
        linux=pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(
            namespace_options=pb.NamespaceOption(userns_options=pb.UserNamespace(mode=pb.POD)))),
        **extra)


def test_every_rpc_and_error_code_over_grpc(env: Env, daemon: Daemon) -> None:
    with grpc.insecure_channel(f"unix:{daemon.cri_socket}") as ch:
        rt, img = pb_grpc.RuntimeServiceStub(ch), pb_grpc.ImageServiceStub(ch)
        v = rt.Version(pb.VersionRequest(), timeout=30)
        assert (v.runtime_name, v.runtime_api_version) == ("podfsm", "v1")
        s = rt.Status(pb.StatusRequest(verbose=True), timeout=30)
        assert all(cond.status for cond in s.status.conditions)
        assert sorted((h.name, h.features.user_namespaces) for h in s.runtime_handlers) == [
            ("crun", True), ("runc", True)]
        assert json.loads(s.info["lastCNILoadStatus"]) == "OK"
        assert rt.RuntimeConfig(pb.RuntimeConfigRequest(), timeout=30
                                ).linux.cgroup_driver == pb.CGROUPFS
        fs = img.ImageFsInfo(pb.ImageFsInfoRequest(), timeout=30).image_filesystems
        assert fs and fs[0].inodes_used.value > 0

        events: list[pb.ContainerEventResponse] = []
        stream = rt.GetContainerEvents(pb.GetEventsRequest())

        def read() -> None:
            try:
                for ev in stream:
                    events.append(ev)
            except grpc.RpcError:
                pass  # cancelled below

        reader = threading.Thread(target=read)
        reader.start()
        try:
            ids = {h: rt.RunPodSandbox(pb.RunPodSandboxRequest(config=config(f"g-{h}"),
                                                                runtime_handler=h),
                                       timeout=60).pod_sandbox_id for h in HANDLERS}
            for h, sid in ids.items():
                resp = rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid,
                                                                      verbose=True), timeout=30)
                assert resp.status.runtime_handler == h
                assert resp.status.state == pb.SANDBOX_READY
                info = json.loads(resp.info["info"])
                m = resp.status.linux.namespaces.options.userns_options.uids[0]
                with open(f"/proc/{info['pid']}/uid_map") as f:
                    assert f.read().split() == [str(m.container_id), str(m.host_id),
                                                str(m.length)]
                assert sid in handler_containers(env, h)
            listed = rt.ListPodSandbox(pb.ListPodSandboxRequest(filter=pb.PodSandboxFilter(
                label_selector={"who": "g-crun"})), timeout=30).items
            assert [p.id for p in listed] == [ids["crun"]]
            assert listed[0].runtime_handler == "crun"
            st = rt.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id=ids["runc"]),
                                    timeout=30).stats
            assert st.linux.memory.usage_bytes.value > 0 and st.linux.cpu.timestamp > 0
            assert st.linux.network.default_interface.name == "eth0"
            all_stats = rt.ListPodSandboxStats(pb.ListPodSandboxStatsRequest(), timeout=30)
            assert sorted(x.attributes.id for x in all_stats.stats) == sorted(ids.values())

            # error codes
            code, msg = grpc_code(rt.RunPodSandbox, pb.RunPodSandboxRequest(
                config=config("g-x"), runtime_handler="kata"))
            assert code is grpc.StatusCode.INVALID_ARGUMENT and "kata" in msg
            code, msg = grpc_code(rt.RunPodSandbox, pb.RunPodSandboxRequest(
                config=config("g-y", hostname="UPPER_case")))
            assert code is grpc.StatusCode.INVALID_ARGUMENT and "hostname" in msg
            code, msg = grpc_code(rt.RunPodSandbox, pb.RunPodSandboxRequest(
                config=config("g-runc")))
            assert code is grpc.StatusCode.ALREADY_EXISTS and ids["runc"] in msg
            # a step that fails for real: the runtime cannot write this sysctl value
            bad = config("g-z")
            bad.linux.sysctls["net.ipv4.tcp_syncookies"] = "not-a-number"
            code, msg = grpc_code(rt.RunPodSandbox, pb.RunPodSandboxRequest(
                config=bad, runtime_handler="crun"))
            assert code is grpc.StatusCode.UNKNOWN and "create_container" in msg, msg
            assert "everything done was unwound" in msg
            for fn, req in ((rt.PodSandboxStatus, pb.PodSandboxStatusRequest(
                                pod_sandbox_id="f" * 64)),
                            (rt.PodSandboxStats, pb.PodSandboxStatsRequest(
                                pod_sandbox_id="f" * 64))):
                assert grpc_code(fn, req)[0] is grpc.StatusCode.NOT_FOUND
            for fn, req in ((rt.Exec, pb.ExecRequest()),
                            (rt.Attach, pb.AttachRequest()),
                            (rt.PortForward, pb.PortForwardRequest())):
                code, msg = grpc_code(fn, req)
                assert code is grpc.StatusCode.UNIMPLEMENTED and "later issue" in msg

            # stop twice, remove twice; a Ready one is stopped by its remove
            for _ in range(2):
                rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=ids["runc"]),
                                  timeout=60)
            for sid in (ids["runc"], ids["crun"], ids["runc"], "f" * 64):
                rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid),
                                    timeout=60)
            assert rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items == []
        finally:
            stream.cancel()
            reader.join(30)
        kinds = {h: [e.container_event_type for e in events if e.container_id == sid]
                 for h, sid in ids.items()}
        created, started = pb.CONTAINER_CREATED_EVENT, pb.CONTAINER_STARTED_EVENT
        stopped, deleted = pb.CONTAINER_STOPPED_EVENT, pb.CONTAINER_DELETED_EVENT
        assert kinds == {"runc": [created, started, stopped, deleted],
                         "crun": [created, started, stopped, deleted]}
        ready = [e for e in events if e.container_event_type == started]
        assert all(e.pod_sandbox_status.state == pb.SANDBOX_READY for e in ready)
        # the failed run never had a container: no event of it
        assert [e for e in events if e.container_id not in ids.values()] == []
    # no daemon behind the socket (as before recovery is done): UNAVAILABLE
    assert daemon.terminate() == 0
    with grpc.insecure_channel(f"unix:{daemon.cri_socket}") as ch:
        code, _ = grpc_code(pb_grpc.RuntimeServiceStub(ch).Version, pb.VersionRequest())
        assert code is grpc.StatusCode.UNAVAILABLE


def test_a_restart_keeps_each_sandbox_on_its_own_handler(env: Env) -> None:
    """`podfsm runp --runtime` (the HTTP face's runtime_handler) makes a sandbox on the handler
    that is not the daemon's default; a new daemon recovers it onto that handler, supervises
    it (a kill -9 is noticed) and removes it through it."""
    other = next(h for h in HANDLERS if h != env.cfg.runtime)
    use_env_network(env)
    with serving(env) as first:
        made = podfsm(first.socket, "runp", "--runtime", other,
                      str(PODS / "userns-allocated.json"))
        assert made.returncode == 0, made.stderr
        sid = made.stdout.strip()
        bad = podfsm(first.socket, "runp", "--runtime", "youki",
                     str(PODS / "userns-allocated.json"))
        assert bad.returncode == 1 and "youki" in bad.stderr
        assert first.terminate() == 0
    assert handler_containers(env, other) == [sid]
    with serving(env) as second, grpc.insecure_channel(f"unix:{second.cri_socket}") as ch:
        rt = pb_grpc.RuntimeServiceStub(ch)
        st = rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid, verbose=True),
                                 timeout=30)
        assert st.status.state == pb.SANDBOX_READY and st.status.runtime_handler == other
        os.kill(json.loads(st.info["info"])["pid"], signal.SIGKILL)
        with second.client() as c:
            assert wait_for_state(c, sid, "NotReady", within=5.0).exit_status == 137
        rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)
        assert handler_containers(env, other) == []
        assert second.terminate() == 0
    assert env.leftovers() == {}
