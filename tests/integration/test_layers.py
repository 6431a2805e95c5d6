"""The layer store on the real file system, as root: what a layer keeps, whiteouts as a real
overlay mount reads them, hostile layers contained or refused with nothing written outside and
nothing left in the store, and crashes at the unpack failpoints recovered."""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from podfsm.core import failpoints as fp
from podfsm.core.errors import StepFailed, UnpackError
from podfsm.drivers import untar
from podfsm.drivers.layers import LayerStore
from tests import layertars as lt

pytestmark = pytest.mark.integration

# security.capability, version 2, effective, permitted = cap_net_bind_service (10)
CAP_NET_BIND = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Path]:
    """A temp dir with a sentinel tree beside the store, checked untouched after the test."""
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "file").write_text("keep")
    os.utime(sentinel / "file", (1_000_000_000, 1_000_000_000))
    before = _tree(sentinel)
    yield tmp_path
    assert _tree(sentinel) == before, "something was written outside the layer"


def _tree(root: Path) -> dict[str, tuple[int, int, int, int, int]]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.join(dirpath, name)] = (st.st_mode, st.st_uid, st.st_gid,
                                                st.st_mtime_ns, st.st_size)
    return out


def _store(work: Path) -> LayerStore:
    return LayerStore(str(work / "layers"))


def test_a_layer_keeps_owners_modes_times_xattrs_links_and_special_files(work: Path) -> None:
    store = _store(work)
    layer = lt.write_layer(str(work), [
        lt.directory("./", mode=0o755),
        lt.directory("bin", mode=0o755, mtime=1_000_000_000),
        lt.file("bin/busybox", b"\x7fELF" + b"x" * 5000, mode=0o755),
        lt.hardlink("bin/sh", "bin/busybox", mode=0o755),
        lt.file("bin/su", b"su", mode=0o4755),
        lt.file("bin/ping", b"ping", mode=0o755,
                xattrs={"security.capability": CAP_NET_BIND, "user.note": b"kept"}),
        lt.directory("home/user", mode=0o2750, uid=1000, gid=2000),
        lt.file("home/user/notes", b"n", mode=0o600, uid=1000, gid=2000, mtime=1_234_567_890),
        lt.directory("tmp", mode=0o1777),
        lt.symlink("etc/abs", "/etc/passwd", uid=1000, gid=1000),
        lt.symlink("etc/rel", "../bin/busybox"),
        lt.fifo("run/fifo", mode=0o640),
        lt.chardev("dev/null", 1, 3),
    ])
    fs = Path(store.ensure(layer.chain_id, None, layer.blob, layer.media_type))
    assert fs == work / "layers" / layer.chain_id.removeprefix("sha256:") / "fs"

    busybox, sh = (fs / "bin/busybox").stat(), (fs / "bin/sh").stat()
    assert busybox.st_ino == sh.st_ino and busybox.st_nlink == 2
    assert stat.S_IMODE(busybox.st_mode) == 0o755
    assert stat.S_IMODE((fs / "bin/su").stat().st_mode) == 0o4755
    assert os.getxattr(fs / "bin/ping", "security.capability") == CAP_NET_BIND
    assert os.getxattr(fs / "bin/ping", "user.note") == b"kept"
    home = (fs / "home/user").stat()
    assert (home.st_uid, home.st_gid, stat.S_IMODE(home.st_mode)) == (1000, 2000, 0o2750)
    notes = (fs / "home/user/notes").stat()
    assert (notes.st_uid, notes.st_gid, notes.st_mtime) == (1000, 2000, 1_234_567_890)
    # a directory's time is set after its entries are written
    assert (fs / "bin").stat().st_mtime == 1_000_000_000
    assert stat.S_IMODE((fs / "tmp").stat().st_mode) == 0o1777
    assert os.readlink(fs / "etc/abs") == "/etc/passwd"  # kept verbatim, never followed
    assert os.lstat(fs / "etc/abs").st_uid == 1000
    assert os.readlink(fs / "etc/rel") == "../bin/busybox"
    ff = os.lstat(fs / "run/fifo")
    assert stat.S_ISFIFO(ff.st_mode) and stat.S_IMODE(ff.st_mode) == 0o640
    null = os.lstat(fs / "dev/null")
    assert stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1
    assert os.minor(null.st_rdev) == 3

    info = store.info(layer.chain_id)
    assert info is not None and info.diff_id == layer.diff_id and info.entries == 13
    assert info.inodes == 16  # the root, 12 entries and 4 implied dirs; the link shares one
    used, inodes = store.usage()
    assert used >= info.usage_bytes > 5000 and inodes >= info.inodes


