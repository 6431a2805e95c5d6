"""Containers over a real `podfsm serve`, held to critest 1.26.1's container specs on runc and
crun: images pulled from a local registry through a gcr.io/registry.k8s.io mirror config, with
stand-ins of critest's busybox (busybox-static plus a `pgrep`, which Debian's busybox lacks)
and httpd (prints `httpd -D FOREGROUND`, serves port 80 with busybox httpd)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cri_api.v1 import api_pb2 as pb
from cri_api.v1 import api_pb2_grpc as pb_grpc

from tests import imagekit as ik
from tests.integration.conftest import Env
from tests.integration.test_cri import tool
from tests.integration.test_faces import Daemon, serving, use_env_network

pytestmark = [pytest.mark.integration, pytest.mark.parametrize("runtime", ["runc", "crun"])]

E2E = "e2e-test-images"
#: `pgrep NAME`: the pids whose comm is NAME, as procps' pgrep prints them; 1 when none
PGREP = b"""#!/bin/sh
found=
for d in /proc/[0-9]*; do
    read -r comm < "$d/comm" 2>/dev/null || continue
    if [ "$comm" = "$1" ]; then echo "${d#/proc/}"; found=1; fi
done
[ -n "$found" ]
"""
APPLETS = ("sh", "ls", "cat", "echo", "sleep", "id", "top", "httpd", "true", "kill", "ps",
           "grep")
CRITEST_FOCUS = ("Container runtime should support (basic operations|log|adding volume)"
                 "|Multiple Containers")


def busybox_image(*, cmd: tuple[str, ...] = ("sh",), extra: list[ik.Entry] | None = None
                  ) -> ik.Image:
    base = ik.busybox_layer(APPLETS)
    top = ik.make_layer([ik.Entry("bin", "dir", mode=0o755),
                         ik.Entry("bin/pgrep", data=PGREP, mode=0o755),
                         ik.Entry("tmp", "dir", mode=0o1777), *(extra or [])])
    return ik.build_image([base, top], cmd=cmd)


def httpd_image() -> ik.Image:
    return busybox_image(
        cmd=("/bin/sh", "-c", "echo 'httpd -D FOREGROUND'; exec httpd -f -p 80 -h /htdocs"),
        extra=[ik.Entry("htdocs", "dir", mode=0o755),
               ik.Entry("htdocs/index.html", data=b"<html>It works!</html>\n")])


@pytest.fixture(scope="module")
def registry() -> Iterator[ik.Registry]:
    with ik.run_registry() as reg:
        reg.push_image(f"{E2E}/busybox", busybox_image(), "1.29-2")
        reg.push_image(f"{E2E}/httpd", httpd_image(), "2.4.39-4")
        yield reg


@pytest.fixture
def daemon(env: Env, registry: ik.Registry) -> Iterator[Daemon]:
    use_env_network(env)
    certs = os.path.join(env.tmp, "certs.d")
    for host in ("gcr.io", "registry.k8s.io"):
        ik.hosts_toml(certs, host, registry.url)
    with serving(env, options=["--registry-config-dir", certs]) as d:
        yield d
        _remove_all(d)
        assert d.terminate() == 0
    assert env.leftovers() == {}


def _remove_all(d: Daemon) -> None:
    """Whatever the test left (it failed halfway): every sandbox removed through the API,
    which removes their containers first."""
    with d.client(timeout=120) as c:
        for item in c.get("/v1/sandboxes").json()["items"]:
            assert c.delete(f"/v1/sandboxes/{item['id']}").status_code < 300


def test_critest_containers(env: Env, daemon: Daemon, runtime: str) -> None:
    sock = f"unix://{daemon.cri_socket}"
    r = subprocess.run([tool("critest"), "--runtime-endpoint", sock, "--image-endpoint", sock,
                        "--runtime-handler", runtime, "--ginkgo.no-color",
                        f"--ginkgo.focus={CRITEST_FOCUS}"],
                       capture_output=True, text=True, timeout=900, cwd=env.tmp, check=False)
    out = r.stdout + r.stderr
    summary = [line for line in out.splitlines() if "Passed" in line or "Ran " in line]
    print("\n".join(summary))
    assert r.returncode == 0, out[-20000:]
    assert "Ran 19 of " in out and "SUCCESS! -- 19 Passed | 0 Failed" in out, out[-5000:]


# -- from outside ---------------------------------------------------------------------------

BUSYBOX = f"registry.k8s.io/{E2E}/busybox:1.29-2"


class Cri:
    """The daemon's CRI through grpc stubs, with the few calls these tests make."""

    def __init__(self, daemon: Daemon, runtime: str, logdir: str) -> None:
        self.ch = grpc.insecure_channel(f"unix:{daemon.cri_socket}")
        self.rt = pb_grpc.RuntimeServiceStub(self.ch)
        self.img = pb_grpc.ImageServiceStub(self.ch)
        self.runtime = runtime
        self.logdir = logdir

    def pod(self, name: str) -> str:
        cfg = pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata(name=name, uid=name,
                                                                 namespace="t"),
                                  log_directory=self.logdir)
        return self.rt.RunPodSandbox(pb.RunPodSandboxRequest(
            config=cfg, runtime_handler=self.runtime), timeout=60).pod_sandbox_id

    def container(self, pod: str, name: str, cmd: list[str],
                  linux: pb.LinuxContainerConfig | None = None,
                  devices: list[pb.Device] | None = None) -> str:
        self.img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=BUSYBOX)), timeout=60)
        cfg = pb.ContainerConfig(metadata=pb.ContainerMetadata(name=name),
                                 image=pb.ImageSpec(image=BUSYBOX), command=cmd,
                                 log_path=f"{name}.log", linux=linux, devices=devices)
        cid = self.rt.CreateContainer(pb.CreateContainerRequest(
            pod_sandbox_id=pod, config=cfg), timeout=60).container_id
        self.rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=60)
        return cid

    def status(self, cid: str) -> Any:
        return self.rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cid,
                                                                 verbose=True), timeout=30)

    def wait_exited(self, cid: str, within: float = 20) -> Any:
        deadline = time.monotonic() + within
        while True:
            st = self.status(cid).status
            if st.state == pb.CONTAINER_EXITED or time.monotonic() > deadline:
                return st
            time.sleep(0.05)


