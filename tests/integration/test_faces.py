"""`podfsm serve` as its users run it: a real daemon subprocess on a unix socket in a temporary
directory, its HTTP API and every CLI verb against real sandboxes (runc and crun), a graceful
SIGTERM that leaves the sandboxes running and a new daemon that re-attaches them (its socket
there only once it can answer), TCP's token, Host and Origin checks, and bounded requests and
event streams.

Each test has its own directories, CNI network, bridge and subnet (make_env) and leaves nothing
behind, also when it fails: the daemon is stopped (or killed) in a finally, then destroy_env.
The helpers here (serving, podfsm, ...) are shared with test_browser.py and test_examples.py.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import itertools
import json
import os
import re
import select
import signal
import socket
import stat
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from podfsm.core import cniconf
from podfsm.core.records import SandboxStatus
from podfsm.core.states import STATES, TRANSITIONS
from podfsm.drivers import linux
from tests.integration.anyregistry import any_registry
from tests.integration.conftest import Env, destroy_env, make_env

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PODS = ROOT / "examples" / "pods"
EXAMPLE_PODS = sorted(PODS.glob("*.json"))
PYTHON = sys.executable
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
FORWARD = ["NamespacesReady", "ContainerCreated", "TaskRunning", "Ready"]
# design.md: what `inspectp -o json` carries at least
INSPECT_FIELDS = {"id", "name", "namespace", "uid", "state", "created_at", "pid", "netns_path",
                  "userns_path", "ip", "additional_ips", "uid_mappings", "gid_mappings",
                  "exit_status", "history"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_logs = itertools.count(1)


# ---------------------------------------------------------------------- helpers


def use_env_network(env: Env) -> None:
    """`serve` has no options for its default network's names, so give it the env's network as
    a CNI config file, as an operator would."""
    conf = cniconf.default_conflist(env.network, env.bridge, env.subnet)
    Path(env.cfg.cni_conf_dir, "10-podfsm-test.conflist").write_text(json.dumps(conf))


def serve_argv(env: Env, socket_path: str, *extra: str) -> list[str]:
    """The CRI socket goes beside `socket_path` (cri.sock), never to the host's default; every
    registry is a closed port of 127.0.0.1 (a generated pull never leaves the machine) unless
    `extra` gives another --registry-config-dir."""
    c = env.cfg
    certs = os.path.join(env.tmp, "no-registries")
    os.makedirs(os.path.join(certs, "_default"), exist_ok=True)
    Path(certs, "_default", "hosts.toml").write_text('server = "http://127.0.0.1:9"\n')
    return [PYTHON, "-m", "podfsm", "serve", "--socket", socket_path, "--state-dir", c.state_dir,
            "--run-dir", c.run_dir, "--netns-dir", c.netns_dir, "--runtime", c.runtime,
            "--cni-conf-dir", c.cni_conf_dir, "--registry-config-dir", certs,
            "--cri-socket", os.path.join(os.path.dirname(socket_path), "cri.sock"), *extra]


@dataclass
class Daemon:
    """A `podfsm serve` subprocess."""

    env: Env
    socket: str
    proc: subprocess.Popen[bytes]
    log: Path
    tcp_port: int | None = None

    @property
    def cri_socket(self) -> str:
        """Where this daemon serves the CRI (see serve_argv)."""
        return os.path.join(os.path.dirname(self.socket), "cri.sock")

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=self.socket),
                            base_url="http://podfsm", timeout=timeout, trust_env=False)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def token(self) -> str:
        """The TCP token: `serve` keeps it beside the socket unless told otherwise."""
        return Path(os.path.dirname(self.socket), "http-token").read_text().strip()

    def tcp_client(self, timeout: float = 60.0, **kw: Any) -> httpx.Client:
        """A client of the TCP listener that sends the token."""
        assert self.tcp_port is not None
        return httpx.Client(base_url=f"http://127.0.0.1:{self.tcp_port}", trust_env=False,
                            timeout=timeout, headers={"authorization": f"Bearer {self.token}"},
                            **kw)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, as an init system stops it; its exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        """However the test went: remove what is left through the API, stop, kill if need be."""
        if self.alive():
            with contextlib.suppress(Exception), self.client(timeout=30) as c:
                for item in c.get("/v1/sandboxes").json()["items"]:
                    c.delete(f"/v1/sandboxes/{item['id']}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.terminate(timeout=15)
        if self.alive():
            self.proc.kill()
        self.proc.wait()


def start_daemon(env: Env, *, port: int | None = None, host: str | None = None,
                 socket_path: str | None = None, options: Sequence[str] = (),
                 until_socket_file: bool = False, new_session: bool = False) -> Daemon:
    """Start `podfsm serve` on the env and wait until /healthz answers 200 (or, as scripts
    do, only until its socket file exists). `new_session`: in a session of its own (setsid),
    whose leader it is, without a controlling terminal, as an init system starts it."""
    sock = socket_path or os.path.join(env.tmp, "podfsm.sock")
    extra = ([] if port is None else ["--port", str(port)]) + ([] if host is None
                                                               else ["--host", host])
    extra += options
    log = Path(env.tmp, f"serve-{next(_logs)}.log")
    with open(log, "wb") as out:
        proc = subprocess.Popen(serve_argv(env, sock, *extra), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=new_session)
    d = Daemon(env, sock, proc, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        with d.client(timeout=5) as c:
            while True:
                if not d.alive():
                    raise AssertionError(f"serve exited {proc.returncode}:\n{d.log_text()}")
                if until_socket_file and os.path.exists(sock):
                    break
                # probe with a plain socket first: httpx leaks one when connect() fails
                if not until_socket_file and _accepts(sock) and (
                        c.get("/healthz").status_code == 200):
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"serve did not come up:\n{d.log_text()}")
                time.sleep(0.001 if until_socket_file else 0.05)
        if port is not None:
            m = re.search(r"and on http://\[?([^\s\]]+)\]?:(\d+)/", d.log_text())
            assert m, d.log_text()
            d.tcp_port = int(m.group(2))
    except BaseException:
        d.close()
        raise
    return d


def _accepts(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


@contextlib.contextmanager
def serving(env: Env, **kw: Any) -> Iterator[Daemon]:
    """A running daemon that is stopped, or killed, however the block ends."""
    d = start_daemon(env, **kw)
    try:
        yield d
    finally:
        d.close()


def podfsm_argv(sock: str | None, *args: str) -> list[str]:
    return [PYTHON, "-m", "podfsm", *(["--socket", sock] if sock else []), *args]


def podfsm(sock: str | None, *args: str, environ: dict[str, str] | None = None,
           timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the podfsm command line against the daemon on `sock`."""
    return subprocess.run(podfsm_argv(sock, *args), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=environ, stdin=subprocess.DEVNULL,
                          check=False)


