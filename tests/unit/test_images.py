"""The controller's image verbs over the fake image driver (tests/fakeimages.py), and the faces
that map onto them: HTTP /v1/images, the CLI's pull/images/inspecti/rmi, the CRI's
ImageService. The real driver and a real registry: tests/integration/test_images.py."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import anyio
import httpx
import pytest

from podfsm.core.errors import ImageInUse, ImagePullError, InvalidImageReference
from podfsm.faces import imagecli
from podfsm.faces.http.app import create_app
from tests.fakes import Rig

NAME = "registry.test/app"


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


async def test_pull_names_and_remove_through_the_controller(rig: Rig) -> None:
    a_id, a_digest = rig.images.publish(NAME, "v1", [b"base", b"a"], user="1002")
    b_id, _ = rig.images.publish(NAME, "v2", [b"base", b"b"], user="www-data:7")
    async with rig.controller() as ctl:
        a = await ctl.pull_image(f"{NAME}:v1")
        assert (a.id, a.repo_tags, a.repo_digests, a.uid) == (
            a_id, (f"{NAME}:v1",), (f"{NAME}@{a_digest}",), 1002)
        b = await ctl.pull_image(f"{NAME}:v2")
        assert (b.uid, b.username) == (None, "www-data")
        assert [i.id for i in await ctl.list_images()] == [a_id, b_id]
        assert (await ctl.image_status(a_id[7:12])).id == a_id
        await ctl.remove_image(f"{NAME}:v1")
        # the shared base layer stays with b, a's own layer goes
        from tests.fakeimages import sha
        assert sha(b"base") in rig.images.blobs and sha(b"a") not in rig.images.blobs
        await ctl.remove_image(b_id)
        await ctl.remove_image(b_id)  # unknown: no error
        assert rig.images.blobs == {} and rig.images.layers == set()
        assert rig.images.records == {}


async def test_a_moved_tag_leaves_the_old_image_its_digest(rig: Rig) -> None:
    old_id, old_digest = rig.images.publish(NAME, "v1", [b"one"])
    async with rig.controller() as ctl:
        await ctl.pull_image(f"{NAME}:v1")
        new_id, _ = rig.images.publish(NAME, "v1", [b"two"])
        await ctl.pull_image(f"{NAME}:v1")
        old = await ctl.image_status(old_id)
        assert old.repo_tags == () and old.repo_digests == (f"{NAME}@{old_digest}",)
        assert (await ctl.image_status(f"{NAME}:v1")).id == new_id
    async with rig.controller() as ctl:  # the records outlive the controller
        assert {i.id for i in await ctl.list_images()} == {old_id, new_id}


async def test_concurrent_pulls_share_each_download_and_a_failure_keeps_nothing(
        rig: Rig) -> None:
    img_id, _ = rig.images.publish(NAME, "v1", [b"x" * 10, b"y" * 10])
    rig.images.fetch_delay = 0.05
    async with rig.controller() as ctl:
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(ctl.pull_image, f"{NAME}:v1")
        assert sorted(rig.images.fetched) == sorted(set(rig.images.fetched))
        assert len(rig.images.fetched) == 3  # config and two layers, once each
        await ctl.remove_image(img_id)
        rig.images.fetched.clear()
        del rig.images.remote[next(d for d in rig.images.remote
                                   if rig.images.remote[d] == b"y" * 10)]
        with pytest.raises(ImagePullError, match="not in the fake registry"):
            await ctl.pull_image(f"{NAME}:v1")
        assert rig.images.blobs == {} and rig.images.layers == set()
        with pytest.raises(InvalidImageReference):
            await ctl.pull_image("Upper/Case")


async def test_an_image_in_use_is_not_removed(rig: Rig) -> None:
    img_id, _ = rig.images.publish(NAME, "v1", [b"z"])
    async with rig.controller() as ctl:
        await ctl.pull_image(f"{NAME}:v1")
        ctl.images.in_use = lambda image_id: image_id == img_id
        with pytest.raises(ImageInUse):
            await ctl.remove_image(f"{NAME}:v1")
        assert [i.id for i in await ctl.list_images()] == [img_id]


async def test_http_images(rig: Rig) -> None:
    img_id, _ = rig.images.publish(NAME, "v1", [b"h"])
    async with rig.controller() as ctl:
        transport = httpx.ASGITransport(app=create_app(ctl))
        async with httpx.AsyncClient(transport=transport, base_url="http://podfsm") as c:
            r = await c.post("/v1/images", json={"image": f"{NAME}:v1"})
            assert r.status_code == 201 and r.json()["id"] == img_id
            assert r.headers["location"] == f"/v1/images/{img_id}"
            r = await c.get("/v1/images", params={"image": NAME + ":v1"})
            assert [i["id"] for i in r.json()["items"]] == [img_id]
            assert (await c.get(f"/v1/images/{img_id[7:]}")).json()["repo_tags"] == [
                f"{NAME}:v1"]
            r = await c.post("/v1/images", json={"image": f"{NAME}:nope"})
            assert r.status_code == 502 and r.json()["kind"] == "ImagePullError"
            r = await c.post("/v1/images", json={"image": NAME, "auth": {"auth": "!"}})
            assert r.status_code == 422 and "auth" in r.json()["error"]
            r = await c.post("/v1/images", json={"image": "Bad Ref"})
            assert r.status_code == 422 and r.json()["kind"] == "InvalidImageReference"
            assert (await c.get(f"/v1/images/sha256:{'f' * 64}")).status_code == 404
            assert (await c.get("/v1/images/nothex")).status_code == 400
            assert (await c.delete(f"/v1/images/{img_id}")).status_code == 204
            assert (await c.delete(f"/v1/images/{img_id}")).status_code == 204
            assert (await c.get("/v1/images")).json()["items"] == []


def test_sizes_print_as_crictl_prints_them() -> None:
    assert [imagecli.human_size(n) for n in (0, 999, 1_028_718, 45_000_000, 1_500_000_000)] == [
        "0B", "999B", "1.03MB", "45MB", "1.5GB"]


async def test_cli_image_verbs_print_crictls_shapes(rig: Rig, capsys: pytest.CaptureFixture[str],
                                                     ) -> None:
    img_id, digest = rig.images.publish(NAME, "v1", [b"c" * 2000])

    class Api:  # the Client's image calls, answered by the controller directly
        def __init__(self, ctl: object) -> None:
            self.ctl = ctl

        async def pull_image(self, ref: str, auth: object = None) -> object:
            return await self.ctl.pull_image(ref)  # type: ignore[attr-defined]

        async def list_images(self, ref: str | None = None) -> object:
            return await self.ctl.list_images(ref)  # type: ignore[attr-defined]

        async def remove_image(self, image_id: str) -> None:
            await self.ctl.remove_image(image_id)  # type: ignore[attr-defined]

    async with rig.controller() as ctl:
        api = Api(ctl)
        ns = argparse.Namespace
        assert await imagecli._pull(api, ns(image=f"{NAME}:v1", creds=None, auth=None)) == 0  # type: ignore[arg-type]
        assert capsys.readouterr().out == f"Image is up to date for {img_id}\n"
        await imagecli._images(api, ns(image=None, quiet=False, digests=True, output="table"))  # type: ignore[arg-type]
        head, row = capsys.readouterr().out.splitlines()
        assert head.split() == ["IMAGE", "TAG", "DIGEST", "IMAGE", "ID", "SIZE"]
        assert row.split()[:4] == [NAME, "v1", digest[7:20], img_id[7:20]]
        await imagecli._images(api, ns(image=None, quiet=False, digests=False, output="json"))  # type: ignore[arg-type]
        (out,) = json.loads(capsys.readouterr().out)["images"]
        assert out["repoTags"] == [f"{NAME}:v1"] and out["size"].isdigit()
        await imagecli._inspecti(api, ns(images=[img_id[7:15]]))  # type: ignore[arg-type]
        assert json.loads(capsys.readouterr().out)["status"]["id"] == img_id
        assert await imagecli._rmi(api, ns(images=[f"{NAME}:v1", "gone:1"])) == 1  # type: ignore[arg-type]
        out_err = capsys.readouterr()
        assert out_err.out == f"Deleted: {NAME}:v1\n" and "gone:1" in out_err.err


def test_the_cli_has_the_image_verbs() -> None:
    from podfsm.faces import cli

    parser = cli.build_parser()
    for argv in (["pull", "busybox"], ["images", "-q"], ["inspecti", "x"], ["rmi", "x", "y"]):
        assert callable(parser.parse_args(argv).run)
    assert asyncio.iscoroutinefunction(imagecli._pull)