def _ns(pid: int, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def test_a_container_from_outside(env: Env, daemon: Daemon, runtime: str) -> None:
    logdir = os.path.join(env.tmp, "logs")
    cri = Cri(daemon, runtime, logdir)
    pod = cri.pod("outside")
    pause = json.loads(cri.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(
        pod_sandbox_id=pod, verbose=True), timeout=30).info["info"])["pid"]
    events = cri.rt.GetContainerEvents(pb.GetEventsRequest(), timeout=60)
    sleeper = cri.container(pod, "sleeper", ["sleep", "1000"])
    got = []
    for ev in events:  # the container's own events, with its pod's status
        if ev.container_id == sleeper:
            got.append(ev.container_event_type)
            assert ev.pod_sandbox_status.id == pod
        if pb.CONTAINER_STARTED_EVENT in got:
            break
    events.cancel()
    assert got == [pb.CONTAINER_CREATED_EVENT, pb.CONTAINER_STARTED_EVENT]
    pid = json.loads(cri.status(sleeper).info["info"])["pid"]
    for kind in ("net", "ipc", "uts", "pid"):
        assert _ns(pid, kind) == _ns(pause, kind), kind
    assert _ns(pid, "mnt") != _ns(pause, "mnt")
    os.kill(pid, signal.SIGKILL)
    st = cri.wait_exited(sleeper)
    assert st.state == pb.CONTAINER_EXITED and st.exit_code == 137 and st.reason == "Error"
    # a host device, made in the container and allowed in its device cgroup
    dev = cri.container(pod, "dev", ["sleep", "1000"], None, [pb.Device(
        container_path="/dev/mynull", host_path="/dev/null", permissions="rw")])
    out = cri.rt.ExecSync(pb.ExecSyncRequest(container_id=dev, cmd=[
        "sh", "-c", "echo gone > /dev/mynull && ls -l /dev/mynull"], timeout=10), timeout=30)
    assert out.exit_code == 0 and out.stdout.startswith(b"crw"), out
    # RuntimeDefault: containerd's default profile is in force (a filter, mode 2)
    confined = cri.container(pod, "confined", ["sleep", "1000"], pb.LinuxContainerConfig(
        security_context=pb.LinuxContainerSecurityContext(seccomp=pb.SecurityProfile(
            profile_type=pb.SecurityProfile.RuntimeDefault))))
    out = cri.rt.ExecSync(pb.ExecSyncRequest(container_id=confined, cmd=[
        "sh", "-c", "grep Seccomp: /proc/self/status; ls /"], timeout=10), timeout=30)
    assert out.exit_code == 0 and b"Seccomp:\t2" in out.stdout, out
    three = cri.container(pod, "three", ["sh", "-c", "echo out-line; echo err-line >&2; exit 3"])
    st = cri.wait_exited(three)
    assert (st.exit_code, st.reason) == (3, "Error"), st
    lines = Path(logdir, "three.log").read_text().splitlines()
    assert any(re.fullmatch(r"\S+ stdout F out-line", line) for line in lines), lines
    assert any(re.fullmatch(r"\S+ stderr F err-line", line) for line in lines), lines
    # removing the image while a container uses it is refused naming the container
    with pytest.raises(grpc.RpcError) as info:
        cri.img.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=BUSYBOX)),
                            timeout=30)
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert sleeper in (info.value.details() or "") or three in (info.value.details() or "")
    # stopp / rmp cascade to the containers
    cri.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=60)
    cri.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=60)
    assert cri.rt.ListContainers(pb.ListContainersRequest(), timeout=30).containers == []
    cri.ch.close()