def podfsm_all(sock: str | None, *argvs: Sequence[str]) -> list[subprocess.CompletedProcess[str]]:
    """Several podfsm commands at once (each is a Python start-up: run them side by side)."""
    procs = [subprocess.Popen(podfsm_argv(sock, *a), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                              cwd=ROOT) for a in argvs]
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=120)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


def tcp_listeners(pid: int) -> list[tuple[str, int]]:
    """The (address, port) of every listening TCP socket process `pid` holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
            if m:
                inodes.add(m.group(1))
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # TCP_LISTEN
                addr, port = fields[1].split(":")
                raw = bytes.fromhex(addr)
                # the kernel prints each 32-bit word in host (little-endian) order
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.append((str(ipaddress.ip_address(words)), int(port, 16)))
    return found


def stream_port(d: Daemon) -> int:
    """The port of the daemon's streaming server (with the CRI socket), from its log line."""
    m = re.search(r"streaming server \(exec, attach, port-forward\) on http://127\.0\.0\.1:(\d+)",
                  d.log_text())
    assert m, "no streaming server in the log"
    return int(m.group(1))


def svg_current(svg: bytes) -> list[str]:
    """The ids of the nodes drawn as the current state."""
    root = ET.fromstring(svg)
    return [g.get("id", "") for g in root.iter("{http://www.w3.org/2000/svg}g")
            if "current" in g.get("class", "").split()]


def pid_alive(pid: int) -> bool:
    fields = linux.proc_stat(pid)
    return fields is not None and fields[0] != "Z"


def wait_for_state(c: httpx.Client, sandbox_id: str, state: str, within: float) -> SandboxStatus:
    deadline = time.monotonic() + within
    while True:
        st = SandboxStatus.model_validate_json(c.get(f"/v1/sandboxes/{sandbox_id}").content)
        if st.state == state:
            return st
        assert time.monotonic() < deadline, f"still {st.state} after {within}s"
        time.sleep(0.01)


def read_sse(c: httpx.Client, count: int, **kw: Any) -> list[tuple[int, dict[str, Any]]]:
    """The first `count` events of GET /v1/events as (id, data)."""
    found: list[tuple[int, dict[str, Any]]] = []
    with c.stream("GET", "/v1/events", timeout=httpx.Timeout(10.0), **kw) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        event: dict[str, str] = {}
        for line in r.iter_lines():
            if line:
                name, _, value = line.partition(":")
                event[name] = value.removeprefix(" ")
            elif "data" in event:
                found.append((int(event["id"]), json.loads(event["data"])))
                if len(found) == count:
                    break
                event = {}
            else:
                event = {}
    return found


class Streaming:
    """A long-running podfsm command (`events`) whose output is read line by line, each read
    with a deadline. (Not through Popen's text wrappers: communicate() would skip what they
    buffered.)"""

    def __init__(self, sock: str, *args: str) -> None:
        self.proc = subprocess.Popen(podfsm_argv(sock, *args), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=ROOT)
        self._buf = b""
        self._eof = False

    def _fill(self, deadline: float) -> None:
        assert self.proc.stdout is not None
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no output in time; so far: {self._buf!r}"
        ready, _, _ = select.select([self.proc.stdout], [], [], remaining)
        if ready:
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            self._buf += chunk
            self._eof = not chunk

    def lines(self, count: int, timeout: float = 15) -> list[str]:
        """The next `count` lines."""
        deadline = time.monotonic() + timeout
        while self._buf.count(b"\n") < count:
            assert not self._eof, f"output ended early: {self._buf!r}"
            self._fill(deadline)
        *lines, self._buf = self._buf.split(b"\n", count)
        return [line.decode() + "\n" for line in lines]

    def finish(self, timeout: float = 15) -> tuple[int, str, str]:
        """Wait for the end: exit status, the output not read yet, and stderr."""
        deadline = time.monotonic() + timeout
        while not self._eof:
            self._fill(deadline)
        assert self.proc.stderr is not None
        rc = self.proc.wait(max(0.1, deadline - time.monotonic()))
        rest, self._buf = self._buf.decode(), b""
        return rc, rest, self.proc.stderr.read().decode()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


def check_error(r: httpx.Response, status: int, kind: str) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["kind"] == kind, body
    assert isinstance(body["error"], str) and body["error"]
    return str(body["error"])


# ---------------------------------------------------------------------- the main flow


