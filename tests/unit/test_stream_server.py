"""The streaming server over real loopback TCP: tokens, exec/attach over SPDY (a fake process
and real ones), port-forward to a local listener, and what a vanished client leaves behind."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator, Sequence

import pytest

from podfsm.drivers.procstreams import ProcessStreams, SubprocessStreams
from podfsm.faces.stream import spdy
from podfsm.faces.stream.server import StreamServer
from podfsm.faces.stream.tokens import (
    AttachRequest,
    ExecRequest,
    PortForwardRequest,
    RequestCache,
)
from tests.spdyclient import Client

V4 = "v4.channel.k8s.io"


class FakeProcess:
    """Prints its stdin back upper-cased on stdout, 'err' on stderr, exits with `code`."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.out: asyncio.Queue[bytes] = asyncio.Queue()
        self.err: asyncio.Queue[bytes] = asyncio.Queue()
        self.sizes: list[tuple[int, int]] = []
        self.closed = False
        self.done = asyncio.Event()
        self.err.put_nowait(b"err")
        self.err.put_nowait(b"")

    async def write_stdin(self, data: bytes) -> None:
        self.out.put_nowait(data.upper())

    async def close_stdin(self) -> None:
        self.out.put_nowait(b"")
        self.done.set()

    async def read_stdout(self) -> bytes:
        return await self.out.get()

    async def read_stderr(self) -> bytes:
        return await self.err.get()

    async def resize(self, width: int, height: int) -> None:
        self.sizes.append((width, height))

    async def wait(self) -> int | None:
        await self.done.wait()
        return self.code

    async def close(self) -> None:
        self.closed = True


class Containers:
    """A container layer for the tests: 'fake' gives FakeProcess; 'host' runs the command."""

    def __init__(self) -> None:
        self.started: list[ProcessStreams] = []

    async def exec_stream(self, container_id: str, cmd: Sequence[str], *, tty: bool,
                          stdin: bool, stdout: bool, stderr: bool) -> ProcessStreams:
        proc: ProcessStreams
        if container_id == "fake":
            proc = FakeProcess(int(cmd[0]))
        elif container_id == "host":
            proc = await SubprocessStreams.start(list(cmd), tty=tty, stdin=stdin)
        else:
            raise LookupError(f"container {container_id} not found")
        self.started.append(proc)
        return proc

    async def attach_stream(self, container_id: str, *, tty: bool, stdin: bool, stdout: bool,
                            stderr: bool) -> ProcessStreams:
        return await self.exec_stream(container_id, ["0"], tty=tty, stdin=stdin,
                                      stdout=stdout, stderr=stderr)


