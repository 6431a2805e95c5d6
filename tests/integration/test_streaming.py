"""Port-forward through a real `podfsm serve` (runc and crun), held to crictl 1.26.1's client
(SPDY/3.1 over client-go and moby/spdystream) and to a WebSocket client tunnelling SPDY: the
connection reaches the pod's own loopback, not the host's, even when the host listens on the
same port; a host-network pod forwards on the host."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import websocket
from cri_api.v1 import api_pb2 as pb
from cri_api.v1 import api_pb2_grpc as pb_grpc

from podfsm.faces.stream import StreamServer, spdy
from tests import crishim
from tests.crishim import CommandContainers
from tests.integration.conftest import Env
from tests.integration.test_cri import Crictl, daemon, tool  # noqa: F401 (a fixture)
from tests.integration.test_faces import Daemon

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def httpd(tmp: str, name: str, port: int, netns: str | None) -> Iterator[None]:
    """busybox httpd on 127.0.0.1:`port` serving `name` at /id, in `netns` (the host's when
    None); killed however the block ends."""
    root = Path(tmp, f"www-{name}")
    root.mkdir()
    (root / "id").write_text(name)
    argv = [tool("busybox"), "httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", str(root)]
    if netns:
        argv = [tool("nsenter"), f"--net={netns}", "--", *argv]
    proc = subprocess.Popen(argv)
    try:
        probe = ["busybox", "wget", "-q", "-O", "-", f"http://127.0.0.1:{port}/id"]
        if netns:
            probe = ["nsenter", f"--net={netns}", "--", *probe]
        for _ in range(100):
            if subprocess.run(probe, capture_output=True).stdout == name.encode():
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"httpd {name} did not come up")
        yield
    finally:
        proc.kill()
        proc.wait()


def _netns(d: Daemon, sid: str) -> str:
    with d.client() as c:
        path = c.get(f"/v1/sandboxes/{sid}").json()["netns_path"]
    assert path and os.path.exists(path)
    return str(path)


@contextlib.contextmanager
def crictl_port_forward(c: Crictl, sid: str, local: int, remote: int) -> Iterator[None]:
    proc = subprocess.Popen([tool("crictl"), "--config", c.config, "port-forward", sid,
                             f"{local}:{remote}"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", local)):
                break
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def _get(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/id", timeout=10) as r:
        return bytes(r.read())


def test_crictl_port_forward_reaches_the_pods_loopback_not_the_hosts(
        env: Env, daemon: Daemon) -> None:  # noqa: F811
    c = Crictl(daemon)
    sid = c.ok("runp", c.pod_file("pod.json", "pf")).strip()
    host_sid = c.ok("runp", c.pod_file("pod-host-net.json", "pf-host")).strip()
    netns = _netns(daemon, sid)
    port, local = _free_port(), _free_port()
    with httpd(env.tmp, "pod", port, netns), httpd(env.tmp, "host", port, None):
        with crictl_port_forward(c, sid, local, port):
            answers = [_get(local) for _ in range(20)]
        assert answers == [b"pod"] * 20
        host_local = _free_port()
        with crictl_port_forward(c, host_sid, host_local, port):
            assert _get(host_local) == b"host"
        # the same over WebSocket, SPDY tunnelled as current kubectl sends it
        with grpc.insecure_channel(f"unix:{daemon.cri_socket}") as ch:
            url = pb_grpc.RuntimeServiceStub(ch).PortForward(  # type: ignore[no-untyped-call]
                pb.PortForwardRequest(pod_sandbox_id=sid, port=[port])).url
        assert url.startswith("http://127.0.0.1:")
        assert ws_port_forward(url, port, b"GET /id HTTP/1.0\r\n\r\n").endswith(b"pod")
    for s in (sid, host_sid):
        c.ok("stopp", s)
        c.ok("rmp", s)


def ws_port_forward(url: str, port: int, request: bytes) -> bytes:
    """One forwarded connection over `SPDY/3.1+portforward.k8s.io`: the response's bytes."""
    ws = websocket.create_connection(url.replace("http://", "ws://"), timeout=10,
                                     subprotocols=["SPDY/3.1+portforward.k8s.io"])
    framer = spdy.Framer()
    try:
        ws.send_binary(framer.encode(spdy.SynStream(1, {"streamType": "error",
                                                         "port": str(port), "requestID": "0"})))
        ws.send_binary(framer.encode(spdy.SynStream(3, {"streamType": "data",
                                                         "port": str(port), "requestID": "0"})))
        ws.send_binary(framer.encode(spdy.Data(3, request, fin=True)))
        out, fin = bytearray(), set()
        while {1, 3} - fin:
            for f in framer.feed(ws.recv()):
                if isinstance(f, spdy.Data):
                    assert f.stream_id == 3 or not f.data, f
                    if f.stream_id == 3:
                        out += f.data
                    if f.fin:
                        fin.add(f.stream_id)
        return bytes(out)
    finally:
        ws.close()