def test_every_endpoint_and_verb_against_a_real_daemon(env: Env, tmp_path: Path) -> None:
    use_env_network(env)
    subnet = ipaddress.ip_network(env.subnet)
    with serving(env) as d, d.client() as c:
        # the socket: a socket, root's, mode 0660; and no TCP listener unless asked but the
        # streaming server's, on loopback (docs/streaming.md)
        sst = os.stat(d.socket)
        assert stat.S_ISSOCK(sst.st_mode) and stat.S_IMODE(sst.st_mode) == 0o660
        assert sst.st_uid == 0
        assert tcp_listeners(d.proc.pid) == [("127.0.0.1", stream_port(d))]

        health = c.get("/healthz")
        assert health.status_code == 200
        assert health.json() == {"status": "ok"}  # it says no more: it needs no token
        doc = c.get("/openapi.json").json()
        assert doc["openapi"].startswith("3.")
        assert set(doc["paths"]) == {
            "/healthz", "/v1/sandboxes", "/v1/sandboxes/{sandbox_id}",
            "/v1/sandboxes/{sandbox_id}/stop", "/v1/sandboxes/{sandbox_id}/graph",
            "/v1/graph", "/v1/events", "/v1/images", "/v1/images/{image_id}",
            *(f"/v1/containers{tail}" for tail in (
                "", "/{container_id}", "/{container_id}/info", "/{container_id}/start",
                "/{container_id}/stop", "/{container_id}/exec", "/{container_id}/logs",
                "/{container_id}/stats"))}
        # containers (tests/integration/test_container_faces.py runs real ones): none yet
        assert c.get("/v1/containers").json() == {"items": []}
        # images (tests/integration/test_images*.py pull for real): this daemon's every
        # registry is a closed port of 127.0.0.1 (serve_argv)
        assert c.get("/v1/images").json() == {"items": []}
        failed = c.post("/v1/images", json={"image": "busybox"})
        assert failed.status_code == 502 and "127.0.0.1:9" in failed.json()["error"]
        assert c.get(f"/v1/images/{'f' * 64}").status_code == 404
        assert c.delete(f"/v1/images/{'f' * 64}").status_code == 204
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'id="conn"' in page.text and 'id="log"' in page.text

        # `podfsm events` from the start, until the daemon stops
        events = Streaming(d.socket, "events", "--since", "0", "-o", "json")
        try:
            # runp: every sample pod config of examples/pods, side by side
            runs = podfsm_all(d.socket, *[("runp", str(p)) for p in EXAMPLE_PODS])
            for p, r in zip(EXAMPLE_PODS, runs, strict=True):
                assert r.returncode == 0, (p.name, r.stderr)
                assert re.fullmatch(r"[0-9a-f]{64}\n", r.stdout)
            ids = {p.stem: r.stdout.strip() for p, r in zip(EXAMPLE_PODS, runs, strict=True)}
            assert set(ids) == {"host-network", "node-userns", "userns-allocated",
                                "userns-mappings"}

            # pods: the table, -q, -o json, filters; the --socket after the verb too
            table, quiet, listing, by_name = podfsm_all(
                None, ("pods", "--socket", d.socket), ("--socket", d.socket, "pods", "-q"),
                ("--socket", d.socket, "pods", "-o", "json"),
                ("--socket", d.socket, "pods", "--name", "mapp", "-q"))
            assert table.returncode == quiet.returncode == listing.returncode == 0
            lines = table.stdout.splitlines()
            assert lines[0].split()[:3] == ["POD", "ID", "CREATED"]
            assert len(lines) == 5 and all(" Ready " in line for line in lines[1:])
            for sandbox_id in ids.values():
                assert sandbox_id[:13] in table.stdout
            assert set(quiet.stdout.split()) == set(ids.values())
            assert {i["id"] for i in json.loads(listing.stdout)["items"]} == set(ids.values())
            assert by_name.stdout.split() == [ids["userns-mappings"]]

            # inspectp -o json: design.md's fields, the same as GET /v1/sandboxes/{id}
            inspected = podfsm_all(d.socket, *[("inspectp", "-o", "json", i)
                                               for i in ids.values()])
            status = {}
            for (stem, sandbox_id), r in zip(ids.items(), inspected, strict=True):
                assert r.returncode == 0, r.stderr
                data = json.loads(r.stdout)
                assert set(data) >= INSPECT_FIELDS, INSPECT_FIELDS - set(data)
                assert data == c.get(f"/v1/sandboxes/{sandbox_id}").json()
                assert data["id"] == sandbox_id and data["state"] == "Ready"
                assert [h["dest"] for h in data["history"]] == FORWARD
                assert all(set(h) == {"source", "dest", "trigger", "at", "error"}
                           for h in data["history"])
                assert data["exit_status"] is None and pid_alive(data["pid"])
                status[stem] = data
            web, mapped = status["userns-allocated"], status["userns-mappings"]
            assert (web["name"], web["namespace"], web["uid"]) == ("web", "default", "web-1")
            for s in (web, mapped):
                assert s["userns_path"] and s["netns_path"]
                assert ipaddress.ip_address(s["ip"]) in subnet
                assert s["gid_mappings"] == s["uid_mappings"]
            alloc = web["uid_mappings"][0]
            assert alloc["container_id"] == 0 and alloc["length"] == 65536
            assert alloc["host_id"] >= 65536
            assert mapped["uid_mappings"] == [{"host_id": 3000000, "container_id": 0,
                                               "length": 65536}]
            plain, hostnet = status["node-userns"], status["host-network"]
            assert plain["userns_path"] is None and plain["netns_path"]
            assert ipaddress.ip_address(plain["ip"]) in subnet
            assert hostnet["netns_path"] is None and hostnet["ip"] == ""
            assert len({s["ip"] for s in (web, mapped, plain)}) == 3

            # inspectp for people, by a unique prefix
            human = podfsm(d.socket, "inspectp", ids["userns-allocated"][:10])
            assert human.returncode == 0, human.stderr
            assert re.search(r"^State:\s+Ready$", human.stdout, re.MULTILINE)
            assert "History:" in human.stdout and "mark_ready" in human.stdout

            # graph ID -o FILE: .svg, .png, .mmd
            files = {ext: tmp_path / f"x.{ext}" for ext in ("svg", "png", "mmd")}
            drawn = podfsm_all(d.socket, *[("graph", ids["userns-allocated"], "-o", str(f))
                                           for f in files.values()])
            assert [r.returncode for r in drawn] == [0, 0, 0], [r.stderr for r in drawn]
            assert svg_current(files["svg"].read_bytes()) == ["state-Ready"]
            assert files["png"].read_bytes().startswith(PNG_MAGIC)
            mmd = files["mmd"].read_text()
            assert "    class Ready current" in mmd
            assert "TaskRunning --> Ready : mark_ready (4)" in mmd

            # the diagrams over HTTP
            for fmt, media in (("svg", "image/svg+xml"), ("png", "image/png"),
                               ("mmd", "text/vnd.mermaid"), ("dot", "text/vnd.graphviz")):
                r = c.get("/v1/graph", params={"format": fmt})
                assert r.status_code == 200 and r.headers["content-type"].startswith(media)
            machine = c.get("/v1/graph", params={"format": "mmd"}).text
            for state in STATES:
                assert state.value in machine
            for t in TRANSITIONS:
                assert re.search(rf"^\s+{t.source} --> {t.dest} : .*\b{t.trigger}\b", machine,
                                 re.MULTILINE), t
            assert svg_current(c.get("/v1/graph").content) == []
            one = c.get(f"/v1/sandboxes/{ids['userns-mappings']}/graph")
            assert one.status_code == 200 and svg_current(one.content) == ["state-Ready"]

            # errors: 404 unknown sandbox; stop and remove are idempotent (as the CRI's)
            unknown = "0" * 64
            for method, path in (("GET", ""), ("GET", "/graph")):
                r = c.request(method, f"/v1/sandboxes/{unknown}{path}")
                assert unknown in check_error(r, 404, "SandboxNotFound")
            for method, path in (("POST", "/stop"), ("DELETE", "")):
                r = c.request(method, f"/v1/sandboxes/{unknown}{path}")
                assert (r.status_code, r.content) == (204, b"")
            check_error(c.get("/v1/sandboxes/not-an-id"), 400, "BadRequest")
            check_error(c.get("/v1/nothing-here"), 404, "NotFound")
            # 409: the name is reserved
            again = c.post("/v1/sandboxes", content=(PODS / "userns-allocated.json").read_bytes(),
                           headers={"content-type": "application/json"})
            assert ids["userns-allocated"] in check_error(again, 409, "NameReserved")
            # 422: refused pod configs, before anything is created
            bad_pods: list[bytes] = [
                json.dumps({"metadata": {"name": "bad"}, "linux": {"security_context": {
                    "namespace_options": {"userns_options": {"mode": "CONTAINER"}}}}}).encode(),
                json.dumps({"metadata": {"name": "bad"}, "linux": {"security_context": {
                    "namespace_options": {"userns_options": {
                        "mode": "POD", "uids": [{"host_id": 2000000, "container_id": 1,
                                                 "length": 10}],
                        "gids": [{"host_id": 2000000, "container_id": 0,
                                  "length": 10}]}}}}}).encode(),
                json.dumps({"metadata": {"name": "not;a;name"}}).encode(),
                b"{}", b"[]", b"not json", b"",
            ]
            for body in bad_pods:
                check_error(c.post("/v1/sandboxes", content=body,
                                   headers={"content-type": "application/json"}),
                            422, "InvalidPodConfig")
            # 415: a body that is not application/json (a cross-site form could send one)
            good = (PODS / "node-userns.json").read_bytes()
            for media in ("text/plain", "application/x-www-form-urlencoded"):
                check_error(c.post("/v1/sandboxes", content=good,
                                   headers={"content-type": media}),
                            415, "UnsupportedMediaType")
            # 400: a malformed parameter
            check_error(c.get("/v1/graph", params={"format": "gif"}), 400, "BadRequest")
            check_error(c.get("/v1/events", params={"since": "yesterday"}), 400, "BadRequest")
            assert len(c.get("/v1/sandboxes").json()["items"]) == 4

            # the CLI's exit status 1: the daemon's error, or a bad input file
            bad_file = tmp_path / "bad.json"
            bad_file.write_text('{"metadata": {"name": "x"}, "linux": {"security_context": '
                                '{"namespace_options": {"userns_options": {"mode": "TARGET"}}}}}')
            failed = podfsm_all(d.socket, ("runp", str(PODS / "userns-allocated.json")),
                                ("runp", str(bad_file)), ("runp", str(tmp_path / "missing.json")),
                                ("inspectp", unknown),
                                ("graph", unknown, "-o", str(tmp_path / "u.svg")),
                                ("stopp", unknown), ("rmp", unknown), ("stopp", "abc0"),
                                ("rmp", "abc0"))
            assert [r.returncode for r in failed] == [1] * 5 + [0] * 4, [
                r.stderr for r in failed]
            assert "reserved" in failed[0].stderr
            assert "invalid pod config" in failed[1].stderr and "TARGET" in failed[1].stderr
            assert "missing.json" in failed[2].stderr
            assert all("not found" in r.stderr for r in failed[3:5])
            # stopp and rmp of what is not there: crictl's line and exit 0, as crictl
            assert [(r.stdout, r.stderr) for r in failed[5:]] == [
                (f"Stopped sandbox {unknown}\n", ""), (f"Removed sandbox {unknown}\n", ""),
                ("Stopped sandbox abc0\n", ""), ("Removed sandbox abc0\n", "")]

            # SSE: `id:` is the seq; Last-Event-ID and ?since= resume after it
            seq = c.get("/v1/sandboxes").json()["last_event_seq"]
            assert seq == 16
            resumed = read_sse(c, 3, headers={"Last-Event-ID": str(seq - 3)})
            assert [i for i, _ in resumed] == [seq - 2, seq - 1, seq]
            assert all(ev["seq"] == i for i, ev in resumed)
            assert [i for i, _ in read_sse(c, 2, params={"since": seq - 2})] == [seq - 1, seq]

            # stop: with the CLI and over HTTP; idempotent; then NotReady
            stopped = podfsm(d.socket, "stopp", ids["node-userns"])
            assert stopped.returncode == 0, stopped.stderr
            assert stopped.stdout == f"Stopped sandbox {ids['node-userns']}\n"
            for _ in range(2):
                r = c.post(f"/v1/sandboxes/{ids['host-network']}/stop")
                assert r.status_code == 200 and r.json()["state"] == "NotReady"
                assert r.json()["history"][-1]["trigger"] == "stop"
            assert not pid_alive(status["host-network"]["pid"])
            not_ready = podfsm(d.socket, "pods", "--state", "NotReady", "-q")
            assert set(not_ready.stdout.split()) == {ids["node-userns"], ids["host-network"]}
            one = c.get(f"/v1/sandboxes/{ids['node-userns']}/graph", params={"format": "svg"})
            assert svg_current(one.content) == ["state-NotReady"]

            # remove: rmp (one of them still Ready), DELETE; again: nothing to do, 204
            removed = podfsm(d.socket, "rmp", ids["node-userns"], ids["userns-allocated"])
            assert removed.returncode == 0, removed.stderr
            assert removed.stdout.count("Removed sandbox") == 2
            for stem in ("host-network", "userns-mappings"):
                assert c.delete(f"/v1/sandboxes/{ids[stem]}").status_code == 204
                assert c.delete(f"/v1/sandboxes/{ids[stem]}").status_code == 204
                check_error(c.get(f"/v1/sandboxes/{ids[stem]}"), 404, "SandboxNotFound")
            listing = c.get("/v1/sandboxes").json()
            assert listing["items"] == []
            assert podfsm(d.socket, "pods", "-q").stdout == ""

            # SIGTERM: a clean exit 0, the socket gone, and `events` ends with 0 too
            out = "".join(events.lines(listing["last_event_seq"]))
            assert d.terminate() == 0, d.log_text()
            assert not os.path.exists(d.socket)
            rc, rest, err = events.finish()
            assert (rc, rest) == (0, ""), err
        finally:
            events.close()
        seen = [json.loads(line) for line in out.splitlines()]
        assert [e["seq"] for e in seen] == list(range(1, len(seen) + 1))
        for stem, sandbox_id in ids.items():
            dests = [e["dest"] for e in seen if e["sandbox_id"] == sandbox_id]
            assert dests[:4] == FORWARD, stem
            assert dests[-2:] == ["NotReady", "Unknown"], stem
        assert "Traceback" not in d.log_text()
    assert env.leftovers() == {}


