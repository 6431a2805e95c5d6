"""Every honoured PodSandboxConfig field seen from outside podfsm, on a real pause (runc AND
crun): one pod config exercising many fields, checked once per runtime; and refusals that
name the field and leave nothing."""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from podfsm import InvalidPodConfig, State
from tests.integration.conftest import Env, nat_rules, pod, portmap_chains_removed_if_new, running

pytestmark = pytest.mark.integration

def host_address() -> str:
    """The host's own non-loopback IPv4 address (portmap does not DNAT 127.0.0.1 without
    route_localnet)."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        dev, addr = line.split()[1], line.split()[3].split("/")[0]
        if not dev.startswith("pfsm") and not addr.startswith("10.240."):
            return addr
    pytest.fail("no non-loopback IPv4 address on this host")


LISTENER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080)); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); c.sendall(b"hello-from-pod"); c.close()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def status_field(pid: int, name: str) -> list[str]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split()[1:]
    raise AssertionError(f"no {name} in /proc/{pid}/status")


async def wait_exec(pid: int) -> None:
    """Wait until the pause has exec'd catatonit: `runtime start` returns when it has told the
    container's init to go on, which then loads the seccomp filter and execs."""
    with anyio.fail_after(10):
        while not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(  # noqa: ASYNC110
                b"/catatonit\0"):
            await anyio.sleep(0.005)


def is_mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