def test_port_forward_of_a_stopped_sandbox_is_refused(env: Env, daemon: Daemon) -> None:  # noqa: F811
    c = Crictl(daemon)
    sid = c.ok("runp", c.pod_file("pod.json", "pf-stopped")).strip()
    c.ok("stopp", sid)
    r = c.run("port-forward", sid, f"{_free_port()}:80")
    assert r.returncode != 0 and "not running" in r.stderr, r.stderr
    c.ok("rmp", sid)
    assert json.loads(c.ok("pods", "-o", "json"))["items"] == []


async def _crictl(endpoint: str, *args: str, stdin: bytes | None = None,
                  under_script: bool = False) -> tuple[int, bytes, bytes]:
    argv = [tool("crictl"), "--runtime-endpoint", f"unix://{endpoint}", *args]
    if under_script:  # a real pty for `exec -it`, as a terminal user has
        argv = [tool("script"), "-qec", " ".join(argv), "/dev/null"]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out, err


async def test_crictl_exec_and_attach_sessions_in_a_pods_netns(env: Env,
                                                              daemon: Daemon) -> None:  # noqa: F811
    """The real crictl's exec and attach, against a test-only CRI endpoint (tests/crishim.py)
    whose "container" runs commands in a podfsm pod's network namespace through
    exec_in_netns: stdin, a pty, exit codes, 1 MiB whole, attach; the command sees the pod's
    interfaces, not the host's."""
    c = Crictl(daemon)
    sid = c.ok("runp", c.pod_file("pod.json", "ex")).strip()
    netns = _netns(daemon, sid)
    containers = CommandContainers({"c1": netns}, attach_cmd=("cat",))
    stream = StreamServer(containers=containers)
    await stream.start()
    endpoint = os.path.join(env.tmp, "crishim.sock")
    grpc_server = await crishim.serve(stream, endpoint)
    try:
        rc, out, _ = await _crictl(endpoint, "exec", "c1", "ip", "-o", "link")
        assert rc == 0 and b"eth0" in out, out
        assert os.path.exists(f"/sys/class/net/{env.bridge}")  # on the host, not in the pod
        assert env.bridge.encode() not in out

        rc, out, _ = await _crictl(endpoint, "exec", "-i", "c1", "cat", stdin=b"one\ntwo\n")
        assert (rc, out) == (0, b"one\ntwo\n")

        rc, out, err = await _crictl(endpoint, "exec", "c1", "sh", "-c",
                                     "echo out; echo err >&2; exit 5")
        assert rc != 0 and out == b"out\n" and b"err\n" in err
        assert b"command terminated with exit code 5" in err

        rc, out, _ = await _crictl(endpoint, "exec", "c1", "sh", "-c",
                                   "head -c 1048576 /dev/zero | tr '\\0' x")
        assert rc == 0 and out == b"x" * (1 << 20)

        rc, out, _ = await _crictl(endpoint, "exec", "-it", "c1", "sh", "-c",
                                   "tty; stty size", under_script=True)
        assert rc == 0 and b"/dev/pts/" in out, out
        assert re.search(rb"\d+ \d+", out), out

        rc, out, _ = await _crictl(endpoint, "attach", "-i", "c1", stdin=b"attached\n")
        assert (rc, out) == (0, b"attached\n")
    finally:
        await grpc_server.stop(None)
        await stream.stop()
    assert all(p.proc.returncode is not None for p in containers.started  # type: ignore[attr-defined]
               )
    c.ok("stopp", sid)
    c.ok("rmp", sid)


#: A stand-in OCI runtime for conmon: `create` starts the "container" (a shell that greets on
#: stdout and stderr, then cats its stdin) on the stdio conmon gives it and writes its pid.
FAKE_RUNTIME = """#!/bin/sh
cmd=""; pidfile=""
while [ $# -gt 0 ]; do
  case "$1" in
    create|start|delete|kill|state) cmd=$1;;
    --pid-file) pidfile=$2; shift;;
  esac
  shift
done
if [ "$cmd" = create ]; then
  exec 3<&0
  sh -c 'echo ready; echo warn >&2; exec cat <&3 3<&-' &
  echo $! > "$pidfile"
fi
exit 0
"""