def test_the_link_entry_s_mode_applies_to_the_shared_inode(work: Path) -> None:
    store = _store(work)
    layer = lt.write_layer(str(work), [lt.file("a", b"x", mode=0o755),
                                       lt.hardlink("b", "a", mode=0o644, uid=7)])
    fs = Path(store.ensure(layer.chain_id, None, layer.blob, layer.media_type))
    st = (fs / "a").stat()
    assert stat.S_IMODE(st.st_mode) == 0o644 and st.st_uid == 7  # as containerd does


@pytest.mark.parametrize("media_type", [lt.GZIP, lt.ZSTD, lt.TAR, lt.DOCKER_GZIP])
def test_every_compression_gives_the_same_layer(work: Path, media_type: str) -> None:
    store = _store(work)
    layer = lt.write_layer(str(work), [lt.file("a/b", b"hello" * 1000)], media_type=media_type)
    fs = store.ensure(layer.chain_id, None, layer.blob, media_type)
    assert Path(fs, "a/b").read_bytes() == b"hello" * 1000


def test_ensure_is_idempotent_and_remove_leaves_nothing(work: Path) -> None:
    store = _store(work)
    layer = lt.write_layer(str(work), [lt.file("f", b"1")])
    fs = store.ensure(layer.chain_id, None, layer.blob, layer.media_type)
    meta = os.stat(Path(fs).parent / "layer.json")
    os.unlink(layer.blob)  # a second ensure does not read the blob
    assert store.ensure(layer.chain_id, None, layer.blob, layer.media_type) == fs
    assert os.stat(Path(fs).parent / "layer.json").st_ino == meta.st_ino
    assert store.layers() == [layer.chain_id]
    store.remove(layer.chain_id)
    store.remove(layer.chain_id)  # not there: nothing to do
    assert os.listdir(store.root) == []
    assert store.usage()[1] == 1


def test_a_blob_that_is_not_the_layer_asked_for_is_refused(work: Path) -> None:
    store = _store(work)
    layer = lt.write_layer(str(work), [lt.file("f", b"1")])
    other = lt.write_layer(str(work), [lt.file("f", b"2")])
    with pytest.raises(UnpackError, match="gives chain id") as err:
        store.ensure(other.chain_id, None, layer.blob, layer.media_type)
    assert err.value.layer == other.chain_id
    assert os.listdir(store.root) == []
    # above a parent the chain id is sha256("<parent> <diff id>"), not the diff id
    with pytest.raises(UnpackError, match="gives chain id"):
        store.ensure(layer.chain_id, other.chain_id, layer.blob, layer.media_type)
    upper = lt.write_layer(str(work), [lt.file("f", b"1")], parent=other.chain_id)
    store.ensure(upper.chain_id, other.chain_id, upper.blob, upper.media_type)


