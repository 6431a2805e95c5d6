"""Exec, attach and port-forward on real containers through a real `podfsm serve` (runc and
crun, conmon, images from a local registry): critest 1.26.1's Streaming specs, the real crictl's
sessions, and a client that vanishes mid-exec leaving no process and no descriptor.

Stand-ins of critest's images (tests/imagekit.py, busybox-static): its busybox; its nginx
(`e2e-test-images/nginx:1.14-2`: busybox httpd on port 80); its `hostnet-nginx-amd64`
(busybox httpd on the host network's 127.0.0.1:12003, critest's fixed port)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2 as pb

from tests import imagekit as ik
from tests.integration.conftest import Env
from tests.integration.test_containers_cri import (
    APPLETS,
    BUSYBOX,
    E2E,
    PGREP,
    Cri,
    _remove_all,
    busybox_image,
    httpd_image,
)
from tests.integration.test_cri import Crictl, tool
from tests.integration.test_faces import Daemon, serving, use_env_network
from tests.integration.test_streaming import _free_port, crictl_port_forward

pytestmark = [pytest.mark.integration, pytest.mark.parametrize("runtime", ["runc", "crun"])]

#: critest's host-network web server port (its images/hostnet-nginx)
HOSTNET_PORT = 12003


def hostnet_image() -> ik.Image:
    return busybox_image(
        cmd=("/bin/sh", "-c", f"exec httpd -f -p 127.0.0.1:{HOSTNET_PORT} -h /htdocs"),
        extra=[ik.Entry("htdocs", "dir", mode=0o755),
               ik.Entry("htdocs/index.html", data=b"<html>host network</html>\n")])


@pytest.fixture(scope="module")
def registry() -> Iterator[ik.Registry]:
    with ik.run_registry() as reg:
        reg.push_image(f"{E2E}/busybox", busybox_plus(), "1.29-2")
        reg.push_image(f"{E2E}/nginx", httpd_image(), "1.14-2")
        reg.push_image("k8s-staging-cri-tools/hostnet-nginx-amd64", hostnet_image(), "latest")
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


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Go's listeners
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_critest_streaming(env: Env, daemon: Daemon, runtime: str) -> None:
    busy = [p for p in (12001, 12002, HOSTNET_PORT) if not _port_free(p)]
    assert not busy, f"critest's fixed ports {busy} are taken on this host"
    sock = f"unix://{daemon.cri_socket}"
    r = subprocess.run([tool("critest"), "--runtime-endpoint", sock, "--image-endpoint", sock,
                        "--runtime-handler", runtime, "--ginkgo.no-color",
                        "--ginkgo.focus=Streaming"],
                       capture_output=True, text=True, timeout=900, cwd=env.tmp, check=False)
    out = r.stdout + r.stderr
    summary = [line for line in out.splitlines() if "Passed" in line or "Ran " in line]
    print(runtime, "\n".join(summary))
    assert r.returncode == 0, out[-20000:]
    assert "Ran 5 of " in out and "SUCCESS! -- 5 Passed | 0 Failed" in out, out[-5000:]


# -- crictl sessions ------------------------------------------------------------------------

#: what an exec'd process shares with the container's own
STATUS_LINES = "^(CapBnd|CapEff|CapPrm|NoNewPrivs|Seccomp|Uid|Gid|Groups):"
#: more applets than critest's stand-in needs: the sessions below use them
MORE_APPLETS = (*APPLETS, "head", "tr", "stty", "tty", "wc")


def busybox_plus() -> ik.Image:
    base = ik.busybox_layer(MORE_APPLETS)
    top = ik.make_layer([ik.Entry("bin", "dir", mode=0o755),
                         ik.Entry("bin/pgrep", data=PGREP, mode=0o755),
                         ik.Entry("tmp", "dir", mode=0o1777)])
    return ik.build_image([base, top], cmd=("sh",))


def _container(cri: Cri, pod: str, name: str, cmd: list[str], **extra: object) -> str:
    cri.img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=BUSYBOX)), timeout=60)
    cfg = pb.ContainerConfig(metadata=pb.ContainerMetadata(name=name),
                             image=pb.ImageSpec(image=BUSYBOX), command=cmd,
                             log_path=f"{name}.log", **extra)  # type: ignore[arg-type]
    cid: str = cri.rt.CreateContainer(pb.CreateContainerRequest(
        pod_sandbox_id=pod, config=cfg), timeout=60).container_id
    cri.rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=60)
    return cid


def _crictl(c: Crictl, *args: str, stdin: bytes | None = None, under_script: bool = False
            ) -> subprocess.CompletedProcess[bytes]:
    argv = [tool("crictl"), "--config", c.config, *args]
    if under_script:  # a real pty of 40x100 for `exec -it`, as a terminal user has
        argv = [tool("script"), "-qec", "stty rows 40 cols 100; " + " ".join(argv),
                "/dev/null"]
    return subprocess.run(argv, input=stdin or b"", capture_output=True, timeout=60,
                          check=False)


def _wait_for(what: str, cond: Callable[[], bool], within: float = 15) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not within {within} s"
        time.sleep(0.05)


@contextlib.contextmanager
def _attached(c: Crictl, cid: str) -> Iterator[subprocess.Popen[bytes]]:
    """`crictl attach -i` running, its stdin a pipe; ended (SIGTERM) however the block ends."""
    proc = subprocess.Popen([tool("crictl"), "--config", c.config, "attach", "-i", cid],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=20)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()


def _read_until(proc: subprocess.Popen[bytes], needle: bytes, within: float = 15) -> bytes:
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    got = b""
    deadline = time.monotonic() + within
    while needle not in got:
        assert time.monotonic() < deadline, f"{needle!r} not read; got {got!r}"
        chunk = proc.stdout.read()
        if chunk:
            got += chunk
        else:
            time.sleep(0.05)
    return got


def test_crictl_exec_attach_and_port_forward_on_containers(env: Env, daemon: Daemon,
                                                          runtime: str) -> None:
    c = Crictl(daemon)
    logs = os.path.join(env.tmp, "logs")
    os.makedirs(logs, exist_ok=True)
    cri = Cri(daemon, runtime, logs)
    pod = cri.pod(f"stream-{runtime}")
    cid = _container(cri, pod, "work", ["sleep", "3600"], working_dir="/tmp",
                     envs=[pb.KeyValue(key="FOO", value="bar")],
                     linux=pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(
                         run_as_user=pb.Int64Value(value=1000))))

    # the exec'd process runs as the container's: user, cwd, env, bounding set, no_new_privs,
    # seccomp (the container's init as the host sees it)
    r = _crictl(c, "exec", cid, "sh", "-c", "id -u; pwd; echo $FOO")
    assert (r.returncode, r.stdout) == (0, b"1000\n/tmp\nbar\n"), r
    r = _crictl(c, "exec", cid, "grep", "-E", STATUS_LINES, "/proc/self/status")
    init = json.loads(cri.status(cid).info["info"])["pid"]
    want = subprocess.run(["grep", "-E", STATUS_LINES, f"/proc/{init}/status"],
                          capture_output=True, check=True).stdout
    assert r.returncode == 0 and r.stdout == want and b"CapBnd:\t00000000a80425fb" in want, r

    # -i: stdin reaches the command, its end is the command's EOF
    r = _crictl(c, "exec", "-i", cid, "cat", stdin=b"one\ntwo\n")
    assert (r.returncode, r.stdout) == (0, b"one\ntwo\n"), r

    # an exit code (the v4 status's ExitCode cause), stdout and stderr apart
    r = _crictl(c, "exec", cid, "sh", "-c", "echo out; echo err >&2; exit 5")
    assert r.returncode != 0 and r.stdout == b"out\n" and b"err\n" in r.stderr, r
    assert b"command terminated with exit code 5" in r.stderr, r  # crictl 1.26 exits 1

    # a command the container lacks: the runtime's error names it, and the exit is not 0
    r = _crictl(c, "exec", cid, "no-such-command")
    assert r.returncode != 0 and b"no-such-command" in r.stderr, r

    # 1 MiB arrives whole
    r = _crictl(c, "exec", cid, "sh", "-c", "head -c 1048576 /dev/zero | tr '\\0' x")
    assert r.returncode == 0 and r.stdout == b"x" * (1 << 20), (r.returncode, len(r.stdout))

    # -it under script: the command's terminal is the container's own pty, of the client's
    # size (crictl's resize reaching it), and reads what is typed
    r = _crictl(c, "exec", "-it", cid, "sh", "-c",
                "'sleep 1; tty; stty size; read x; echo got:$x'",
                stdin=b"typed\n", under_script=True)
    assert r.returncode == 0 and b"/dev/pts/0" in r.stdout, r
    assert b"\n40 100\r\n" in r.stdout and b"got:typed" in r.stdout, r

    # attach to a stdin_once shell: what is typed runs, the client's EOF ends the container
    once = _container(cri, pod, "once", ["sh"], stdin=True, stdin_once=True)
    r = _crictl(c, "attach", "-i", once, stdin=b"echo attached; echo to-err >&2\n")
    assert r.returncode == 0 and r.stdout == b"attached\n" and b"to-err" in r.stderr, r
    st = cri.wait_exited(once)
    assert (st.state, st.exit_code) == (pb.CONTAINER_EXITED, 0)

    # refusals, each naming the problem: no URL for an exited container, a request whose
    # streams make no sense, an empty command
    for req, code, words in (
            (pb.ExecRequest(container_id=once, cmd=["true"], stdout=True),
             grpc.StatusCode.FAILED_PRECONDITION, "not Running"),
            (pb.ExecRequest(container_id=cid, cmd=["true"], tty=True, stderr=True),
             grpc.StatusCode.INVALID_ARGUMENT, "tty and stderr"),
            (pb.ExecRequest(container_id=cid, cmd=["true"]),
             grpc.StatusCode.INVALID_ARGUMENT, "one of stdin, stdout, or stderr"),
            (pb.ExecRequest(container_id=cid, stdout=True),
             grpc.StatusCode.INVALID_ARGUMENT, "cmd is empty")):
        with pytest.raises(grpc.RpcError) as err:
            cri.rt.Exec(req, timeout=30)
        assert err.value.code() is code and words in str(err.value.details()), err.value
    with pytest.raises(grpc.RpcError) as err:
        cri.rt.Attach(pb.AttachRequest(container_id=once, stdout=True), timeout=30)
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION, err.value

    # without stdin_once the container's stdin stays open for the next client
    keep = _container(cri, pod, "keep", ["sh"], stdin=True)
    for word in (b"first", b"second"):
        with _attached(c, keep) as a:
            assert a.stdin is not None
            a.stdin.write(b"echo " + word + b"\n")
            a.stdin.flush()
            assert word in _read_until(a, word)
            a.stdin.close()
            time.sleep(0.5)
        assert cri.status(keep).status.state == pb.CONTAINER_RUNNING

    # attach -it to a tty container under script: the typed line reaches it, its pty has the
    # client's size (resized through conmon's control FIFO), the output comes back
    tty = _container(cri, pod, "tty", ["sh", "-c", "read x; sleep 1; stty size; echo got:$x"],
                     stdin=True, tty=True)
    r = _crictl(c, "attach", "-it", tty, stdin=b"typed\n", under_script=True)
    assert b"got:typed" in r.stdout and b"40 100" in r.stdout, r
    st = cri.wait_exited(tty)
    assert (st.state, st.exit_code) == (pb.CONTAINER_EXITED, 0)

    # port-forward: 20 requests through one crictl port-forward reach the pod's web server
    web = _container(cri, pod, "web", ["/bin/sh", "-c", "exec httpd -f -p 80 -h /tmp"])
    assert _crictl(c, "exec", web, "sh", "-c", "echo pod-page > /tmp/index.html").returncode == 0
    local = _free_port()
    with crictl_port_forward(c, pod, local, 80):
        answers = []
        for _ in range(20):
            with urllib.request.urlopen(f"http://127.0.0.1:{local}/", timeout=10) as resp:
                answers.append((resp.status, resp.read()))
    assert answers == [(200, b"pod-page\n")] * 20


# -- a client that vanishes -----------------------------------------------------------------


def _pids_running(*words: str) -> list[int]:
    """Pids on the host whose command line is exactly `words`."""
    want = "\0".join(words).encode() + b"\0"
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{name}/cmdline").read_bytes() == want:
                    found.append(int(name))
    return found


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            out += [int(p) for p in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return out


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_client_that_vanishes_mid_exec_leaves_nothing(env: Env, daemon: Daemon,
                                                        runtime: str) -> None:
    """crictl killed (SIGKILL) mid-exec, on pipes and on a tty: the exec'd command and what
    it started in the background are gone from the host, the runtime's exec command reaped,
    and podfsm holds no more descriptors than before."""
    c = Crictl(daemon)
    logs = os.path.join(env.tmp, "logs")
    os.makedirs(logs, exist_ok=True)
    cri = Cri(daemon, runtime, logs)
    pod = cri.pod(f"vanish-{runtime}")
    cid = _container(cri, pod, "work", ["sleep", "3600"])
    podfsm = daemon.proc.pid
    children = set(_children(podfsm))
    r = _crictl(c, "exec", cid, "true")  # one exec first: whatever it opens once is counted
    assert r.returncode == 0, r
    fds = _fds(podfsm)
    for n, tty in ((1000, False), (1002, True)):
        flags = ["-it"] if tty else []
        argv = [tool("crictl"), "--config", c.config, "exec", *flags, cid, "sh", "-c",
                f"'sleep {n} & exec sleep {n + 1}'" if tty else f"sleep {n} & exec sleep {n + 1}"]
        if tty:
            argv = [tool("script"), "-qec", " ".join(argv), "/dev/null"]
        client = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            _wait_for("the exec'd sleeps", lambda n=n: bool(  # type: ignore[misc]
                _pids_running("sleep", str(n)) and _pids_running("sleep", str(n + 1))))
            assert set(_children(podfsm)) - children, "the runtime's exec is podfsm's child"
        finally:
            os.killpg(client.pid, signal.SIGKILL)
            client.wait()
            assert client.stdin is not None
            client.stdin.close()
        _wait_for("the exec'd processes gone", lambda n=n: not (  # type: ignore[misc]
            _pids_running("sleep", str(n)) or _pids_running("sleep", str(n + 1))))
        _wait_for("the runtime's exec reaped", lambda: set(_children(podfsm)) <= children)
        _wait_for(f"podfsm back to {fds} descriptors", lambda: _fds(podfsm) <= fds)
    # the container itself runs on, and a new exec works
    assert cri.status(cid).status.state == pb.CONTAINER_RUNNING
    assert _crictl(c, "exec", cid, "echo", "still").stdout == b"still\n"
    bundle_files = [f for f in os.listdir(os.path.join(env.cfg.state_dir, "containers", cid))
                    if f.startswith("exec-")]
    assert bundle_files == []
