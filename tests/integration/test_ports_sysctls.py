"""Port mappings and sysctls against a real `podfsm serve` (issue 17, items 11 and 14): what
cannot work is refused before anything is made, naming the field, over HTTP and the CRI; the
bridge's route_localnet is on only while a pod needs it; the daemon's document lists the
sysctls a pod can set, and a value the kernel refuses is the caller's error (422), not a run
that fails and unwinds (500)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from cri_api.v1 import api_pb2 as pb
from cri_api.v1 import api_pb2_grpc as pb_grpc

from tests.integration.conftest import (
    Env,
    destroy_env,
    make_env,
    nat_rules,
    pod,
    portmap_chains_removed_if_new,
)
from tests.integration.test_cri import config as cri_config
from tests.integration.test_cri import grpc_code
from tests.integration.test_faces import Daemon, check_error, serving, use_env_network
from tests.integration.test_pod_config import LISTENER, free_port, host_address

pytestmark = pytest.mark.integration


@pytest.fixture
def daemon(env: Env) -> Iterator[Daemon]:
    use_env_network(env)
    with portmap_chains_removed_if_new(), serving(env) as d:
        yield d


def _run(c: httpx.Client, config: dict[str, Any]) -> httpx.Response:
    return c.post("/v1/sandboxes", json=config)


def _nothing_made(env: Env, d: Daemon) -> None:
    with d.client() as c:
        assert c.get("/v1/sandboxes").json()["items"] == []
    assert env.network not in nat_rules()
    assert env.leftovers() == {}


def _directed_broadcast() -> str:
    """The broadcast address of the host's own IPv4 network (its `brd`)."""
    out = subprocess.run(["ip", "-j", "-4", "addr", "show", "scope", "global"],
                         capture_output=True, text=True, check=True).stdout
    for link in json.loads(out):
        for a in link.get("addr_info", ()):
            if a.get("local") == host_address() and a.get("broadcast"):
                return str(a["broadcast"])
    pytest.fail("the host's address has no broadcast address")


def _mapping(**kw: Any) -> dict[str, Any]:
    return {"container_port": 80, "host_port": free_port(), **kw}


# ---------------------------------------------------------------------- item 11: port mappings


@pytest.mark.parametrize("runtime", ["runc"])
def test_port_mappings_that_cannot_work_are_refused_naming_the_field(env: Env,
                                                                     daemon: Daemon) -> None:
    port = free_port()
    refused = {
        # not this host's: no packet to it reaches portmap's rules
        "foreign": ([_mapping(host_ip="198.51.100.7")],
                    "port_mappings[0].host_ip 198.51.100.7 is not an address of this host"),
        "directed broadcast": ([_mapping(host_ip=_directed_broadcast())],
                               "is a broadcast address"),
        "limited broadcast": ([_mapping(host_ip="255.255.255.255")], "is a broadcast address"),
        "multicast": ([_mapping(host_ip="224.0.0.1")], "is a multicast address"),
        "ipv6 multicast": ([_mapping(host_ip="ff02::1")], "is a multicast address"),
        # a second rule for the same host port that never matches
        "duplicate": ([{"container_port": 80, "host_port": port},
                       {"container_port": 81, "host_port": port}],
                      "port_mappings[1] repeats port_mappings[0]"),
        "duplicate on one address": (
            [{"container_port": 80, "host_port": port, "host_ip": "127.0.0.1"},
             {"container_port": 81, "host_port": port, "host_ip": "127.0.0.1",
              "protocol": "TCP"}], "repeats"),
        # portmap skips a mapping of the other family: an empty chain
        "ipv6 on an ipv4 network": ([_mapping(host_ip="::1")],
                                    "is an IPv6 address and the pod network gives pods only "
                                    "IPv4 addresses"),
        "ipv6 any on an ipv4 network": ([_mapping(host_ip="::")], "is an IPv6 address"),
    }
    with daemon.client() as c:
        for what, (mappings, words) in refused.items():
            started = time.monotonic()
            r = _run(c, {**pod(f"p-{len(what)}"), "port_mappings": mappings})
            error = check_error(r, 422, "InvalidPodConfig")
            assert words in error, (what, error)
            assert "port_mappings" in error, (what, error)
            assert time.monotonic() - started < 2, what  # refused up front, nothing run
        _nothing_made(env, daemon)
        # what can work is taken: the host's address, loopback, the unspecified address, and
        # the same host port on another protocol or address
        ok = [_mapping(host_ip=host_address()), _mapping(host_ip="127.0.0.1"),
              _mapping(host_ip="0.0.0.0"), {"container_port": 80, "host_port": port},
              {"container_port": 80, "host_port": port, "protocol": "UDP"},
              {"container_port": 80, "host_port": port, "host_ip": "127.0.0.1"}]
        r = _run(c, {**pod("ok"), "port_mappings": ok})
        assert r.status_code == 201, r.text
        assert f"--dport {port}" in nat_rules()
        assert c.delete(f"/v1/sandboxes/{r.json()['id']}").status_code == 204
    _nothing_made(env, daemon)
    # the CRI face refuses the same, with INVALID_ARGUMENT
    with grpc.insecure_channel(f"unix:{daemon.cri_socket}") as ch:
        rt = pb_grpc.RuntimeServiceStub(ch)
        for host_ip, words in (("198.51.100.7", "not an address of this host"),
                               ("::1", "IPv6"), ("224.0.0.1", "multicast")):
            code, msg = grpc_code(rt.RunPodSandbox, pb.RunPodSandboxRequest(config=cri_config(
                "g", port_mappings=[pb.PortMapping(container_port=80, host_port=port,
                                                   host_ip=host_ip)])))
            assert code is grpc.StatusCode.INVALID_ARGUMENT and words in msg, msg
            assert "host_ip" in msg, msg
        code, msg = grpc_code(rt.RunPodSandbox, pb.RunPodSandboxRequest(config=cri_config(
            "g", port_mappings=[pb.PortMapping(container_port=80, host_port=port),
                                pb.PortMapping(container_port=81, host_port=port)])))
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "repeats" in msg, msg
    _nothing_made(env, daemon)


