"""Pulling from a real registry (Debian's docker-registry on 127.0.0.1, started by the tests)
into the real image store, with images the tests build from busybox-static (tests/imagekit.py):
tags and digests, Docker and OCI manifests, manifest lists and indexes, mirrors, token auth, a
tampered blob, a missing tag, shared downloads, crashes during a pull, removal and garbage.

The controller here runs fake sandbox drivers and the real image driver (no pod is needed to
pull); the CRI face over a real `podfsm serve` is tests/integration/test_images_cri.py.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from podfsm import Controller
from podfsm.core.errors import DigestMismatch, ImagePullError, UnpackError
from podfsm.core.registryhosts import RegistryAuth, auth_from_cri
from tests import imagekit as ik
from tests.imagekit import Entry
from tests.integration.pullchild import controller
from tests.integration.tokenserver import token_registry

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def registry() -> Iterator[ik.Registry]:
    with ik.run_registry() as reg:
        yield reg


@dataclass
class World:
    tmp: Path
    reg: ik.Registry

    @property
    def state(self) -> str:
        return str(self.tmp / "state")

    @property
    def certs(self) -> str:
        return str(self.tmp / "certs.d")

    @property
    def store(self) -> Path:
        return self.tmp / "state" / "images"

    def ctl(self, failpoints: str | None = None) -> Controller:
        return controller(self.state, str(self.tmp / "run"), self.certs, failpoints)

    def name(self, repo: str) -> str:
        """`repo` as pulled from this registry directly."""
        return f"{self.reg.host}/{repo}"

    def files(self) -> dict[str, list[str]]:
        """What the store holds besides its lock: blobs, records, downloads, layers."""
        out = {}
        for sub in ("blobs/sha256", "images", "ingest", "layers"):
            d = self.store / sub
            out[sub] = sorted(os.listdir(d)) if d.is_dir() else []
        return out

    def empty(self) -> bool:
        return all(not v for v in self.files().values())


@pytest.fixture
def world(tmp_path: Path, registry: ik.Registry) -> World:
    return World(tmp_path, registry)


def _image(label: str, layers: int = 1, **kw: object) -> ik.Image:
    extra = [ik.make_layer([Entry(f"data-{label}-{i}", data=f"{label} {i}\n".encode())])
             for i in range(layers - 1)]
    return ik.build_image([ik.busybox_layer(), *extra], label=label, **kw)  # type: ignore[arg-type]


async def test_pull_by_tag_and_by_digest_docker_and_oci(world: World) -> None:
    docker, oci = _image("docker", user="1002"), _image("oci", oci=True, user="www-data:1004")
    world.reg.push_image("t/docker", docker, "v1")
    world.reg.push_image("t/oci", oci, "v1")
    async with world.ctl() as ctl:
        a = await ctl.pull_image(world.name("t/docker:v1"))
        assert (a.id, a.repo_tags, a.repo_digests) == (
            docker.id, (world.name("t/docker:v1"),), (world.name(f"t/docker@{docker.digest}"),))
        assert (a.uid, a.username) == (1002, "")
        b = await ctl.pull_image(world.name(f"t/oci@{oci.digest}"))
        assert (b.id, b.repo_tags, b.repo_digests) == (
            oci.id, (), (world.name(f"t/oci@{oci.digest}"),))
        assert (b.uid, b.username, b.manifest_media_type) == (None, "www-data", ik.OCI_MANIFEST)
        assert b.size == len(oci.manifest) + len(oci.config) + len(oci.layers[0].blob)
        # every blob is in the store, byte for byte
        for digest, data in ((docker.digest, docker.manifest), (docker.id, docker.config),
                             (oci.layers[0].digest, oci.layers[0].blob)):
            assert (world.store / "blobs/sha256" / digest[7:]).read_bytes() == data
        assert {i.id for i in await ctl.list_images()} == {docker.id, oci.id}
        assert (await ctl.image_status(docker.id[7:19])).id == docker.id
        info = await ctl.image_info(world.name("t/docker:v1"))
        assert info["imageSpec"]["config"]["User"] == "1002"
        assert info["chainID"] == docker.layers[0].diff_id
    # a new controller finds them again
    async with world.ctl() as ctl:
        assert {i.id for i in await ctl.list_images()} == {docker.id, oci.id}


@pytest.mark.parametrize("oci", [False, True], ids=["manifest-list", "oci-index"])
async def test_a_multi_platform_image_pulls_the_hosts_platform_not_the_first(
        world: World, oci: bool) -> None:
    kind = "oci" if oci else "docker"
    arm, amd, armv7 = (_image(f"p-{oci}-arm64", arch="arm64", variant="v8", oci=oci),
                       _image(f"p-{oci}-amd64", oci=oci),
                       _image(f"p-{oci}-armv7", arch="arm", variant="v7", oci=oci))
    top = world.reg.push_index(f"multi/{kind}", "v1", [(arm, "linux/arm64/v8"),
                                                       (armv7, "linux/arm/v7"),
                                                       (amd, "linux/amd64")], oci=oci)
    world.reg.push_index(f"multi/{kind}", "nope", [(arm, "linux/arm64/v8")], oci=oci)
    async with world.ctl() as ctl:
        img = await ctl.pull_image(world.name(f"multi/{kind}:v1"))
        assert img.id == amd.id and img.platform == "linux/amd64"
        assert img.manifest_digest == amd.digest
        assert img.repo_digests == (world.name(f"multi/{kind}@{top}"),)  # the index's digest
        assert top[7:] in world.files()["blobs/sha256"]
        with pytest.raises(ImagePullError, match=r"no manifest for platform linux/amd64 "
                                                 r"\(it offers linux/arm64/v8\)"):
            await ctl.pull_image(world.name(f"multi/{kind}:nope"))
        await ctl.remove_image(img.id)
    assert world.empty(), world.files()


async def test_multi_layer_image_unpacks_each_layer_once_by_chain_id(world: World) -> None:
    base = ik.busybox_layer()
    mid = ik.make_layer([Entry("etc", "dir", mode=0o755), Entry("etc/motd", data=b"hi\n"),
                         Entry("opq", "dir", mode=0o755), Entry("opq/x", data=b"x")])
    top = ik.make_layer([Entry("etc", "dir", mode=0o755), Entry("etc/.wh.motd"),
                         Entry("opq", "dir", mode=0o755), Entry("opq/.wh..wh..opq"),
                         Entry("opq/y", data=b"y")])
    img = ik.build_image([base, mid, top], label="layers")
    world.reg.push_image("t/layers", img, "v1")
    async with world.ctl() as ctl:
        rec = await ctl.pull_image(world.name("t/layers:v1"))
        from podfsm.core.imagespec import chain_ids
        chains = chain_ids([la.diff_id for la in img.layers])
        assert [la.chain_id for la in rec.layers] == chains
        assert sorted(world.files()["layers"]) == sorted(c[7:] for c in chains)
        # the base layer's directory holds busybox, whole; the top one the whiteouts in
        # overlay's form (a 0:0 char device, an opaque directory)
        lower = [world.store / "layers" / c[7:] / "fs" for c in chains]
        assert (lower[0] / "bin/busybox").read_bytes() == Path(ik.BUSYBOX).read_bytes()
        st = os.lstat(lower[2] / "etc/motd")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
        assert os.getxattr(lower[2] / "opq", "trusted.overlay.opaque") == b"y"
        assert (lower[2] / "opq/y").read_bytes() == b"y"
        await ctl.remove_image(world.name("t/layers:v1"))
    assert world.empty(), world.files()


async def test_a_tampered_blob_fails_the_pull_naming_it_and_nothing_is_kept(
        world: World) -> None:
    img = _image("tampered", layers=2)
    world.reg.push_image("t/tampered", img, "v1")
    bad = img.layers[1]
    path = world.reg.blob_file(bad.digest)
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    try:
        async with world.ctl() as ctl:
            with pytest.raises(DigestMismatch) as info:
                await ctl.pull_image(world.name("t/tampered:v1"))
            assert info.value.digest == bad.digest and bad.digest in str(info.value)
            assert await ctl.list_images() == []
            assert world.empty(), world.files()
    finally:
        data[len(data) // 2] ^= 0xFF
        Path(path).write_bytes(bytes(data))


async def test_a_layer_whose_content_is_not_its_diff_id_is_refused(world: World) -> None:
    img = _image("diffid")
    lie = ik.build_image(img.layers, label="diffid")
    cfg = lie.config.replace(img.layers[0].diff_id[7:].encode(), b"0" * 64)
    man = lie.manifest.replace(ik.sha(lie.config).encode(), ik.sha(cfg).encode())
    world.reg.push_blob("t/diffid", img.layers[0].blob)
    world.reg.push_blob("t/diffid", cfg)
    world.reg.put_manifest("t/diffid", "v1", man, ik.DOCKER_MANIFEST)
    async with world.ctl() as ctl:
        with pytest.raises(DigestMismatch, match=f"{img.layers[0].digest}.*diff_id"):
            await ctl.pull_image(world.name("t/diffid:v1"))
    assert world.empty(), world.files()


async def test_a_missing_tag_or_repository_fails_and_keeps_nothing(world: World) -> None:
    world.reg.push_image("t/there", _image("there"), "v1")
    async with world.ctl() as ctl:
        with pytest.raises(ImagePullError, match="404 MANIFEST_UNKNOWN"):
            await ctl.pull_image(world.name("t/there:v2"))
        with pytest.raises(ImagePullError, match=r"nowhere.*404 MANIFEST_UNKNOWN"):
            await ctl.pull_image(world.name("t/nowhere"))
    assert world.empty(), world.files()


async def test_mirrors_serve_registry_k8s_io_and_the_image_keeps_its_name(world: World) -> None:
    img = _image("pause")
    world.reg.push_image("pause", img, "3.9")
    dead = f"http://127.0.0.1:{ik.free_port()}"
    ik.hosts_toml(world.certs, "registry.k8s.io", dead, server=world.reg.url,
                  extra=f'\n[host."{world.reg.url}"]\n  capabilities = ["pull"]\n')
    async with world.ctl() as ctl:
        rec = await ctl.pull_image("registry.k8s.io/pause:3.9")
        assert rec.repo_tags == ("registry.k8s.io/pause:3.9",)
        assert rec.repo_digests == (f"registry.k8s.io/pause@{img.digest}",)
        assert (await ctl.image_status("registry.k8s.io/pause:3.9")).id == img.id
        # only a host that may resolve is asked for the tag; the dead one first, then the
        # server; the pull-only mirror serves blobs
        assert world.reg.requests("/v2/pause/manifests/3.9") >= 1
        await ctl.remove_image("registry.k8s.io/pause:3.9")
    # _default covers every host without its own directory
    ik.hosts_toml(world.certs, "_default", world.reg.url)
    async with world.ctl() as ctl:
        assert (await ctl.pull_image("quay.io/pause:3.9")).repo_tags == ("quay.io/pause:3.9",)
        await ctl.remove_image("quay.io/pause:3.9")


async def test_concurrent_pulls_share_one_download(world: World) -> None:
    a = ik.build_image([ik.busybox_layer(), ik.make_layer([Entry("a", data=b"a" * 300_000)])],
                       label="shared-a")
    b = ik.build_image([ik.busybox_layer(), ik.make_layer([Entry("b", data=b"b" * 300_000)])],
                       label="shared-b")
    world.reg.push_image("t/shared-a", a, "v1")
    world.reg.push_image("t/shared-b", b, "v1")
    base = a.layers[0].digest
    before = world.reg.requests(f"/blobs/{base}")
    async with world.ctl(failpoints="fetch_blob.before=delay(200)") as ctl:
        ids: list[str] = []

        async def pull(ref: str) -> None:
            ids.append((await ctl.pull_image(world.name(ref))).id)

        async with anyio.create_task_group() as tg:
            for ref in ["t/shared-a:v1"] * 4 + ["t/shared-b:v1"] * 2:
                tg.start_soon(pull, ref)
        assert sorted(set(ids)) == sorted({a.id, b.id})
        assert ctl.images.fetches[base] == 1
        assert ctl.images.fetches[a.layers[1].digest] == 1
        assert ctl.images.fetches[f"layer:{a.layers[0].diff_id}"] == 1
        assert world.reg.requests(f"/blobs/{base}") - before == 1
        await ctl.remove_image(a.id)
        assert base[7:] in world.files()["blobs/sha256"]  # b still needs it
        await ctl.remove_image(b.id)
    assert world.empty(), world.files()


@pytest.mark.parametrize("point", ["fetch_blob.after=2*crash", "unpack_layer.after=1*crash",
                                   "save_image.before=crash"])
def test_a_crash_during_a_pull_leaves_nothing_and_the_pull_succeeds_again(
        world: World, point: str) -> None:
    img = _image("crash", layers=3)
    world.reg.push_image("t/crash", img, "v1")
    ref = world.name("t/crash:v1")
    r = _child(world, ref, {"PODFSM_FAILPOINTS": point})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert world.files()["blobs/sha256"], "the crash came after a blob was kept"

    async def again() -> None:
        async with world.ctl() as ctl:
            assert world.empty(), world.files()  # recovery removed the leftovers
            assert (await ctl.pull_image(ref)).id == img.id
            await ctl.remove_image(ref)

    anyio.run(again)
    assert world.empty(), world.files()


def test_sigkill_mid_download_leaves_no_partial_blob(world: World) -> None:
    big = ik.make_layer([Entry("big", data=os.urandom(64 << 20))])
    img = ik.build_image([ik.busybox_layer(), big], label="big")
    world.reg.push_image("t/big", img, "v1")
    ref = world.name("t/big:v1")
    proc = subprocess.Popen(_child_argv(world, ref), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                            env={**os.environ, "PODFSM_FAILPOINTS": ""})
    try:
        ingest = world.store / "ingest"
        deadline = time.monotonic() + 60
        while not (ingest.is_dir() and any(f.stat().st_size > 0 for f in ingest.iterdir())):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.002)
    finally:
        proc.kill()
        proc.wait()
    assert world.files()["ingest"], "killed before any download began"

    async def again() -> None:
        async with world.ctl() as ctl:
            assert world.empty(), world.files()
            rec = await ctl.pull_image(ref)
            assert rec.id == img.id
            assert (world.store / "blobs/sha256" / big.digest[7:]).stat().st_size == len(big.blob)
            await ctl.remove_image(ref)

    anyio.run(again)
    assert world.empty(), world.files()


def _child_argv(world: World, ref: str) -> list[str]:
    return [sys.executable, "-m", "tests.integration.pullchild", world.state,
            str(world.tmp / "run"), world.certs, ref]


def _child(world: World, ref: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_child_argv(world, ref), cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env}, check=False)


async def test_remove_by_any_name_removes_the_image_and_its_content(world: World) -> None:
    one, two = _image("rm-1"), _image("rm-2")
    world.reg.push_image("t/rm", one, "a")
    world.reg.push_image("t/rm", one, "b")
    async with world.ctl() as ctl:
        await ctl.pull_image(world.name("t/rm:a"))
        rec = await ctl.pull_image(world.name("t/rm:b"))
        assert rec.repo_tags == (world.name("t/rm:a"), world.name("t/rm:b"))
        # the tag moves to another image; the old one keeps its digest
        world.reg.push_image("t/rm", two, "b")
        moved = await ctl.pull_image(world.name("t/rm:b"))
        old = await ctl.image_status(one.id)
        assert moved.repo_tags == (world.name("t/rm:b"),)
        assert old.repo_tags == (world.name("t/rm:a"),)
        await ctl.remove_image(world.name("t/rm:a"))  # by tag: the whole image
        assert [i.id for i in await ctl.list_images()] == [two.id]
        await ctl.remove_image(world.name("t/rm:a"))  # unknown: not an error
        await ctl.remove_image("sha256:" + "f" * 64)
        fs = (await ctl.image_fs_info())[0]
        assert fs.used_bytes >= len(two.layers[0].blob) and fs.inodes_used > 3
        await ctl.remove_image(two.id[7:])  # by id without its algorithm
        assert await ctl.list_images() == []
    assert world.empty(), world.files()


async def test_token_auth_with_basic_credentials_from_the_cri(tmp_path: Path) -> None:
    with token_registry(tmp_path, users={"alice": "s3cret"}) as (reg, tokens):
        img = _image("private")
        reg.push_image("private/app", img, "v1")
        w = World(tmp_path / "w", reg)
        async with w.ctl() as ctl:
            with pytest.raises(ImagePullError, match="401"):
                await ctl.pull_image(w.name("private/app:v1"))
            with pytest.raises(ImagePullError, match=r"token server .*401"):
                await ctl.pull_image(w.name("private/app:v1"),
                                     RegistryAuth(username="alice", password="wrong"))
            auth = auth_from_cri(auth=base64.b64encode(b"alice:s3cret").decode())
            rec = await ctl.pull_image(w.name("private/app:v1"), auth)
            assert rec.id == img.id
            assert tokens.issued and all(s == "repository:private/app:pull"
                                         for s in tokens.scopes)
            # a registry token (CRI registry_token) is sent as the bearer token directly
            await ctl.remove_image(rec.id)
            token = tokens.mint("private/app", ["pull"])
            rec = await ctl.pull_image(w.name("private/app:v1"),
                                       RegistryAuth(registry_token=token))
            assert rec.id == img.id
            await ctl.remove_image(rec.id)
        assert w.empty(), w.files()


@pytest.mark.parametrize(("entries", "named"), [
    ([Entry("../escaped", data=b"x")], "../escaped"),
    ([Entry("d", "symlink", target="/tmp"), Entry("d/escaped", data=b"x")], "d/escaped"),
], ids=["dotdot", "through-a-symlink"])
async def test_a_hostile_layer_fails_the_pull_naming_the_entry_and_keeps_nothing(
        world: World, entries: list[Entry], named: str) -> None:
    img = ik.build_image([ik.busybox_layer(), ik.make_layer(entries)],
                         label=f"hostile-{named}")
    world.reg.push_image("t/hostile", img, "v1")
    assert not os.path.lexists("/tmp/escaped")
    async with world.ctl() as ctl:
        with pytest.raises(UnpackError) as info:
            await ctl.pull_image(world.name("t/hostile:v1"))
        assert repr(named) in str(info.value)
        assert await ctl.list_images() == []
    assert world.empty(), world.files()
    assert not os.path.lexists("/tmp/escaped")
    assert [f for _, _, files in os.walk(world.tmp) for f in files if f == "escaped"] == []


async def test_a_pull_past_its_deadline_stops_and_keeps_nothing(world: World) -> None:
    world.reg.push_image("t/slow", _image("slow", layers=2), "v1")
    async with world.ctl(failpoints="fetch_blob.after=delay(400)") as ctl:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await ctl.pull_image(world.name("t/slow:v1"), timeout=0.5)
        assert time.monotonic() - started < 2
        assert await ctl.list_images() == []
    assert world.empty(), world.files()


def _three_layers(label: str) -> ik.Image:
    mid = ik.make_layer([Entry("etc", "dir", mode=0o755), Entry("etc/motd", data=b"hi\n")])
    top = ik.make_layer([Entry("etc", "dir", mode=0o755), Entry("etc/.wh.motd"),
                         Entry(f"{label}.txt", data=label.encode())])
    return ik.build_image([ik.busybox_layer(), mid, top], label=label)


async def test_vanished_layer_directories_are_unpacked_again_at_start(
        world: World, caplog: pytest.LogCaptureFixture) -> None:
    img = _three_layers("vanish")
    world.reg.push_image("t/vanish", img, "v1")
    async with world.ctl() as ctl:
        rec = await ctl.pull_image(world.name("t/vanish:v1"))
    layers = world.store / "layers"
    base, mid, top = (layers / c[7:] for c in rec.chain_ids)
    before = {p.name: (p / "layer.json").read_text() for p in (base, mid, top)}
    shutil.rmtree(mid)  # gone whole
    (top / "layer.json").unlink()  # half there: the layer store's recovery removes it
    (top / "fs" / "vanish.txt").unlink()
    async with world.ctl() as ctl:
        assert [i.id for i in await ctl.list_images()] == [img.id]
        assert sorted(world.files()["layers"]) == sorted(p.name for p in (base, mid, top))
        assert {p.name: (p / "layer.json").read_text() for p in (base, mid, top)} == before
        assert (mid / "fs/etc/motd").read_bytes() == b"hi\n"
        assert (top / "fs/vanish.txt").read_bytes() == b"vanish"
        assert stat.S_ISCHR(os.lstat(top / "fs/etc/motd").st_mode)  # the whiteout again
        assert sorted(world.files()["blobs/sha256"]) == sorted(b[7:] for b in rec.blobs)
        await ctl.remove_image(img.id)
    assert world.empty(), world.files()
    again = [r.getMessage() for r in caplog.records if "unpacking it again" in r.getMessage()]
    assert len(again) == 2 and all(img.id in m for m in again), again
    assert any(rec.chain_ids[1] in m and img.layers[1].digest in m for m in again), again


@pytest.mark.parametrize("blob", ["missing", "corrupt"])
async def test_an_image_whose_vanished_layer_cannot_be_unpacked_again_is_dropped(
        world: World, caplog: pytest.LogCaptureFixture, blob: str) -> None:
    keep, lost = _image("keep", layers=2), _three_layers("lost")  # they share the base layer
    world.reg.push_image("t/keep", keep, "v1")
    world.reg.push_image("t/lost", lost, "v1")
    async with world.ctl() as ctl:
        kept = await ctl.pull_image(world.name("t/keep:v1"))
        rec = await ctl.pull_image(world.name("t/lost:v1"))
    assert kept.chain_ids[0] == rec.chain_ids[0]
    top = rec.layers[2]
    shutil.rmtree(world.store / "layers" / top.chain_id[7:])
    top_blob = world.store / "blobs/sha256" / top.digest[7:]
    if blob == "missing":
        top_blob.unlink()
    else:
        top_blob.write_bytes(b"not a gzip stream")
    async with world.ctl() as ctl:
        assert [i.id for i in await ctl.list_images()] == [keep.id]
        # what only the dropped image needed is gone; the shared base layer stays
        assert sorted(world.files()["blobs/sha256"]) == sorted(b[7:] for b in kept.blobs)
        assert sorted(world.files()["layers"]) == sorted(c[7:] for c in kept.chain_ids)
        assert world.files()["images"] == [f"{keep.id[7:]}.json"]
        await ctl.remove_image(keep.id)
    assert world.empty(), world.files()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and top.digest in errors[0], errors
    if blob == "corrupt":
        assert lost.id in errors[0] and top.chain_id in errors[0] and "gzip" in errors[0]