@contextlib.contextmanager
def conmon_container(tmp: str, name: str) -> Iterator[str]:
    """A "container" under the real conmon (Debian's, as the container layer runs it: stdin
    pipe, full attach path, k8s-file log); its bundle directory. Killed however the block
    ends; conmon then exits by itself."""
    root = Path(tmp, f"conmon-{name}")
    bundle, exits = root / "bundle", root / "exit"
    bundle.mkdir(parents=True)
    exits.mkdir()
    runtime = root / "runtime"
    runtime.write_text(FAKE_RUNTIME)
    runtime.chmod(0o755)
    subprocess.run([tool("conmon"), "--api-version", "1", "-c", name, "-u", name, "-n", name,
                    "-r", str(runtime), "-b", str(bundle), "-p", str(bundle / "pid"),
                    "-P", str(bundle / "conmon.pid"), "--exit-dir", str(exits),
                    "-l", f"k8s-file:{root / 'log'}", "--socket-dir-path", str(bundle),
                    "--full-attach", "-i"], check=True, timeout=30, capture_output=True)
    monitor = int((bundle / "conmon.pid").read_text())
    try:
        for _ in range(100):
            if (bundle / "attach").exists():
                break
            time.sleep(0.05)
        yield str(bundle)
    finally:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int((bundle / "pid").read_text()), 9)
        for _ in range(100):
            if not os.path.exists(f"/proc/{monitor}"):
                break
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{monitor}"), "conmon outlived its container"


async def test_crictl_attach_through_conmons_attach_socket(env: Env) -> None:
    """The real crictl attaches, through the streaming server, to a container under the real
    conmon via ConmonAttach: its stdin reaches the container, its output comes back on stdout
    and stderr, and the end of crictl's stdin closes the container's (conmon without
    --leave-stdin-open), which ends the session."""
    with conmon_container(env.tmp, "att1") as bundle:
        containers = CommandContainers({}, monitors={"att1": bundle})
        stream = StreamServer(containers=containers)
        await stream.start()
        endpoint = os.path.join(env.tmp, "crishim.sock")
        grpc_server = await crishim.serve(stream, endpoint)
        try:
            rc, out, err = await _crictl(endpoint, "attach", "-i", "att1",
                                         stdin=b"line one\nline two\n")
        finally:
            await grpc_server.stop(None)
            await stream.stop()
        assert (rc, out) == (0, b"line one\nline two\n"), err
        log = Path(bundle).parent.joinpath("log").read_text()
        assert "stdout F line two" in log and "stderr F warn" in log
        assert Path(bundle).parent.joinpath("exit", "att1").read_text() == "0"


def test_the_daemon_listens_on_loopback_only(env: Env, daemon: Daemon) -> None:  # noqa: F811
    """By default nothing of `podfsm serve` listens on TCP outside 127.0.0.1 (the streaming
    server is its only TCP listener without --port)."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    mine = [line.split()[3] for line in out.splitlines() if f"pid={daemon.proc.pid}," in line]
    assert mine and all(addr.startswith("127.0.0.1:") for addr in mine), mine


@contextlib.contextmanager
def own_netns() -> Iterator[str]:
    """A network namespace of our own with lo up, held by a process (no pin on the host):
    its /proc path; gone once the block ends."""
    holder = subprocess.Popen(["unshare", "--net", "sh", "-c", "ip link set lo up; exec sleep 60"])
    try:
        netns = f"/proc/{holder.pid}/ns/net"
        for _ in range(100):
            if "UP" in subprocess.run(["nsenter", f"--net={netns}", "ip", "-o", "link"],
                                      capture_output=True, text=True).stdout:
                break
            time.sleep(0.05)
        yield netns
    finally:
        holder.kill()
        holder.wait()


async def test_the_netns_dialer_connects_inside_the_namespace_and_never_the_hosts(
        env: Env) -> None:
    """A listener on 127.0.0.1:P only inside a namespace of our own (unshare --net, pinned by
    its process): the dialer reaches it; the host's 127.0.0.1:P answers nothing. A path that is
    no namespace, or one gone, is an error, not the host."""
    from podfsm.drivers.netnsdial import NetnsDialer

    port = _free_port()
    dialer = NetnsDialer()
    with own_netns() as netns:
        with httpd(env.tmp, "inside", port, netns):
            reader, writer = await dialer.connect(netns, port)
            writer.write(b"GET /id HTTP/1.0\r\n\r\n")
            assert (await reader.read()).endswith(b"inside")
            writer.close()
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", port)  # nothing on the host's
        with pytest.raises(OSError, match="cannot enter the network namespace"):
            await dialer.connect(env.tmp, port)  # a directory, no namespace
        helper = dialer._proc
        assert helper is not None and helper.returncode is None
    with pytest.raises(OSError):
        await dialer.connect(netns, port)  # its holder is gone: no fallback to the host
    await dialer.close()
    assert helper.returncode == 0  # the helper ended with the dialer