def test_bad_blobs_are_refused_with_nothing_left(work: Path) -> None:
    store = _store(work)
    layer = lt.write_layer(str(work), [lt.file("f", b"1" * 100_000)])
    with pytest.raises(UnpackError, match="not a layer media type"):
        store.ensure(layer.chain_id, None, layer.blob, "application/vnd.oci.image.config.v1+json")
    data = Path(layer.blob).read_bytes()
    Path(layer.blob).write_bytes(data[: len(data) // 2])
    with pytest.raises(UnpackError, match="gzip stream is truncated"):
        store.ensure(layer.chain_id, None, layer.blob, layer.media_type)
    # zstandard's reader ends a truncated frame quietly, as if the tar ended at a header: the
    # diff id check refuses what the tar reader let through
    zst = lt.write_layer(str(work), [lt.file("f", b"1" * 100_000)], media_type=lt.ZSTD)
    Path(zst.blob).write_bytes(Path(zst.blob).read_bytes()[:20])
    with pytest.raises(UnpackError, match="gives chain id"):
        store.ensure(zst.chain_id, None, zst.blob, zst.media_type)
    Path(layer.blob).write_bytes(b"\0" * 100 + b"not a tar" * 100)
    with pytest.raises(UnpackError, match="not a tar header"):
        store.ensure(layer.chain_id, None, layer.blob, lt.TAR)
    assert os.listdir(store.root) == []


def test_later_entries_replace_earlier_ones_as_tar_does(work: Path) -> None:
    store = _store(work)
    layer = lt.write_layer(str(work), [
        lt.file("x", b"old"), lt.file("x", b"new"),
        lt.directory("d", mode=0o700), lt.file("d/f", b"f"), lt.directory("d", mode=0o750),
        lt.file("y", b"file"), lt.directory("y"), lt.file("y/in", b"in"),
        lt.directory("z"), lt.file("z/gone", b"g"), lt.file("z", b"now a file"),
        lt.file("w/f", b"f"), lt.file("w/.wh.f"),
    ])
    fs = Path(store.ensure(layer.chain_id, None, layer.blob, layer.media_type))
    assert (fs / "x").read_bytes() == b"new"
    assert (fs / "d/f").read_bytes() == b"f" and stat.S_IMODE((fs / "d").stat().st_mode) == 0o750
    assert (fs / "y/in").read_bytes() == b"in"
    assert (fs / "z").read_bytes() == b"now a file"
    assert stat.S_ISCHR(os.lstat(fs / "w/f").st_mode)


def test_whiteouts_and_opaque_dirs_hide_lower_files_in_a_real_overlay(work: Path) -> None:
    store = _store(work)
    lower = lt.write_layer(str(work), [
        lt.file("a/keep", b"k"), lt.file("a/gone", b"g"), lt.file("b/old", b"o"),
        lt.file("top", b"t"),
    ])
    upper = lt.write_layer(str(work), [
        lt.directory("a"), lt.file("a/.wh.gone"), lt.file(".wh.top"),
        lt.directory("b"), lt.file("b/.wh..wh..opq"), lt.file("b/new", b"n"),
        lt.file(".wh..wh.plnk/ignored"),
    ], parent=lower.chain_id)
    l1 = store.ensure(lower.chain_id, None, lower.blob, lower.media_type)
    l2 = store.ensure(upper.chain_id, lower.chain_id, upper.blob, upper.media_type)
    gone = os.lstat(Path(l2, "a/gone"))
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert os.getxattr(Path(l2, "b"), "trusted.overlay.opaque") == b"y"
    mnt = work / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={l2}:{l1}",
                    str(mnt)], check=True)
    try:
        assert sorted(os.listdir(mnt)) == [".wh..wh.plnk", "a", "b"]
        assert sorted(os.listdir(mnt / "a")) == ["keep"]
        assert sorted(os.listdir(mnt / "b")) == ["new"]
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


HOSTILE = [
    ("../x", [lt.file("../x", b"evil")], "'..' component"),
    ("a/../../x", [lt.file("a/../../x", b"evil")], "'..' component"),
    ("a/x", [lt.symlink("a", "{sentinel}"), lt.file("a/x", b"evil")], "crosses the symlink a"),
    ("a/x", [lt.symlink("a", ".."), lt.file("a/x", b"evil")], "crosses the symlink a"),
    ("d/a/x/", [lt.symlink("d/a", "../../../.."), lt.directory("d/a/x")],
     "crosses the symlink d/a"),
    ("h", [lt.hardlink("h", "../../etc/passwd")], "'..' component"),
    ("h", [lt.hardlink("h", "/etc/passwd")], "is not in the layer"),
    ("h", [lt.hardlink("h", "later"), lt.file("later", b"")], "is not in the layer"),
    ("h", [lt.symlink("s", "{sentinel}"), lt.hardlink("h", "s/file")], "crosses the symlink s"),
    ("n" * 300, [lt.file("n" * 300, b"x")], "File name too long"),
    ("a\0b", [], "NUL byte"),
    ("p", [lt.file("p", xattrs={"trusted.overlay.redirect": b"/x"})], "overlay's own"),
]