@pytest.mark.parametrize("runtime", ["runc"])
def test_a_host_port_takes_a_host_listeners_port_over_as_under_containerd(
        env: Env, daemon: Daemon) -> None:
    """Documented, not refused (docs/security.md, Host ports): a mapping without host_ip takes
    new connections to that port of the host's addresses, even where a host program listens;
    the program has them back once the pod is gone."""
    port = free_port()
    with socket.create_server(("0.0.0.0", port)) as host_listener:
        with daemon.client() as c:
            r = _run(c, {**pod("takeover"), "port_mappings": [
                {"container_port": 8080, "host_port": port}]})
            assert r.status_code == 201, r.text
            assert _reaches(r.json()["netns_path"], host_address(), port)
            host_listener.setblocking(False)
            with pytest.raises(BlockingIOError):  # the host's program got nothing
                host_listener.accept()
            assert c.delete(f"/v1/sandboxes/{r.json()['id']}").status_code == 204
        host_listener.settimeout(5)
        with socket.create_connection((host_address(), port), timeout=5):
            accepted, _ = host_listener.accept()  # the host's program has its port back
            accepted.close()
    _nothing_made(env, daemon)


def _route_localnet(bridge: str) -> str:
    return Path(f"/proc/sys/net/ipv4/conf/{bridge}/route_localnet").read_text().strip()


def _reaches_pod(netns: str, port: int) -> bool:
    """Does 127.0.0.1:`port` on the host reach a listener in the pod's netns?"""
    return _reaches(netns, "127.0.0.1", port)