def test_exit_codes_without_a_daemon_and_usage_errors(tmp_path: Path) -> None:
    missing = str(tmp_path / "none.sock")
    no_daemon = podfsm_all(missing, ("pods",), ("inspectp", "abc"),
                           ("runp", str(PODS / "node-userns.json")), ("stopp", "abc"),
                           ("rmp", "abc"), ("events",),
                           ("graph", "abc", "-o", str(tmp_path / "g.svg")))
    for r in no_daemon:
        assert r.returncode == 2, (r.args, r.stderr)
        assert f"no podfsm daemon answers on {missing}" in r.stderr
    via_env = podfsm(None, "pods", environ={**os.environ, "PODFSM_SOCKET": missing})
    assert via_env.returncode == 2 and missing in via_env.stderr

    usage = podfsm_all(None, (), ("frobnicate",), ("graph", "-o", str(tmp_path / "g.gif")),
                       ("pods", "-o", "yaml"), ("serve", "--host", "127.0.0.1"),
                       ("stopp",), ("serve", "--runtime", "youki"))
    assert [r.returncode for r in usage] == [2] * 7, [r.stderr for r in usage]
    assert all("usage: podfsm" in r.stderr for r in usage)

    # the verbs that need no daemon
    machine, names, version = podfsm_all(None, ("graph",), ("debug", "failpoints"),
                                         ("--version",))
    assert machine.returncode == names.returncode == version.returncode == 0
    assert machine.stdout.startswith("stateDiagram-v2\n")
    for t in TRANSITIONS:
        assert f"{t.source} --> {t.dest} : " in machine.stdout
    assert len(names.stdout.split()) > 10
    assert version.stdout.startswith("podfsm ")