@pytest.mark.parametrize(("entry", "items", "message"), HOSTILE,
                         ids=[f"{i}:{h[0][:12]!r}" for i, h in enumerate(HOSTILE)])
def test_a_hostile_layer_is_refused_naming_the_entry_and_leaves_nothing(
        work: Path, entry: str, items: list[lt.Item], message: str) -> None:
    store = _store(work)
    for item in items:
        item.info.linkname = item.info.linkname.format(sentinel=work / "sentinel")
    if entry == "a\0b":
        item = lt.file("placeholder", b"x")
        item.info.pax_headers["path"] = "a\0b"
        items = [item]
    layer = lt.write_layer(str(work), items)
    with pytest.raises(UnpackError) as err:
        store.ensure(layer.chain_id, None, layer.blob, layer.media_type)
    assert err.value.entry == entry
    assert message in str(err.value) and repr(entry) in str(err.value)
    assert os.listdir(store.root) == []


def test_escapes_that_are_contained_write_only_inside_the_layer(work: Path) -> None:
    store = _store(work)
    sentinel = str(work / "sentinel")
    layer = lt.write_layer(str(work), [
        lt.file("/abs/x", b"stripped"),
        lt.symlink("out", sentinel + "/file"),
        lt.hardlink("h", "out", mode=0o777, uid=1234),  # a link to the symlink itself
        lt.symlink("a", sentinel), lt.directory("a"), lt.file("a/x", b"inside"),
    ])
    fs = Path(store.ensure(layer.chain_id, None, layer.blob, layer.media_type))
    assert (fs / "abs/x").read_bytes() == b"stripped"
    h = os.lstat(fs / "h")
    assert stat.S_ISLNK(h.st_mode) and h.st_nlink == 2 and h.st_uid == 1234
    assert os.readlink(fs / "h") == sentinel + "/file"
    assert (fs / "a").is_dir() and not (fs / "a").is_symlink()
    assert (fs / "a/x").read_bytes() == b"inside"


