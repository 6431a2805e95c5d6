"""SPDY/3 framing: the dictionary, every frame both ways, header compression across frames,
frames split anywhere, frames built byte by byte as spdystream's writer builds them, and bad
bytes refused."""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import pytest

from podfsm.faces.stream import spdy


def test_the_dictionary_is_spdy3s() -> None:
    # the 1423 bytes of draft 3's dictionary (moby/spdystream spdy/dictionary.go)
    assert len(spdy.DICTIONARY) == 1423
    assert hashlib.sha256(spdy.DICTIONARY).hexdigest() == (
        "51d27341373f923f3cd88e1eb7162aeaa3723d7585ff2399201dc06498407f02")


FRAMES: list[spdy.Frame] = [
    spdy.SynStream(1, {"streamtype": "error", "port": "80", "requestid": "0"}),
    spdy.SynStream(3, {"streamtype": "stdin"}, fin=True, unidirectional=True, priority=7),
    spdy.SynReply(1, {}),
    spdy.SynReply(3, {"x": "a\0b"}, fin=True),
    spdy.HeadersFrame(5, {"a": "b"}, fin=True),
    spdy.RstStream(5, spdy.RstStatus.CANCEL),
    spdy.Settings(((0, 4, 100), (1, 7, 65536))),
    spdy.Ping(7),
    spdy.GoAway(9, spdy.GoAwayStatus.PROTOCOL_ERROR),
    spdy.WindowUpdate(3, 1000),
    spdy.Data(1, b"hello"),
    spdy.Data(1, b"", fin=True),
]


def test_every_frame_survives_a_round_trip_on_one_connections_compressors() -> None:
    writer, reader = spdy.Framer(), spdy.Framer()
    wire = b"".join(writer.encode(f) for f in FRAMES)
    assert reader.feed(wire) == FRAMES


def test_frames_split_at_every_byte_come_out_whole() -> None:
    writer = spdy.Framer()
    wire = b"".join(writer.encode(f) for f in FRAMES)
    reader = spdy.Framer()
    got: list[spdy.Frame] = []
    for i in range(len(wire)):
        got += reader.feed(wire[i:i + 1])
    assert got == FRAMES


def _go_syn_stream(sid: int, headers: dict[str, str], compressor: object) -> bytes:
    """A SYN_STREAM as spdystream's writeSynStreamFrame lays it out: control bit and version,
    type, flags|length, stream id, associated id, priority<<5, slot, then the header block
    through zlib (BestCompression, the dictionary) cut by a sync flush."""
    block = struct.pack(">I", len(headers)) + b"".join(
        struct.pack(">I", len(k)) + k.encode() + struct.pack(">I", len(v)) + v.encode()
        for k, v in headers.items())
    c = compressor
    z = c.compress(block) + c.flush(zlib.Z_SYNC_FLUSH)  # type: ignore[attr-defined]
    return struct.pack(">HHI", 0x8003, 1, 10 + len(z)) + struct.pack(">IIBB", sid, 0, 0, 0) + z


def test_frames_laid_out_as_spdystream_writes_them_parse() -> None:
    comp = zlib.compressobj(9, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY, spdy.DICTIONARY)
    wire = (_go_syn_stream(1, {"streamtype": "error", "port": "8080", "requestid": "0"}, comp)
            + _go_syn_stream(3, {"streamtype": "data", "port": "8080", "requestid": "0"}, comp)
            # DATA: stream id, flags<<24|length, payload; PING: 0x8003 0006 len 4
            + struct.pack(">II", 3, 5) + b"GET /"
            + struct.pack(">HHII", 0x8003, 6, 4, 1)
            + struct.pack(">II", 3, 1 << 24))
    frames = spdy.Framer().feed(wire)
    assert frames == [
        spdy.SynStream(1, {"streamtype": "error", "port": "8080", "requestid": "0"}),
        spdy.SynStream(3, {"streamtype": "data", "port": "8080", "requestid": "0"}),
        spdy.Data(3, b"GET /"), spdy.Ping(1), spdy.Data(3, b"", fin=True)]