def test_tcp_needs_the_token_a_listening_name_and_the_pages_origin(tmp_path: Path) -> None:
    env = make_env("runc")
    try:
        use_env_network(env)
        with serving(env, port=0) as d:
            assert d.tcp_port is not None
            assert sorted(tcp_listeners(d.proc.pid)) == sorted(
                [("127.0.0.1", d.tcp_port), ("127.0.0.1", stream_port(d))])
            token_file = Path(env.tmp, "http-token")
            assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
            assert token_file.stat().st_uid == 0 and len(d.token) >= 32
            origin = f"http://127.0.0.1:{d.tcp_port}"
            pod = (PODS / "node-userns.json").read_bytes()
            with httpx.Client(base_url=origin, trust_env=False, timeout=60) as anon, \
                    d.tcp_client() as tcp:
                # without a token: the page, liveness (its status only) and the document
                assert anon.get("/healthz").json() == {"status": "ok"}
                assert anon.get("/").headers["content-type"].startswith("text/html")
                assert anon.get("/openapi.json").status_code == 200
                for method, path in (("GET", "/v1/sandboxes"), ("GET", "/v1/events"),
                                     ("DELETE", f"/v1/sandboxes/{'0' * 64}")):
                    r = anon.request(method, path)
                    check_error(r, 401, "Unauthorized")
                    assert r.headers["www-authenticate"].startswith("Bearer")
                check_error(anon.get("/v1/sandboxes", headers={
                    "authorization": f"Bearer {d.token[:-1]}"}), 401, "Unauthorized")
                # what a cross-site page can send (a text/plain form post) creates nothing
                r = anon.post("/v1/sandboxes", content=pod, headers={
                    "content-type": "text/plain", "origin": "http://evil.example"})
                assert r.status_code in (401, 403)
                # DNS rebinding: a foreign Host is refused, even with the token
                check_error(tcp.get("/v1/sandboxes", headers={"host": "evil.example"}),
                            403, "Forbidden")
                check_error(anon.get("/healthz", headers={
                    "host": f"evil.example:{d.tcp_port}"}), 403, "Forbidden")
                assert tcp.get("/v1/sandboxes", headers={
                    "host": f"localhost:{d.tcp_port}"}).status_code == 200
                # a foreign Origin may not change anything, token or not
                check_error(tcp.post("/v1/sandboxes", content=pod, headers={
                    "content-type": "application/json", "origin": "http://evil.example"}),
                    403, "Forbidden")
                check_error(tcp.post("/v1/sandboxes", content=pod, headers={
                    "content-type": "text/plain"}), 415, "UnsupportedMediaType")
                assert tcp.get("/v1/sandboxes").json()["items"] == []

                # the URL serve prints sets an HttpOnly SameSite=Strict cookie and leads to /
                m = re.search(r"open (http://\S+)", d.log_text())
                assert m and m.group(1) == f"{origin}/?token={d.token}"
                r = anon.get(m.group(1))
                assert r.status_code == 303 and r.headers["location"] == "/"
                cookie = r.headers["set-cookie"]
                assert cookie.startswith(f"podfsm_token_{d.tcp_port}={d.token};")
                assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
                check_error(anon.get(f"/?token={d.token}x"), 401, "Unauthorized")
                jar = {f"podfsm_token_{d.tcp_port}": d.token}
                with httpx.Client(base_url=origin, trust_env=False, timeout=60,
                                  cookies=jar) as page:
                    assert page.get("/v1/sandboxes").status_code == 200
                    # with the cookie alone, a change must say it comes from the page
                    json_type = {"content-type": "application/json"}
                    check_error(page.post("/v1/sandboxes", content=pod, headers=json_type),
                                403, "Forbidden")
                    r = page.post("/v1/sandboxes", content=pod,
                                  headers={**json_type, "origin": origin})
                    assert r.status_code == 201, r.text
                    r = page.delete(f"/v1/sandboxes/{r.json()['id']}",
                                    headers={"origin": origin})
                    assert r.status_code == 204
            with d.client() as c:  # the unix socket takes no token
                assert c.get("/v1/sandboxes").json()["items"] == []
            assert d.terminate() == 0
        assert env.leftovers() == {}

        # a token file that others may read is refused; --token-file is where it is kept
        token_file = Path(env.tmp, "http-token")
        token_file.chmod(0o644)
        sock = os.path.join(env.tmp, "p.sock")
        refused = subprocess.run(serve_argv(env, sock, "--port", "0"), capture_output=True,
                                 text=True, timeout=60, cwd=ROOT, check=False)
        assert refused.returncode == 1 and "mode 0600" in refused.stderr, refused.stderr
        assert not os.path.exists(sock)
        token_file.unlink()
        own = tmp_path / "sub" / "token"
        with serving(env, port=0, options=("--token-file", str(own))) as d:
            token = own.read_text().strip()
            assert stat.S_IMODE(own.stat().st_mode) == 0o600 and token != ""
            with httpx.Client(base_url=f"http://127.0.0.1:{d.tcp_port}", trust_env=False,
                              headers={"authorization": f"Bearer {token}"}) as tcp:
                assert tcp.get("/v1/sandboxes").status_code == 200
            assert d.terminate() == 0
        assert not token_file.exists()
    finally:
        destroy_env(env)