def _reaches(netns: str, address: str, port: int) -> bool:
    """Does `address`:`port` on the host reach a listener in the pod's netns?"""
    listener = subprocess.Popen(["nsenter", f"--net={netns}", sys.executable, "-c", LISTENER],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None
        assert listener.stdout.readline().strip() == "ready"
        try:
            with socket.create_connection((address, port), timeout=3) as conn:
                return conn.recv(100) == b"hello-from-pod"
        except OSError:
            return False
    finally:
        listener.kill()
        listener.wait()
        if listener.stdout is not None:
            listener.stdout.close()


def test_route_localnet_is_on_only_while_a_pod_needs_it() -> None:
    """portmap sets route_localnet=1 on the bridge for 127.0.0.1 to reach a host port, and
    never resets it; podfsm puts it back when the last pod with an IPv4 host port is gone,
    across a restart of the daemon too."""
    env = make_env("runc")
    try:
        use_env_network(env)
        with portmap_chains_removed_if_new():
            ports = [free_port(), free_port()]
            with serving(env) as d, d.client() as c:
                plain = _run(c, pod("plain"))  # no port mapping: the bridge is made, left at 0
                assert plain.status_code == 201, plain.text
                assert _route_localnet(env.bridge) == "0"
                ids = []
                for name, port in zip(("a", "b"), ports, strict=True):
                    r = _run(c, {**pod(name), "port_mappings": [
                        {"container_port": 8080, "host_port": port}]})
                    assert r.status_code == 201, r.text
                    ids.append((r.json()["id"], r.json()["netns_path"]))
                assert _route_localnet(env.bridge) == "1"
                assert _reaches_pod(ids[0][1], ports[0])  # what it is on for
                assert d.terminate() == 0  # the pods run on; the holders are kept on disk
            with serving(env) as d, d.client() as c:
                assert c.delete(f"/v1/sandboxes/{ids[0][0]}").status_code == 204
                assert _route_localnet(env.bridge) == "1"  # b still needs it
                assert _reaches_pod(ids[1][1], ports[1])
                assert c.delete(f"/v1/sandboxes/{plain.json()['id']}").status_code == 204
                assert _route_localnet(env.bridge) == "1"
                assert c.delete(f"/v1/sandboxes/{ids[1][0]}").status_code == 204
                assert _route_localnet(env.bridge) == "0"
                assert not Path(env.cfg.run_dir, "route_localnet").exists()
            assert env.leftovers() == {}
    finally:
        destroy_env(env)


# ---------------------------------------------------------------------- item 14: sysctls


def _sysctl_names(doc: dict[str, Any]) -> tuple[list[str], str]:
    """The sysctls the daemon's document lists, and what it says of them."""
    sysctls = doc["components"]["schemas"]["LinuxPodSandboxConfig"]["properties"]["sysctls"]
    return sysctls["propertyNames"]["enum"], sysctls["description"]


def test_the_document_lists_the_sysctls_a_pod_can_set(env: Env, daemon: Daemon) -> None:
    with daemon.client() as c:
        every, said = _sysctl_names(c.get("/openapi.json").json())
        # the namespaced ones of this kernel, as a new pod's namespaces have them
        for name in ("kernel.msgmax", "kernel.sem", "kernel.shm_rmid_forced",
                     "fs.mqueue.msg_max", "net.ipv4.ip_unprivileged_port_start",
                     "net.ipv4.conf.all.forwarding", "net.ipv4.conf.lo.forwarding"):
            assert name in every and name not in said, name
        assert len(every) > 300 and f"one of the {len(every)} namespaced sysctls" in said
        # a netns owned by a pod's user namespace hides some (this kernel: net.core.xfrm_*):
        # said, and refused for such a pod
        fewer = [n for n in every if n.startswith("net.core.xfrm_")]
        if fewer:
            assert fewer[0] in said
            config = pod("x")
            config["linux"]["sysctls"] = {fewer[0]: "1"}
            error = check_error(_run(c, config), 422, "InvalidPodConfig")
            assert "with its own user namespace" in error, error
        # the host's own interfaces are not the pod's; read-only ones cannot be set
        assert Path("/proc/sys/net/ipv4/conf/lo/forwarding").exists()
        host_only = [n for n in ("net.ipv4.conf.eth0.forwarding",
                                 f"net.ipv4.conf.{env.bridge}.forwarding")
                     if Path("/proc/sys", *n.split(".")).exists()]
        assert not set(host_only) & set(every)
        assert "net.ipv4.tcp_available_congestion_control" not in every
        # what the document lists is set in the pod; what it does not is 422 before anything
        # is made (it exists on the host: before, the runtime's create failed on it)
        r = _run(c, {**pod("ok"), "linux": {**pod("ok")["linux"], "sysctls": {
            "kernel.msgmax": "4096", "net.ipv4.ip_unprivileged_port_start": "80"}}})
        assert r.status_code == 201, r.text
        pid = r.json()["pid"]
        for name, want in (("kernel/msgmax", "4096"), ("net/ipv4/ip_unprivileged_port_start",
                                                       "80")):
            got = subprocess.run(["nsenter", "-t", str(pid), "-i", "-n", "cat",
                                  f"/proc/sys/{name}"], capture_output=True, text=True,
                                 check=True).stdout.strip()
            assert got == want, name
        assert c.delete(f"/v1/sandboxes/{r.json()['id']}").status_code == 204
        if host_only:
            r = _run(c, {**pod("h"), "linux": {**pod("h")["linux"], "sysctls": {
                host_only[0]: "1"}}})
            error = check_error(r, 422, "InvalidPodConfig")
            assert host_only[0] in error and "does not exist on this host" in error
    _nothing_made(env, daemon)


@pytest.mark.parametrize("userns", ["POD", "NODE"])
def test_a_sysctl_value_the_kernel_refuses_is_refused_before_anything_is_made(
        env: Env, daemon: Daemon, userns: str) -> None:
    bad = {"kernel.msgmax": "<garbage>", "kernel.shm_rmid_forced": "7",
           "net.ipv4.tcp_syncookies": "not-a-number", "fs.mqueue.msg_max": "-1"}
    with daemon.client() as c:
        for name, value in bad.items():
            config = pod(f"s-{len(name)}", userns={"mode": userns})
            config["linux"]["sysctls"] = {"kernel.shmmni": "2048", name: value}
            started = time.monotonic()
            error = check_error(_run(c, config), 422, "InvalidPodConfig")
            assert f"sysctl {name!r}: the kernel refuses the value given" in error, error
            assert "Invalid argument" in error, error
            assert time.monotonic() - started < 2, name  # tried, not run and unwound
    _nothing_made(env, daemon)
    with grpc.insecure_channel(f"unix:{daemon.cri_socket}") as ch:
        bad_pod = cri_config("g")
        bad_pod.linux.sysctls["kernel.msgmax"] = "<garbage>"
        code, msg = grpc_code(pb_grpc.RuntimeServiceStub(ch).RunPodSandbox,
                              pb.RunPodSandboxRequest(config=bad_pod))
        assert code is grpc.StatusCode.INVALID_ARGUMENT and "kernel.msgmax" in msg, msg
    _nothing_made(env, daemon)