def test_device_nodes_are_refused_unless_real_root(work: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    assert untar.real_root()  # the tests run as root in the initial user namespace
    monkeypatch.setattr(untar, "real_root", lambda: False)
    store = _store(work)
    layer = lt.write_layer(str(work), [lt.file("ok", b"1"), lt.chardev("dev/sda", 8, 0)])
    with pytest.raises(UnpackError, match=r"'dev/sda': a device node \(c 8:0\) is made only"):
        store.ensure(layer.chain_id, None, layer.blob, layer.media_type)
    assert os.listdir(store.root) == []


_CHILD = """
import sys
from podfsm.core import failpoints as fp
from podfsm.drivers.layers import LayerStore
store = LayerStore(sys.argv[1], fp.parse(sys.argv[2]))
print(store.ensure(sys.argv[3], None, sys.argv[4], sys.argv[5]))
"""


@pytest.mark.parametrize("point", ["unpack_layer.before", "unpack_layer.after"])
def test_a_crash_at_an_unpack_failpoint_is_recovered(work: Path, point: str) -> None:
    assert point in fp.NAMES
    layer = lt.write_layer(str(work), [lt.file(f"d{i}/f", b"x" * 1000) for i in range(50)])
    root = str(work / "layers")
    proc = subprocess.run([sys.executable, "-c", _CHILD, root, f"{point}=crash",
                           layer.chain_id, layer.blob, layer.media_type], capture_output=True)
    assert proc.returncode == -9
    left = os.listdir(root)
    store = LayerStore(root)
    store.recover()
    if point.endswith("before"):
        assert len(left) == 1 and left[0].startswith(".tmp-")  # the crash left a temp dir
        assert os.listdir(root) == []
    else:
        assert store.layers() == [layer.chain_id]
    fs = store.ensure(layer.chain_id, None, layer.blob, layer.media_type)
    assert Path(fs, "d49/f").read_bytes() == b"x" * 1000


def test_an_error_failpoint_fails_the_unpack_leaving_nothing(work: Path) -> None:
    store = LayerStore(str(work / "layers"), fp.parse("unpack_layer.before=1*error"))
    layer = lt.write_layer(str(work), [lt.file("f", b"1")])
    with pytest.raises(StepFailed, match=r"unpack_layer\.before"):
        store.ensure(layer.chain_id, None, layer.blob, layer.media_type)
    assert os.listdir(store.root) == []
    store.ensure(layer.chain_id, None, layer.blob, layer.media_type)


def test_recover_removes_half_unpacked_and_half_removed_layers(work: Path) -> None:
    store = _store(work)
    layer = lt.write_layer(str(work), [lt.file("f", b"1")])
    store.ensure(layer.chain_id, None, layer.blob, layer.media_type)
    for name in (".tmp-" + "a" * 64 + "-1234", ".rm-" + "b" * 64 + "-1234", "c" * 64):
        os.makedirs(os.path.join(store.root, name, "fs", "sub"))
    store.recover()
    assert store.layers() == [layer.chain_id]
    assert os.listdir(store.root) == [layer.chain_id.removeprefix("sha256:")]


def test_tar_types_podfsm_does_not_lay_down_are_refused(work: Path) -> None:
    store = _store(work)
    item = lt.file("vol", b"")
    item.info.type = tarfile.GNUTYPE_SPARSE
    layer = lt.write_layer(str(work), [item])
    with pytest.raises(UnpackError, match="'vol': a sparse file"):
        store.ensure(layer.chain_id, None, layer.blob, layer.media_type)


def test_a_sigkill_in_the_middle_of_an_unpack_leaves_only_what_recover_removes(
        work: Path) -> None:
    """The blob is a fifo the test feeds: half the layer, then SIGKILL while the child waits
    for the rest, with files already laid down in its temporary directory."""
    layer = lt.write_layer(str(work), [lt.file(f"d/f{i}", b"y" * 4096) for i in range(200)],
                           media_type=lt.TAR)
    raw = Path(layer.blob).read_bytes()
    fifo = work / "blob.fifo"
    os.mkfifo(fifo)
    root = str(work / "layers")
    child = subprocess.Popen([sys.executable, "-c", _CHILD, root, "", layer.chain_id,
                              str(fifo), layer.media_type])
    try:
        with open(fifo, "wb") as feed:
            feed.write(raw[: len(raw) // 2])
            feed.flush()
            tmp = None
            for _ in range(500):
                names = [n for n in os.listdir(root) if n.startswith(".tmp-")]
                if names and (Path(root, names[0], "fs", "d", "f10")).exists():
                    tmp = names[0]
                    break
                time.sleep(0.01)
            assert tmp is not None, "the child laid nothing down"
            child.kill()
            assert child.wait(10) == -9
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    store = LayerStore(root)
    store.recover()
    assert os.listdir(root) == []
    fs = store.ensure(layer.chain_id, None, layer.blob, layer.media_type)
    assert Path(fs, "d/f199").read_bytes() == b"y" * 4096


def test_implied_directories_are_0755_whatever_the_umask(work: Path) -> None:
    store = _store(work)
    layer = lt.write_layer(str(work), [lt.file("usr/lib/x", b"1", mode=0o644)])
    old = os.umask(0o077)
    try:
        fs = Path(store.ensure(layer.chain_id, None, layer.blob, layer.media_type))
    finally:
        os.umask(old)
    for path in (fs, fs / "usr", fs / "usr/lib"):
        st = path.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o755, 0, 0), path
    assert stat.S_IMODE((fs / "usr/lib/x").stat().st_mode) == 0o644


_FUZZ_SAMPLE = lt.tar_bytes([
    lt.directory("d", mode=0o750), lt.file("d/f", b"0123456789" * 50, xattrs={"user.x": b"y"}),
    lt.symlink("d/s", "/etc"), lt.hardlink("d/h", "d/f"), lt.file("d/.wh.g"), lt.fifo("p"),
    lt.file("e/" + "n" * 120, b"z", mode=0o4755),
])


def _header_offsets(raw: bytes) -> list[int]:
    """Where the archive's header blocks start (PAX headers included)."""
    out, pos = [], 0
    while raw[pos:pos + 512].strip(b"\0"):
        out.append(pos)
        size = tarfile.TarInfo.frombuf(raw[pos:pos + 512], "utf-8", "strict").size
        pos += 512 + -(-size // 512) * 512
    return out


_FUZZ_HEADERS = _header_offsets(_FUZZ_SAMPLE)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_FUZZ_SAMPLE) - 1), st.integers(0, 255)),
                min_size=1, max_size=6))