def _half_requests(sock_path: str, head: bytes, n: int) -> list[socket.socket]:
    conns = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock_path)
        s.sendall(head)
        conns.append(s)
    return conns


def _closed_within(conns: list[socket.socket], seconds: float) -> bool:
    """Whether the server closed every one of `conns` within `seconds`."""
    deadline = time.monotonic() + seconds
    open_ = list(conns)
    while open_ and time.monotonic() < deadline:
        ready, _, _ = select.select(open_, [], [], max(0.0, deadline - time.monotonic()))
        for s in ready:
            try:
                data = s.recv(4096)
            except ConnectionResetError:
                data = b""
            if data == b"":
                open_.remove(s)
    return not open_


def test_bounded_http_slow_requests_and_event_streams(env: Env) -> None:
    use_env_network(env)
    options = ("--header-timeout", "1", "--body-timeout", "2", "--max-event-streams", "3")
    with serving(env, options=options) as d, d.client() as c:
        # slowloris: 20 requests whose head never ends, 20 whose body never does
        heads = _half_requests(d.socket, b"GET /v1/sandboxes HTTP/1.1\r\nHost: podfsm\r\n", 20)
        bodies = _half_requests(d.socket, b"POST /v1/sandboxes HTTP/1.1\r\nHost: podfsm\r\n"
                                b"content-type: application/json\r\ncontent-length: 100\r\n"
                                b"\r\n{", 20)
        silent = _half_requests(d.socket, b"", 1)  # connects and says nothing
        try:
            t0 = time.monotonic()
            assert _closed_within(heads + silent, 3.0), "slow heads were held open"
            assert _closed_within(bodies, 4.0), "slow bodies were held open"
            assert time.monotonic() - t0 >= 1.0  # not before the timeout
        finally:
            for s in heads + bodies + silent:
                s.close()
        # the daemon answers on, and a slow POST created nothing
        assert c.get("/v1/sandboxes").json()["items"] == []

        # at most 3 event streams; a fourth is 503, and a place frees when one ends
        with contextlib.ExitStack() as streams:
            for _ in range(3):
                r = streams.enter_context(c.stream("GET", "/v1/events"))
                assert r.status_code == 200
            check_error(c.get("/v1/events", timeout=5), 503, "ServiceUnavailable")
        deadline = time.monotonic() + 5
        while True:
            with c.stream("GET", "/v1/events") as again:
                if again.status_code == 200:
                    break
            assert time.monotonic() < deadline, "the streams' places were not freed"
            time.sleep(0.05)
        assert d.terminate() == 0
    assert env.leftovers() == {}