async def test_one_pod_config_honours_every_field(env: Env, tmp_path: Path) -> None:
    port = free_port()
    sock_path = os.path.join(env.tmp, "pidfd.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    receiver.bind(sock_path)
    receiver.listen(1)
    receiver.setblocking(False)
    log_dir = os.path.join(env.tmp, "logs", "pod-a", "b")
    leaf = f"t{os.getpid()}-{env.slot}"
    cgroup_parent = f"{env.cfg.cgroup_root}/{leaf}/inner"
    config = pod("cfg")
    config.update({
        "hostname": "cfg-host",
        "log_directory": log_dir,
        "dns_config": {"servers": ["10.0.0.10", "fd00::a"],
                       "searches": ["svc.cluster.local", "example.com"],
                       "options": ["ndots:5", "edns0"]},
        "port_mappings": [{"container_port": 8080, "host_port": port, "protocol": "TCP"}],
        "annotations": {"run.oci.pidfd_receiver": sock_path, "example.com/kept": "no"},
    })
    config["linux"].update({
        "cgroup_parent": cgroup_parent,
        "sysctls": {"kernel.shmmni": "2048"},
        "resources": {"cpu_period": 100000, "cpu_quota": 50000, "cpu_shares": 512,
                      "memory_limit_in_bytes": 1 << 27},
        "overhead": {"cpu_shares": 10},
    })
    config["linux"]["security_context"].update({
        "run_as_user": {"value": 1000}, "run_as_group": {"value": 3000},
        "supplemental_groups": [4000, 5000], "readonly_rootfs": True,
        "seccomp": {"profile_type": "RuntimeDefault"},
    })
    with portmap_chains_removed_if_new():
        async with running(env) as ctl:
            st = await ctl.run_sandbox(config)
            assert st.state is State.READY and st.pid is not None and st.netns_path
            pid, base = st.pid, st.uid_mappings[0].host_id
            await wait_exec(pid)
            gbase = st.gid_mappings[0].host_id
            root = f"/proc/{pid}/root"
            # hostname: the UTS name and the file
            assert Path(f"{root}/etc/hostname").read_text() == "cfg-host\n"
            uts = subprocess.run(  # noqa: ASYNC221  (a few ms, nothing else runs)
                ["nsenter", "-u", "-t", str(pid), "hostname"],
                capture_output=True, text=True, check=True).stdout
            assert uts.strip() == "cfg-host"
            # dns_config -> resolv.conf; hosts with the localhost entries
            assert Path(f"{root}/etc/resolv.conf").read_text() == (
                "search svc.cluster.local example.com\nnameserver 10.0.0.10\n"
                "nameserver fd00::a\noptions ndots:5 edns0\n")
            assert "127.0.0.1\tlocalhost" in Path(f"{root}/etc/hosts").read_text()
            # the host paths are reported, and are what the pause sees
            assert st.files is not None
            assert Path(st.files.resolv_conf_path).read_text().startswith("search ")
            assert Path(st.files.hostname_path).read_text() == "cfg-host\n"
            # /dev/shm: a per-pod tmpfs on the host, bound into the pause
            assert is_mounted(st.files.shm_path)
            Path(st.files.shm_path, "marker").write_text("x")
            assert Path(f"{root}/dev/shm/marker").read_text() == "x"
            # log_directory created and reported
            assert os.path.isdir(log_dir) and st.files.log_directory == log_dir
            # security context: uid, gid, groups (host view: base + id), seccomp filter
            assert status_field(pid, "Uid") == [str(base + 1000)] * 4
            assert status_field(pid, "Gid") == [str(gbase + 3000)] * 4
            assert status_field(pid, "Groups") == [str(gbase + 4000), str(gbase + 5000)]
            assert status_field(pid, "Seccomp") == ["2"]
            # pid, ipc, uts, net: the pod's own
            for ns in ("pid", "ipc", "uts", "net"):
                assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")
            # resources recorded and reported
            assert st.resources is not None and st.resources.cpu_shares == 512
            assert st.overhead is not None and st.overhead.cpu_shares == 10
            bundle = json.loads(Path(env.cfg.run_dir, "bundles", st.id, "config.json")
                                .read_text())
            assert bundle["annotations"]["io.kubernetes.cri.sandbox-cpu-shares"] == "512"
            # annotations: none passes by default; crun's pidfd receiver got nothing
            assert "run.oci.pidfd_receiver" not in bundle["annotations"]
            with pytest.raises(BlockingIOError):
                receiver.accept()
            # the cgroup parent under podfsm's root
            assert glob.glob(f"/sys/fs/cgroup/*{cgroup_parent}/{st.id}") or glob.glob(
                f"/sys/fs/cgroup{cgroup_parent}/{st.id}")
            # port_mappings: the host's own address on the host port reaches the pod
            listener = subprocess.Popen(  # noqa: ASYNC220  (the test's own listener)
                ["nsenter", f"--net={st.netns_path}", sys.executable, "-c", LISTENER],
                stdout=subprocess.PIPE, text=True)
            try:
                assert listener.stdout is not None
                assert listener.stdout.readline().strip() == "ready"
                with socket.create_connection((host_address(), port), timeout=5) as c:
                    assert c.recv(100) == b"hello-from-pod"
            finally:
                listener.kill()
                listener.wait()
                if listener.stdout is not None:
                    listener.stdout.close()
            assert f"--dport {port}" in nat_rules()
            await ctl.stop_sandbox(st.id)
            assert not is_mounted(st.files.shm_path)
            assert str(port) not in nat_rules() and st.id[:12] not in nat_rules()
            await ctl.remove_sandbox(st.id)
            assert not os.path.exists(os.path.join(env.tmp, "logs"))
            assert not glob.glob(f"/sys/fs/cgroup/*/{env.cfg.cgroup_root}/{leaf}")
            assert not glob.glob(f"/sys/fs/cgroup/{env.cfg.cgroup_root}/{leaf}")
            assert env.leftovers() == {}
    receiver.close()


async def test_host_namespaces_and_unconfined(env: Env) -> None:
    """pid NODE, ipc NODE, network NODE: the host's namespaces (host UTS too), the host's
    /dev/shm; seccomp Unconfined: no filter."""
    config = pod("hostns", userns={"mode": "NODE"}, network="NODE")
    opts = config["linux"]["security_context"]["namespace_options"]
    opts.update({"pid": "NODE", "ipc": "NODE"})
    config["linux"]["security_context"]["seccomp"] = {"profile_type": "Unconfined"}
    async with running(env) as ctl:
        st = await ctl.run_sandbox(config)
        assert st.state is State.READY and st.pid is not None
        await wait_exec(st.pid)
        for ns in ("pid", "ipc", "uts", "net"):
            assert os.readlink(f"/proc/{st.pid}/ns/{ns}") == os.readlink(f"/proc/self/ns/{ns}")
        assert status_field(st.pid, "Seccomp") == ["0"]
        assert st.files is not None and st.files.shm_path == "/dev/shm"
        assert Path(f"/proc/{st.pid}/root/etc/hostname").read_text() == \
            socket.gethostname() + "\n"
        await ctl.remove_sandbox(st.id)
        assert env.leftovers() == {}


def _localhost(path: str) -> dict[str, Any]:
    return {"profile_type": "Localhost", "localhost_ref": path}


async def test_refusals_name_the_field_and_leave_nothing(env: Env) -> None:
    bad_profile = os.path.join(env.tmp, "bad.json")
    Path(bad_profile).write_text("{not json")
    pool_start = env.cfg.idmap_pool_start

    def with_sc(**sc: Any) -> dict[str, Any]:
        p = pod("refused")
        p["linux"]["security_context"].update(sc)
        return p

    cases: dict[str, tuple[dict[str, Any], str]] = {
        "unknown key": ({**pod("refused"), "hostnme": "x"}, "hostnme"),
        "group without user": (with_sc(run_as_group={"value": 1}), "run_as_group"),
        "missing Localhost profile": (with_sc(seccomp=_localhost("/nonexistent/p.json")),
                                      "/nonexistent/p.json"),
        "invalid Localhost profile": (with_sc(seccomp=_localhost(bad_profile)), bad_profile),
        "deprecated path missing": (with_sc(seccomp_profile_path="localhost//nope.json"),
                                    "seccomp_profile_path"),
        "dns server": ({**pod("refused"), "dns_config": {"servers": ["not-an-ip"]}},
                       "servers"),
        "host ids 1-65535": (pod("refused", userns={
            "mode": "POD", "uids": [{"host_id": 1, "container_id": 0, "length": 65535}],
            "gids": [{"host_id": 1, "container_id": 0, "length": 65535}]}), "1-65535"),
        "2^31 ids": (pod("refused", userns={
            "mode": "POD", "uids": [{"host_id": pool_start, "container_id": 0,
                                     "length": 1 << 31}],
            "gids": [{"host_id": pool_start, "container_id": 0, "length": 1 << 31}]}),
            "uids[0]"),
        "cgroup parent outside": ({**pod("refused"), "linux": {**pod("refused")["linux"],
                                   "cgroup_parent": "/esc-bars/a/b"}}, "cgroup_parent"),
        "uid with ;": ({"metadata": {"name": "x", "uid": "a;b"}}, "metadata.uid"),
        "escape in uid": ({"metadata": {"name": "x", "uid": "\x1b[2J"}}, "metadata.uid"),
        "newline in name": ({"metadata": {"name": "web\n"}}, "metadata.name"),
        "surrogate in label": ({**pod("refused"), "labels": {"a": "\ud800"}}, "labels.a"),
        "host_ip": ({**pod("refused"), "port_mappings": [
            {"container_port": 80, "host_port": 8080, "host_ip": "1.2.3"}]}, "host_ip"),
        "windows": ({**pod("refused"), "windows": {"security_context": {}}}, "windows"),
        "net sysctl with host network": ({**pod("refused", network="NODE"), "linux": {
            **pod("refused", network="NODE")["linux"],
            "sysctls": {"net.ipv4.ip_forward": "1"}}}, "net.ipv4.ip_forward"),
        "privileged in a pod userns": (with_sc(privileged=True), "privileged"),
        "unmapped run_as_user": (with_sc(run_as_user={"value": 70000}), "run_as_user"),
    }
    async with running(env) as ctl:
        for case, (data, words) in cases.items():
            with pytest.raises(InvalidPodConfig) as info:
                await ctl.run_sandbox(data)
            assert words in str(info.value), case
            assert env.leftovers() == {}, case
        assert await ctl.list_sandboxes() == []
    assert not glob.glob("/sys/fs/cgroup/*/esc-bars") and not os.path.exists(
        "/sys/fs/cgroup/esc-bars")



