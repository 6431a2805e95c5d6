"""Reading layers without touching the file system: decompression, the diff id, and tar headers
in every format a layer is written in, checked against what tarfile wrote."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import random
import tarfile
import zlib

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from podfsm.core.errors import UnpackError
from podfsm.drivers import tarstream as ts
from podfsm.drivers.layers import chain_id_for
from tests import layertars as lt


def _read(raw: bytes, media_type: str = lt.TAR) -> tuple[list[tuple[ts.Entry, bytes]], str]:
    """Every entry with its data, and the diff id."""
    reader = ts.TarReader(ts.decompressor(media_type)(io.BytesIO(raw)))
    out = []
    try:
        for entry in ts.entries(reader):
            out.append((entry, reader.read(entry.size)))
        return out, reader.finish()
    finally:
        reader.close()


def _tar(items: list[lt.Item], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for item in items:
            tf.addfile(item.info, io.BytesIO(item.data) if item.info.isreg() else None)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_headers_of_every_format_read_as_tarfile_wrote_them(fmt: int) -> None:
    long_dir = "d" * 90 + "/" + "e" * 40  # ustar keeps it in the prefix field
    items = [
        lt.directory("usr/"),
        lt.file(f"{long_dir}/file", b"data" * 300, mode=0o4755, uid=1000, gid=50,
                mtime=1_234_567_890),
        lt.symlink("usr/link", "/target/" + "t" * 80),
        lt.hardlink("usr/hard", "usr/link", mode=0o755),
        lt.fifo("run/fifo"),
        lt.chardev("dev/null", 1, 3),
    ]
    if fmt != tarfile.USTAR_FORMAT:  # names and ids beyond ustar's fields
        items.append(lt.file("n" * 200, b"x", uid=3_000_000))
    entries, diff_id = _read(_tar(items, fmt))
    assert [e.name for e, _ in entries] == [i.info.name for i in items]
    f, data = entries[1]
    assert (f.type, f.mode, f.uid, f.gid, f.mtime_ns) == (
        tarfile.REGTYPE, 0o4755, 1000, 50, 1_234_567_890 * 10**9)
    assert data == b"data" * 300
    assert entries[2][0].linkname == "/target/" + "t" * 80
    assert entries[3][0].type == tarfile.LNKTYPE and entries[3][0].size == 0
    assert entries[4][0].type == tarfile.FIFOTYPE
    assert (entries[5][0].devmajor, entries[5][0].devminor) == (1, 3)
    if fmt != tarfile.USTAR_FORMAT:
        assert entries[6][0].uid == 3_000_000  # PAX record, or GNU base-256
    assert diff_id == "sha256:" + hashlib.sha256(_tar(items, fmt)).hexdigest()


def test_pax_records_give_xattrs_binary_values_times_and_paths() -> None:
    cap = bytes([1, 0, 0, 2, 0, 4, 0, 0, 255, 128])
    item = lt.file("short", b"", xattrs={"security.capability": cap, "user.a": b"b"})
    item.info.pax_headers.update({"path": "a/" + "é" * 100, "mtime": "1700000000.25",
                                  "atime": "-1.5"})
    [(entry, _)], _ = _read(lt.tar_bytes([item]))
    assert entry.name == "a/" + "é" * 100
    assert entry.xattrs == {"security.capability": cap, "user.a": b"b"}
    assert entry.mtime_ns == 1_700_000_000_250_000_000 and entry.atime_ns == -1_500_000_000


def test_a_global_pax_header_is_ignored_as_containerd_ignores_it() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"uid": "4242", "path": "everything"}) as tf:
        tf.addfile(lt.file("a", uid=7).info, io.BytesIO(b""))
    [(entry, _)], _ = _read(buf.getvalue())
    assert (entry.name, entry.uid) == ("a", 7)


@pytest.mark.parametrize("media_type", [lt.GZIP, lt.ZSTD, lt.DOCKER_GZIP, lt.TAR])
def test_each_compression_gives_the_tar_and_its_diff_id(media_type: str) -> None:
    raw = lt.tar_bytes([lt.file("f", bytes(range(256)) * 4000)])
    blob = {lt.GZIP: gzip.compress(raw), lt.DOCKER_GZIP: gzip.compress(raw),
            lt.ZSTD: zstandard.ZstdCompressor().compress(raw), lt.TAR: raw}[media_type]
    [(_, data)], diff_id = _read(blob, media_type)
    assert data == bytes(range(256)) * 4000
    assert diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()


def test_concatenated_gzip_members_and_zstd_frames_are_one_stream() -> None:
    raw = lt.tar_bytes([lt.file("f", b"abc" * 100_000)])
    half = len(raw) // 2
    for media_type, blob in (
            (lt.GZIP, gzip.compress(raw[:half]) + gzip.compress(raw[half:])),
            (lt.ZSTD, zstandard.ZstdCompressor().compress(raw[:half])
             + zstandard.ZstdCompressor().compress(raw[half:]))):
        [(_, data)], diff_id = _read(blob, media_type)
        assert data == b"abc" * 100_000
        assert diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()


def test_a_gzip_bomb_is_inflated_piecewise() -> None:
    chunks = ts.decompressor(lt.GZIP)(io.BytesIO(gzip.compress(bytes(64 << 20))))
    sizes = [len(c) for c in chunks]
    assert sum(sizes) == 64 << 20 and max(sizes) <= ts.MAX_OUT


def test_the_bytes_after_the_end_marker_count_in_the_diff_id() -> None:
    raw = lt.tar_bytes([lt.file("f", b"x")]) + bytes(10240)
    _, diff_id = _read(raw)
    assert diff_id == "sha256:" + hashlib.sha256(raw).hexdigest()


def test_bad_streams_are_refused_saying_why() -> None:
    raw = lt.tar_bytes([lt.file("f", random.Random(1).randbytes(5000))])
    with pytest.raises(UnpackError, match="tar stream ends early"):
        _read(raw[:1024])
    bad = bytearray(raw)
    bad[0] ^= 1
    with pytest.raises(UnpackError, match="not a tar header at byte 0: bad checksum"):
        _read(bytes(bad))
    with pytest.raises(UnpackError, match="gzip stream is corrupt"):
        _read(b"\x1f\x8b\x08\x00" + bytes(100), lt.GZIP)
    with pytest.raises(UnpackError, match="gzip stream is truncated"):
        _read(gzip.compress(raw)[:200], lt.GZIP)
    with pytest.raises(UnpackError, match="zstd stream is corrupt"):
        _read(b"garbage" * 100, lt.ZSTD)
    with pytest.raises(UnpackError, match="not a layer media type"):
        ts.decompressor("application/vnd.oci.image.manifest.v1+json")
    huge = lt.file("h", b"")
    huge.info.pax_headers["SCHILY.xattr.user.big"] = "x" * (2 << 20)
    with pytest.raises(UnpackError, match=r"an extended header of \d+ bytes at byte 0"):
        _read(lt.tar_bytes([huge]))
    for key, value, why in (("uid", "abc", "malformed number"), ("mtime", "1.x", "malformed"),
                            ("gid", "-1", "a gid of -1"), ("size", "-5", "a size of -5"),
                            ("uid", "4294967295", "a uid of 4294967295")):
        bad_pax = lt.file("p", b"")
        bad_pax.info.pax_headers[key] = value
        with pytest.raises(UnpackError, match=why):
            _read(lt.tar_bytes([bad_pax]))
    sparse = lt.file("s", b"")
    sparse.info.pax_headers["GNU.sparse.major"] = "1"
    with pytest.raises(UnpackError, match="sparse"):
        _read(lt.tar_bytes([sparse]))
    assert zlib  # the gzip reader is zlib's


def test_chain_ids_follow_the_oci_definition() -> None:
    d1, d2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    assert chain_id_for(None, d1) == d1
    assert chain_id_for(d1, d2) == "sha256:" + hashlib.sha256(f"{d1} {d2}".encode()).hexdigest()


_SAMPLE = lt.tar_bytes([
    lt.directory("d"), lt.file("d/f", b"0123456789" * 100, xattrs={"user.x": b"y"}),
    lt.symlink("d/s", "/abs"), lt.hardlink("d/h", "d/f"), lt.file("n" * 150, b"z"),
])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_SAMPLE) - 1), st.integers(0, 255)),
                min_size=1, max_size=8))
def test_a_corrupted_tar_is_read_or_refused_with_an_unpack_error(
        edits: list[tuple[int, int]]) -> None:
    data = bytearray(_SAMPLE)
    for pos, value in edits:
        data[pos] = value
    with contextlib.suppress(UnpackError):
        _read(bytes(data))