async def _dial(sandbox_id: str, port: int) -> tuple[asyncio.StreamReader,
                                                       asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


@pytest.fixture
async def server() -> AsyncIterator[StreamServer]:
    srv = StreamServer(containers=Containers(), dial=_dial)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


async def _get(url: str, extra: str = "") -> bytes:
    host, port = url.split("/")[2].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    path = "/" + url.split("/", 3)[3]
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
    try:
        return await asyncio.wait_for(reader.read(4096), 5)
    finally:
        writer.close()


async def _exec(server: StreamServer, req: ExecRequest | AttachRequest,
                stdin: bytes | None = None) -> tuple[Client, dict[str, int]]:
    client = await Client.connect(server.url_for(req), [V4, "v3.channel.k8s.io"])
    ids = {"error": await client.open({"streamType": "error"})}
    if req.stdin:
        ids["stdin"] = await client.open({"streamType": "stdin"})
    ids["stdout"] = await client.open({"streamType": "stdout"})
    if req.stderr and not req.tty:
        ids["stderr"] = await client.open({"streamType": "stderr"})
    if req.tty:
        ids["resize"] = await client.open({"streamType": "resize"})
    await client.until(lambda: all(i in client.replied for i in ids.values()))
    if stdin is not None:
        client.send(spdy.Data(ids["stdin"], stdin, fin=True))
    return client, ids


def _status(client: Client, ids: dict[str, int]) -> dict[str, object]:
    return json.loads(bytes(client.data[ids["error"]]))  # type: ignore[no-any-return]


def test_the_server_listens_on_loopback_only_by_default() -> None:
    async def run() -> None:
        srv = StreamServer()
        await srv.start()
        try:
            assert srv._server is not None
            addrs = {s.getsockname()[0] for s in srv._server.sockets}
            assert addrs == {"127.0.0.1"}
            assert srv.base_url.startswith("http://127.0.0.1:")
        finally:
            await srv.stop()
    asyncio.run(run())


async def test_forged_reused_and_expired_tokens_are_refused(server: StreamServer) -> None:
    url = server.url_for(ExecRequest("fake", ("0",)))
    forged = url[:-4] + ("AAAA" if not url.endswith("AAAA") else "BBBB")
    assert (await _get(forged)).startswith(b"HTTP/1.1 404")
    upgrade = ("Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
               f"X-Stream-Protocol-Version: {V4}\r\n")
    first = await _get(url, upgrade)
    assert first.startswith(b"HTTP/1.1 101"), first
    assert (await _get(url, upgrade)).startswith(b"HTTP/1.1 404")  # reused
    # an exec token on the port-forward path is no port-forward token
    other = server.url_for(ExecRequest("fake", ("0",)))
    assert (await _get(other.replace("/exec/", "/portforward/"), upgrade)).startswith(
        b"HTTP/1.1 404")
    now = [0.0]
    server.cache = RequestCache(clock=lambda: now[0])
    stale = server.url_for(ExecRequest("fake", ("0",)))
    now[0] = 61.0
    assert (await _get(stale, upgrade)).startswith(b"HTTP/1.1 404")
    assert (await _get(server.base_url + "/")).startswith(b"HTTP/1.1 404")


async def test_an_unknown_protocol_is_refused_with_the_accepted_ones(
        server: StreamServer) -> None:
    resp = await _get(server.url_for(ExecRequest("fake", ("0",))),
                      "Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
                      "X-Stream-Protocol-Version: v9.channel.k8s.io\r\n")
    assert resp.startswith(b"HTTP/1.1 403")
    assert b"X-Accepted-Stream-Protocol-Versions: v4.channel.k8s.io" in resp


async def test_exec_over_spdy_pumps_stdin_stdout_stderr_and_reports_the_exit_code(
        server: StreamServer) -> None:
    client, ids = await _exec(server, ExecRequest("fake", ("7",), stdin=True), b"hello")
    await client.until(lambda: ids["error"] in client.fin)
    assert bytes(client.data[ids["stdout"]]) == b"HELLO"
    assert bytes(client.data[ids["stderr"]]) == b"err"
    assert {ids["stdout"], ids["stderr"]} <= client.fin
    status = _status(client, ids)
    assert status["reason"] == "NonZeroExitCode"
    assert status["details"] == {"causes": [{"reason": "ExitCode", "message": "7"}]}
    await client.until(lambda: client.eof)  # the server ends the connection
    await client.close()


async def test_exec_success_writes_a_success_status(server: StreamServer) -> None:
    client, ids = await _exec(server, ExecRequest("fake", ("0",), stdin=True), b"")
    await client.until(lambda: ids["error"] in client.fin)
    assert _status(client, ids) == {"metadata": {}, "status": "Success"}
    await client.close()


async def test_a_container_layer_refusal_reaches_the_error_stream(server: StreamServer) -> None:
    client, ids = await _exec(server, ExecRequest("nosuch", ("0",)))
    await client.until(lambda: ids["error"] in client.fin)
    status = _status(client, ids)
    assert status["reason"] == "InternalError"
    assert "container nosuch not found" in str(status["message"])
    await client.close()


async def test_resize_events_reach_the_terminal(server: StreamServer) -> None:
    client, ids = await _exec(server, ExecRequest("fake", ("0",), tty=True, stdin=True))
    proc = server.containers.started[-1]  # type: ignore[union-attr]
    assert isinstance(proc, FakeProcess)
    client.send(spdy.Data(ids["resize"], b'{"Width":100,"Height":30}{"Width":1'))
    client.send(spdy.Data(ids["resize"], b'20,"Height":40}'))
    client.send(spdy.Data(ids["stdin"], b"", fin=True))
    await client.until(lambda: ids["error"] in client.fin)
    assert proc.sizes == [(100, 30), (120, 40)]
    await client.close()


async def test_real_exec_one_mib_of_output_arrives_whole_with_its_exit_code(
        server: StreamServer) -> None:
    cmd = ("sh", "-c", "head -c 1048576 /dev/urandom | od -An -v -tx1 | head -c 1048576; "
           "echo done >&2; exit 3")
    client, ids = await _exec(server, ExecRequest("host", cmd))
    await client.until(lambda: ids["error"] in client.fin, 30)
    out = bytes(client.data[ids["stdout"]])
    assert len(out) == 1 << 20 and out.count(b"\n") > 10000
    assert bytes(client.data[ids["stderr"]]) == b"done\n"
    assert _status(client, ids)["details"] == {"causes": [{"reason": "ExitCode",
                                                           "message": "3"}]}
    await client.close()


async def test_real_exec_with_stdin_and_a_tty(server: StreamServer) -> None:
    client, ids = await _exec(server, ExecRequest("host", ("cat",), stdin=True),
                              b"line one\nline two\n")
    await client.until(lambda: ids["error"] in client.fin, 10)
    assert bytes(client.data[ids["stdout"]]) == b"line one\nline two\n"
    await client.close()

    client, ids = await _exec(server, ExecRequest(
        "host", ("sh", "-c", "stty size; tty; read x; echo got $x"), tty=True, stdin=True))
    client.send(spdy.Data(ids["resize"], b'{"Width":91,"Height":17}'))
    await client.writer.drain()
    await asyncio.sleep(0.3)
    client.send(spdy.Data(ids["stdin"], b"abc\n"))
    await client.until(lambda: ids["error"] in client.fin, 10)
    out = bytes(client.data[ids["stdout"]])
    assert b"/dev/pts/" in out and b"got abc" in out, out
    assert "stderr" not in ids  # a tty has no stderr stream
    await client.close()


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def test_a_vanished_client_leaves_no_process_or_descriptor(server: StreamServer) -> None:
    before = _fds()
    client, _ = await _exec(server, ExecRequest("host", ("sleep", "300"), stdin=True))
    proc = server.containers.started[-1]  # type: ignore[union-attr]
    assert isinstance(proc, SubprocessStreams)
    pid = proc.proc.pid
    os.kill(pid, 0)
    await client.close()  # gone without a word
    for _ in range(100):
        if proc.proc.returncode is not None:
            break
        await asyncio.sleep(0.05)
    assert proc.proc.returncode == -signal.SIGKILL
    for _ in range(40):
        if _fds() <= before:
            break
        await asyncio.sleep(0.05)
    assert _fds() <= before, _fds() - before


async def test_port_forward_pairs_streams_by_request_id_and_half_closes(
        server: StreamServer) -> None:
    async def upper(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read()  # until the forwarded side half-closes
        writer.write(data.upper())
        writer.close()

    listener = await asyncio.start_server(upper, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        client = await Client.connect(server.url_for(PortForwardRequest("pod")),
                                      ["portforward.k8s.io"])
        pairs = []
        for rid in ("0", "1"):
            err = await client.open({"streamType": "error", "port": str(port),
                                     "requestID": rid})
            data = await client.open({"streamType": "data", "port": str(port),
                                      "requestID": rid})
            pairs.append((err, data))
        for n, (_, data) in enumerate(pairs):
            client.send(spdy.Data(data, f"request {n}".encode(), fin=True))
        await client.until(lambda: all({e, d} <= client.fin for e, d in pairs))
        assert [bytes(client.data[d]) for _, d in pairs] == [b"REQUEST 0", b"REQUEST 1"]
        assert all(not client.data[e] for e, _ in pairs)
        # a closed port: the reason comes on the error stream
        err = await client.open({"streamType": "error", "port": "1", "requestID": "9"})
        data = await client.open({"streamType": "data", "port": "1", "requestID": "9"})
        await client.until(lambda: err in client.fin)
        assert b"error forwarding port 1 to pod pod" in bytes(client.data[err])
        # a stream without a port is reset
        bad = await client.open({"streamType": "data"})
        await client.until(lambda: bad in client.reset)
        await client.close()
    finally:
        listener.close()


def _ws_session(url: str, protocol: str, sends: list[bytes]) -> tuple[str, dict[int, bytes]]:
    """A WebSocket exec client (websocket-client, in a thread): the negotiated protocol and
    what each channel received."""
    import websocket

    ws = websocket.create_connection(url.replace("http://", "ws://"), timeout=10,
                                     subprotocols=[protocol])
    raw = ws.sock  # websocket-client drops it unclosed when the server closes first
    got: dict[int, bytes] = {}
    try:
        for msg in sends:
            ws.send_binary(msg)
        while True:
            try:
                frame = ws.recv()
            except websocket.WebSocketConnectionClosedException:
                break
            if not frame:
                break
            data = frame if isinstance(frame, bytes) else frame.encode()
            got[data[0]] = got.get(data[0], b"") + data[1:]
        return str(ws.subprotocol), got
    finally:
        ws.close()
        raw.close()


async def test_exec_over_websocket_v5_closes_stdin_with_channel_255(
        server: StreamServer) -> None:
    url = server.url_for(ExecRequest("host", ("sh", "-c", "cat; echo bye >&2; exit 4"),
                                     stdin=True))
    proto, got = await asyncio.to_thread(_ws_session, url, "v5.channel.k8s.io",
                                         [b"\x00one ", b"\x00two", b"\xff\x00"])
    assert proto == "v5.channel.k8s.io"
    assert got[1] == b"one two"
    assert got[2] == b"bye\n"
    assert got[255] == b"\x01\x02"  # [255, 1] and [255, 2]: stdout and stderr ended
    assert json.loads(got[3])["details"] == {"causes": [{"reason": "ExitCode", "message": "4"}]}


async def test_exec_over_websocket_v4_and_a_resize(server: StreamServer) -> None:
    url = server.url_for(ExecRequest("host", ("sh", "-c", "sleep 0.3; stty size"), tty=True))
    proto, got = await asyncio.to_thread(_ws_session, url, "v4.channel.k8s.io",
                                         [b'\x04{"Width":77,"Height":22}'])
    assert proto == "v4.channel.k8s.io"
    assert b"22 77" in got[1]
    assert json.loads(got[3]) == {"metadata": {}, "status": "Success"}


async def test_websocket_without_a_known_subprotocol_is_refused(server: StreamServer) -> None:
    import websocket

    url = server.url_for(ExecRequest("host", ("true",)))
    with pytest.raises(websocket.WebSocketBadStatusException):
        await asyncio.to_thread(websocket.create_connection, url.replace("http", "ws"),
                                timeout=5, subprotocols=["base64.channel.k8s.io"])


async def test_crictls_captured_port_forward_session_gets_kubelets_answers() -> None:
    """The bytes crictl 1.26.1 sent (tests/unit/data, see test_spdy.py) replayed after a real
    upgrade: the server answers each stream, forwards b'ping', ends data then error with FIN,
    answers every PING, and resets nothing."""
    from pathlib import Path

    async def pong(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"pong:" + await reader.read(100))
        writer.close()

    listener = await asyncio.start_server(pong, "127.0.0.1", 0)
    target = listener.sockets[0].getsockname()[1]
    ports: list[int] = []

    async def dial(sid: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        ports.append(port)
        return await asyncio.open_connection("127.0.0.1", target)

    srv = StreamServer(dial=dial)
    await srv.start()
    try:
        client = await Client.connect(srv.url_for(PortForwardRequest("pod")),
                                      ["portforward.k8s.io"])
        wire = (Path(__file__).parent / "data" / "crictl-1.26.1-port-forward.spdy").read_bytes()
        frames = spdy.Framer().feed(wire)
        pings = [f for f in frames if isinstance(f, spdy.Ping)]
        client.writer.write(wire[:wire.index(spdy.Framer().encode(pings[0]))])
        await client.until(lambda: {1, 3} <= client.fin)
        client.writer.write(b"".join(spdy.Framer().encode(p) for p in pings))
        await client.until(lambda: sum(isinstance(f, spdy.Ping) for f in client.frames)
                           == len(pings))
        assert ports == [39337]
        assert bytes(client.data[3]) == b"pong:ping" and not client.data[1]
        assert client.replied == {1, 3} and not client.reset
        await client.close()
    finally:
        await srv.stop()
        listener.close()


async def test_a_client_that_does_not_read_holds_the_process_not_podfsms_memory(
        server: StreamServer) -> None:
    """64 MiB of output to a client that reads nothing: were podfsm to buffer it, `head`
    would finish in milliseconds; it stays blocked on its pipe, and the process's memory
    grows by far less than what it was sent."""
    import resource

    client, _ = await _exec(server, ExecRequest("host", ("head", "-c", "67108864",
                                                         "/dev/zero")))
    client._task.cancel()  # stop reading: the kernel's socket buffers fill, then podfsm's
    proc = server.containers.started[-1]  # type: ignore[union-attr]
    assert isinstance(proc, SubprocessStreams)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    await asyncio.sleep(1.5)
    assert proc.proc.returncode is None, "the whole output was taken in"
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 16 * 1024, grown_kib
    await client.close()
    for _ in range(100):
        if proc.proc.returncode is not None:
            break
        await asyncio.sleep(0.05)
    assert proc.proc.returncode == -signal.SIGKILL