def test_containers_outlive_a_killed_podfsm(env: Env, registry: ik.Registry,
                                            runtime: str) -> None:
    use_env_network(env)
    certs = os.path.join(env.tmp, "certs.d")
    for host in ("gcr.io", "registry.k8s.io"):
        ik.hosts_toml(certs, host, registry.url)
    logdir = os.path.join(env.tmp, "logs")
    opts = ["--registry-config-dir", certs]
    with serving(env, options=opts) as first:
        cri = Cri(first, runtime, logdir)
        pod = cri.pod("crash")
        writer = cri.container(pod, "writer", ["sh", "-c",
                                               "i=0; while true; do echo $i; i=$((i+1)); "
                                               "sleep 0.05; done"])
        quitter = cri.container(pod, "quitter", ["sh", "-c", "sleep 1; exit 7"])
        cri.ch.close()
        first.proc.kill()  # SIGKILL: no cleanup of any kind
        first.proc.wait()
        log = Path(logdir, "writer.log")
        before = len(log.read_text().splitlines())
        time.sleep(1.5)  # the quitter exits while podfsm is down
        assert len(log.read_text().splitlines()) > before, "the log stopped growing"
    with serving(env, options=opts) as second:
        cri = Cri(second, runtime, logdir)
        st = cri.status(writer).status
        assert st.state == pb.CONTAINER_RUNNING
        out = cri.rt.ExecSync(pb.ExecSyncRequest(container_id=writer, cmd=["echo", "hi"],
                                                 timeout=10), timeout=30)
        assert (out.exit_code, out.stdout) == (0, b"hi\n")
        st = cri.status(quitter).status
        assert (st.state, st.exit_code) == (pb.CONTAINER_EXITED, 7), st
        numbers = [int(line.split()[-1]) for line in log.read_text().splitlines()]
        assert numbers == list(range(len(numbers))), "a line of output was lost"
        cri.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=60)
        cri.ch.close()
        assert second.terminate() == 0
    assert env.leftovers() == {}