def test_a_corrupted_layer_is_unpacked_inside_or_refused_leaving_nothing(
        edits: list[tuple[int, int]]) -> None:
    data = bytearray(_FUZZ_SAMPLE)
    for pos, value in edits:  # into the headers, their checksums then made right again
        block = _FUZZ_HEADERS[pos % len(_FUZZ_HEADERS)]
        data[block + pos % 512] = value
    for block in _FUZZ_HEADERS:
        data[block + 148:block + 156] = b" " * 8
        data[block + 148:block + 156] = b"%06o\0 " % sum(data[block:block + 512])
    with tempfile.TemporaryDirectory(prefix="podfsm-fuzz-") as tmp:
        work = Path(tmp)
        (work / "sentinel").mkdir()
        layer = lt.write_layer(tmp, bytes(data), media_type=lt.TAR)
        store = LayerStore(str(work / "layers"))
        try:
            fs = store.ensure(layer.chain_id, None, layer.blob, layer.media_type)
        except UnpackError:
            assert os.listdir(store.root) == []
        else:
            assert Path(fs).is_dir()
            store.remove(layer.chain_id)
        assert sorted(os.listdir(tmp)) == sorted(["sentinel", "layers",
                                                  os.path.basename(layer.blob)])
        assert os.listdir(work / "sentinel") == []


def test_xattrs_land_on_directories_symlinks_fifos_and_hard_links(work: Path) -> None:
    store = _store(work)
    d = lt.directory("d")
    d.info.pax_headers["SCHILY.xattr.user.d"] = "1"
    s = lt.symlink("s", "/nowhere")
    s.info.pax_headers["SCHILY.xattr.trusted.s"] = "2"  # user.* is not allowed on symlinks
    p = lt.fifo("p")
    p.info.pax_headers["SCHILY.xattr.trusted.p"] = "3"
    h = lt.hardlink("h", "f", mode=0o600)
    h.info.pax_headers["SCHILY.xattr.user.h"] = "4"
    layer = lt.write_layer(str(work), [d, s, p, lt.file("f", b"f"), h])
    fs = Path(store.ensure(layer.chain_id, None, layer.blob, layer.media_type))
    assert os.getxattr(fs / "d", "user.d") == b"1"
    assert os.getxattr(fs / "s", "trusted.s", follow_symlinks=False) == b"2"
    assert os.getxattr(fs / "p", "trusted.p") == b"3"
    assert os.getxattr(fs / "f", "user.h") == b"4"  # the shared inode
    assert stat.S_IMODE((fs / "f").stat().st_mode) == 0o600


def test_concurrent_ensures_of_one_layer_give_one_layer(work: Path) -> None:
    store = _store(work)
    layer = lt.write_layer(str(work), [lt.file(f"d{i}/f", b"x" * 5000) for i in range(300)])
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: store.ensure(layer.chain_id, None, layer.blob,
                                                     layer.media_type), range(4)))
    assert len(set(paths)) == 1
    assert os.listdir(store.root) == [layer.chain_id.removeprefix("sha256:")]
    assert Path(paths[0], "d299/f").read_bytes() == b"x" * 5000