# ---------------------------------------------------------------------- SIGTERM and restart


def test_sigterm_leaves_the_sandbox_running_and_a_new_daemon_reattaches(env: Env) -> None:
    use_env_network(env)
    with serving(env) as first, first.client() as c:
        r = c.post("/v1/sandboxes", content=(PODS / "userns-allocated.json").read_bytes(),
                   headers={"content-type": "application/json"})
        assert r.status_code == 201 and r.headers["location"].startswith("/v1/sandboxes/")
        st = SandboxStatus.model_validate_json(r.content)
        assert st.state == "Ready" and st.pid is not None
        events = Streaming(first.socket, "events", "--since", "0")
        try:
            # the stream replays the run; then the daemon goes, and so does the stream
            out = "".join(events.lines(4))
            assert first.terminate() == 0, first.log_text()
            rc, rest, err = events.finish()
            assert (rc, rest) == (0, ""), err
        finally:
            events.close()
        assert f"{st.id[:13]} Unknown -> NamespacesReady (setup_namespaces)" in out
        assert f"{st.id[:13]} TaskRunning -> Ready (mark_ready)" in out
        assert "sandboxes keep running" in first.log_text()
    assert not os.path.exists(first.socket)
    assert pid_alive(st.pid)
    assert len(env.containers()) == 1
    gone = podfsm(first.socket, "pods")
    assert gone.returncode == 2 and "no podfsm daemon answers" in gone.stderr

    # the socket appears only once the daemon can answer: a script that waits for the file
    # and asks at once is answered (before, the socket came first and answered 503 "starting"
    # while the controller recovered the sandbox)
    with serving(env, until_socket_file=True) as second, second.client() as c:
        first_answer = c.get(f"/v1/sandboxes/{st.id}")
        assert first_answer.status_code == 200, first_answer.text
        again = SandboxStatus.model_validate_json(first_answer.content)
        assert again.state == "Ready"
        assert (again.pid, again.ip, again.created_at) == (st.pid, st.ip, st.created_at)
        assert (again.uid_mappings, again.netns_path, again.userns_path, again.history) == (
            st.uid_mappings, st.netns_path, st.userns_path, st.history)
        assert "1 sandbox(es) recovered" in second.log_text()
        # supervision is re-armed: a kill -9 of the pause process is noticed
        os.kill(st.pid, signal.SIGKILL)
        t0 = time.monotonic()
        dead = wait_for_state(c, st.id, "NotReady", within=5.0)
        noticed = time.monotonic() - t0
        assert dead.exit_status == 137 and dead.ip == st.ip
        assert dead.history[-1].trigger == "task_exit"
        assert noticed < 2.0
        assert c.delete(f"/v1/sandboxes/{st.id}").status_code == 204
        assert c.get("/v1/sandboxes").json()["items"] == []
        assert second.terminate() == 0, second.log_text()
    assert env.leftovers() == {}


# ---------------------------------------------------------------------- schemathesis

#: examples per operation and phase; CI keeps it small (the run stays under ~2 minutes),
#: `PODFSM_SCHEMATHESIS_EXAMPLES=100` is the longer run of docs/http.md
SCHEMATHESIS_EXAMPLES = int(os.environ.get("PODFSM_SCHEMATHESIS_EXAMPLES", "2"))
SCHEMATHESIS_CONFIG = Path(__file__).with_name("schemathesis.toml")
#: repairs of generated pod configs for the rules JSON Schema cannot state (see the module)
SCHEMATHESIS_HOOKS = Path(__file__).with_name("schemathesis_hooks.py")
#: the links of a whole lifecycle, each of which the stateful phase must follow to a 2xx
LIFECYCLE_LINKS = (
    "POST /v1/sandboxes -> [201] GetSandbox -> GET /v1/sandboxes/{sandbox_id}",
    "POST /v1/sandboxes -> [201] SandboxGraph -> GET /v1/sandboxes/{sandbox_id}/graph",
    "POST /v1/sandboxes -> [201] StopSandbox -> POST /v1/sandboxes/{sandbox_id}/stop",
    "POST /v1/sandboxes -> [201] RemoveSandbox -> DELETE /v1/sandboxes/{sandbox_id}",
)