def test_our_header_blocks_inflate_with_a_plain_zlib_reader_and_the_dictionary() -> None:
    framer = spdy.Framer()
    wire = framer.encode(spdy.SynReply(1, {"X-Stream-Protocol-Version": "v4.channel.k8s.io"}))
    assert wire[:8] == struct.pack(">HHI", 0x8003, 2, len(wire) - 8)
    d = zlib.decompressobj(zdict=spdy.DICTIONARY)
    block = d.decompress(wire[12:])
    assert spdy.decode_header_block(block) == {"x-stream-protocol-version": "v4.channel.k8s.io"}


def test_unknown_control_frames_are_skipped() -> None:
    wire = struct.pack(">HHI", 0x8003, 0x10, 3) + b"abc" + spdy.Framer().encode(spdy.Ping(3))
    assert spdy.Framer().feed(wire) == [spdy.Ping(3)]


@pytest.mark.parametrize(("wire", "problem"), [
    (struct.pack(">HHII", 0x8002, 6, 4, 1), "version 2"),
    (struct.pack(">II", 0, 1) + b"x", "stream 0"),
    (struct.pack(">HHII", 0x8003, 3, 8, 0) + b"\0\0\0\1", "stream id 0"),
    (struct.pack(">HHI", 0x8003, 6, 2) + b"\0\1", "PING frame of 2 bytes"),
    (struct.pack(">HHI", 0x8003, 2, 6) + b"\0\0\0\1zz", "does not inflate"),
])
def test_bad_bytes_are_refused_naming_the_problem(wire: bytes, problem: str) -> None:
    with pytest.raises(spdy.SpdyError, match=problem):
        spdy.Framer().feed(wire)


def test_a_header_block_that_inflates_past_the_limit_is_refused() -> None:
    comp = zlib.compressobj(9, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY, spdy.DICTIONARY)
    z = comp.compress(b"\0" * (spdy.MAX_HEADER_BLOCK + 10)) + comp.flush(zlib.Z_SYNC_FLUSH)
    wire = struct.pack(">HHI", 0x8003, 2, 4 + len(z)) + struct.pack(">I", 1) + z
    with pytest.raises(spdy.SpdyError, match="over 65536 bytes"):
        spdy.Framer().feed(wire)


def test_repeated_and_truncated_header_names_are_refused() -> None:
    pair = struct.pack(">I", 1) + b"a" + struct.pack(">I", 1) + b"b"
    with pytest.raises(spdy.SpdyError, match="repeated"):
        spdy.decode_header_block(struct.pack(">I", 2) + pair + pair)
    with pytest.raises(spdy.SpdyError, match="truncated"):
        spdy.decode_header_block(struct.pack(">I", 2) + pair)
    assert spdy.first({"a": "x\0y"}, "A") == "x"


def test_frames_crictl_sent_parse() -> None:
    """What crictl 1.26.1 (client-go, moby/spdystream, Go's zlib) wrote after its upgrade in
    one `crictl port-forward` connection that sent b'ping' (captured with strace): two stream
    pairs' worth of SYN_STREAMs, DATA with FIN, client-go's PINGs and its GOAWAY."""
    wire = (Path(__file__).parent / "data" / "crictl-1.26.1-port-forward.spdy").read_bytes()
    frames = spdy.Framer().feed(wire)
    assert frames[:5] == [
        spdy.SynStream(1, {"streamtype": "error", "port": "39337", "requestid": "0"}),
        spdy.Data(1, b"", fin=True),
        spdy.SynStream(3, {"port": "39337", "requestid": "0", "streamtype": "data"}),
        spdy.Data(3, b"ping"),
        spdy.Data(3, b"", fin=True)]
    pings = frames[5:-1]
    assert pings and all(isinstance(p, spdy.Ping) and p.ping_id % 2 for p in pings)
    assert frames[-1] == spdy.GoAway(0, spdy.GoAwayStatus.OK)