def schemathesis_argv(port: int, token: str, examples: int, report: Path) -> list[str]:
    """schemathesis over the whole API of a daemon on 127.0.0.1:`port`: every check, every
    phase (stateful too, along the document's links), every warning a failure.

    One worker: with two, Hypothesis in two threads of CPython 3.11 met the interpreter's
    shared AST-constructor depth counter ("AST constructor recursion depth mismatch",
    python/cpython#106905), an error of the tool, not of podfsm."""
    return [str(Path(sys.executable).with_name("schemathesis")),
            "--config-file", str(SCHEMATHESIS_CONFIG), "run",
            f"http://127.0.0.1:{port}/openapi.json", "--checks", "all",
            "--phases", "examples,coverage,fuzzing,stateful", "-n", str(examples),
            "--header", f"Authorization: Bearer {token}", "--workers", "1",
            "--seed", "1", "--no-color", "--report", "ndjson", "--report-ndjson-path",
            str(report)]


@dataclass
class SchemathesisRun:
    """What schemathesis did, from its NDJSON report."""

    #: each link the stateful phase followed (schemathesis' name) -> the statuses answered
    links: dict[str, set[int]]
    #: each sandbox a run made, in any phase -> its calls in order: (method, path template,
    #: status, phase)
    lifecycles: dict[str, list[tuple[str, str, int, str]]]


def _schemathesis_run(report: Path) -> SchemathesisRun:
    run = SchemathesisRun({}, {})
    for line in report.read_text().splitlines():
        scenario = json.loads(line).get("ScenarioFinished", {})
        cases = scenario.get("recorder", {}).get("cases", {})
        answers = scenario.get("recorder", {}).get("interactions", {})
        for case_id, case in cases.items():
            response = (answers.get(case_id) or {}).get("response")
            if not response:
                continue
            value, status = case["value"], int(response["status_code"])
            link = case.get("transition") or {}
            if case.get("is_transition_applied") and "id" in link:
                run.links.setdefault(link["id"], set()).add(status)
            sandbox = (value.get("path_parameters") or {}).get("sandbox_id")
            if (value["method"], value["path"], status) == ("POST", "/v1/sandboxes", 201):
                sandbox = json.loads(base64.b64decode(response["content"]["$base64"]))["id"]
            if sandbox in run.lifecycles or status == 201:
                run.lifecycles.setdefault(sandbox, []).append(
                    (value["method"], value["path"], status, scenario["phase"]))
    return run


def _whole(calls: list[tuple[str, str, int, str]]) -> bool:
    """Made by a run; then, along the stateful phase's links, asked for, drawn and stopped,
    then removed; each answered 2xx."""
    if not calls or calls[0][:3] != ("POST", "/v1/sandboxes", 201):
        return False
    linked = [(m, p) for m, p, status, phase in calls[1:]
              if 200 <= status < 300 and phase == "stateful"]
    remove = ("DELETE", "/v1/sandboxes/{sandbox_id}")
    if remove not in linked:
        return False
    before = linked[:linked.index(remove)]
    return all(call in before for call in (
        ("GET", "/v1/sandboxes/{sandbox_id}"), ("GET", "/v1/sandboxes/{sandbox_id}/graph"),
        ("POST", "/v1/sandboxes/{sandbox_id}/stop")))


def test_schemathesis_against_a_real_daemon(tmp_path: Path) -> None:
    env = make_env("runc")
    try:
        use_env_network(env)
        certs = tmp_path / "certs.d"
        with any_registry(certs), serving(env, port=0, options=[
                "--registry-config-dir", str(certs)]) as d:
            assert d.tcp_port is not None
            with d.client() as c:  # an image for imageStatus' cases (schemathesis_hooks.py)
                pulled = c.post("/v1/images", json={"image": "example.com/held:1"})
                assert pulled.status_code == 201, pulled.text
            report = tmp_path / "schemathesis.ndjson"
            started = time.monotonic()
            run = subprocess.run(schemathesis_argv(d.tcp_port, d.token, SCHEMATHESIS_EXAMPLES,
                                                   report), capture_output=True, text=True,
                                 timeout=600, cwd=tmp_path, check=False,
                                 env={**os.environ, "NO_COLOR": "1",
                                      "SCHEMATHESIS_HOOKS": str(SCHEMATHESIS_HOOKS),
                                      "SCHEMATHESIS_IMAGE_ID": pulled.json()["id"]})
            took = time.monotonic() - started
            out = run.stdout + run.stderr
            print(out[-3000:], f"\nschemathesis took {took:.1f}s")
            assert run.returncode == 0, out
            assert "No issues found" in out, out
            assert "Warning" not in out and "WARNING" not in out, out
            # the stateful phase followed the document's links from a run to each operation
            # that takes its id, and drove whole lifecycles: a sandbox that a run made was
            # asked for, drawn, stopped and then removed along its links, each answered 2xx
            done = _schemathesis_run(report)
            covered = re.search(r"API Links: +(\d+) covered / (\d+) selected", out)
            assert covered, out
            print(f"stateful links covered: {covered[1]} of {covered[2]}")
            for link in LIFECYCLE_LINKS:
                assert any(200 <= s < 300 for s in done.links.get(link, ())), (link, done.links)
            whole = [sid for sid, calls in done.lifecycles.items() if _whole(calls)]
            print(f"whole lifecycles: {len(whole)} of {len(done.lifecycles)} sandboxes run")
            assert whole, done.lifecycles
            with d.client() as c:
                for item in c.get("/v1/sandboxes").json()["items"]:
                    assert c.delete(f"/v1/sandboxes/{item['id']}").status_code == 204
                for item in c.get("/v1/images").json()["items"]:
                    assert c.delete(f"/v1/images/{item['id']}").status_code == 204
            assert d.terminate() == 0
            assert "Traceback" not in d.log_text(), d.log_text()
        assert env.leftovers() == {}
    finally:
        destroy_env(env)
