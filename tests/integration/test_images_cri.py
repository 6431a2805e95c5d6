"""The ImageService of a real `podfsm serve`, held to crictl and critest 1.26.1, pulling from a
real registry on 127.0.0.1 through a containerd-style mirror config: gcr.io and
registry.k8s.io are sent to the local registry, which holds stand-ins of critest's test images
(built from busybox-static with the `User` each spec checks)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cri_api.v1 import api_pb2 as pb
from cri_api.v1 import api_pb2_grpc as pb_grpc

from tests import imagekit as ik
from tests.integration.conftest import Env
from tests.integration.test_cri import Crictl, tool
from tests.integration.test_faces import Daemon, podfsm, serving, use_env_network

pytestmark = [pytest.mark.integration, pytest.mark.parametrize("runtime", ["runc"])]

CRITOOLS = "k8s-staging-cri-tools"
#: critest's image names (pkg/validate/consts.go) and the config User each must carry
CRITEST_IMAGES: dict[str, str] = {
    "test-image-tag:test": "", "test-image-tag:all": "", "test-image-latest:latest": "",
    "test-image-user-uid:latest": "1002", "test-image-user-username:latest": "www-data",
    "test-image-user-uid-group:latest": "1003:1004",
    "test-image-user-username-group:latest": "www-data:1004",
    "test-image-1:latest": "", "test-image-2:latest": "", "test-image-3:latest": "",
}
CRITEST_FOCUS = "Image Manager"


@pytest.fixture(scope="module")
def registry() -> Iterator[ik.Registry]:
    """The local registry with critest's stand-ins and a pause image."""
    with ik.run_registry() as reg:
        base = ik.busybox_layer()
        for name, user in CRITEST_IMAGES.items():
            repo, tag = name.split(":")
            reg.push_image(f"{CRITOOLS}/{repo}", ik.build_image([base], user=user, label=name),
                           tag)
        same = ik.build_image([base], label="tags")
        for tag in ("1", "2", "3"):
            reg.push_image(f"{CRITOOLS}/test-image-tags", same, tag)
        reg.push_image("pause", ik.build_image([base], label="pause", cmd=("/bin/sleep",)),
                       "3.9")
        yield reg


@pytest.fixture
def daemon(env: Env, registry: ik.Registry) -> Iterator[Daemon]:
    use_env_network(env)
    certs = os.path.join(env.tmp, "certs.d")
    for host in ("gcr.io", "registry.k8s.io"):
        ik.hosts_toml(certs, host, registry.url)
    with serving(env, options=["--registry-config-dir", certs]) as d:
        yield d
        assert d.terminate() == 0
    assert env.leftovers() == {}


def _store(env: Env) -> Path:
    return Path(env.cfg.state_dir, "images")


def test_a_crictl_image_session(env: Env, daemon: Daemon) -> None:
    c = Crictl(daemon)
    out = c.ok("pull", "registry.k8s.io/pause:3.9")
    assert out.startswith("Image is up to date for sha256:"), out
    image_id = out.split()[-1]
    listed = c.ok("images")
    assert listed.splitlines()[0].split() == ["IMAGE", "TAG", "IMAGE", "ID", "SIZE"]
    assert any(line.split()[:3] == ["registry.k8s.io/pause", "3.9", image_id[7:20]]
               for line in listed.splitlines()[1:]), listed
    info = json.loads(c.ok("inspecti", "registry.k8s.io/pause:3.9"))
    assert info["status"]["id"] == image_id
    assert info["status"]["repoTags"] == ["registry.k8s.io/pause:3.9"]
    assert info["info"]["imageSpec"]["config"]["Cmd"] == ["/bin/sleep"]
    print(f"$ crictl pull registry.k8s.io/pause:3.9\n{out}$ crictl images\n{listed}"
          f"$ crictl inspecti registry.k8s.io/pause:3.9 | head -12\n"
          + "\n".join(json.dumps(info, indent=2).splitlines()[:12]))
    fsinfo = c.ok("imagefsinfo")
    print(f"$ crictl imagefsinfo\n{fsinfo}")
    fs = json.loads(fsinfo)["status"]
    assert int(fs["usedBytes"]["value"]) > 1_000_000  # busybox is in the store
    assert int(fs["inodesUsed"]["value"]) > 0
    bad = c.run("pull", "registry.k8s.io/nothere:1")
    assert bad.returncode != 0 and "MANIFEST_UNKNOWN" in bad.stderr, bad.stderr
    print(f"$ crictl rmi {image_id[7:19]}\n" + c.ok("rmi", image_id[7:19]))  # by id prefix
    assert "registry.k8s.io/pause" not in c.ok("images")
    store = _store(env)
    assert not os.listdir(store / "blobs/sha256") and not os.listdir(store / "layers")


def test_a_podfsm_cli_image_session(env: Env, daemon: Daemon) -> None:
    """podfsm's own verbs, over the HTTP socket of the same daemon."""
    name = f"gcr.io/{CRITOOLS}/test-image-user-username"
    out = podfsm(daemon.socket, "pull", name)
    assert out.returncode == 0 and out.stdout.startswith("Image is up to date for sha256:"), out
    image_id = out.stdout.split()[-1]
    table = podfsm(daemon.socket, "images").stdout.splitlines()
    assert table[1].split()[:3] == [name, "latest", image_id[7:20]], table
    info = json.loads(podfsm(daemon.socket, "inspecti", image_id[7:19]).stdout)
    assert info["status"]["username"] == "www-data" and info["status"]["uid"] is None
    bad = podfsm(daemon.socket, "pull", f"gcr.io/{CRITOOLS}/none:1")
    assert bad.returncode == 1 and "MANIFEST_UNKNOWN" in bad.stderr, bad.stderr
    out = podfsm(daemon.socket, "rmi", name)
    assert out.returncode == 0 and out.stdout == f"Deleted: {name}:latest\n", out
    assert podfsm(daemon.socket, "images", "-q").stdout == ""


def test_image_service_over_grpc(env: Env, daemon: Daemon) -> None:
    with grpc.insecure_channel(f"unix:{daemon.cri_socket}") as ch:
        img = pb_grpc.ImageServiceStub(ch)
        name = f"gcr.io/{CRITOOLS}/test-image-user-uid"
        ref = img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=name)),
                            timeout=60).image_ref
        st = img.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=ref[7:15]),
                                                   verbose=True), timeout=30)
        assert st.image.id == ref and st.image.repo_tags == [f"{name}:latest"]
        assert st.image.uid.value == 1002 and st.image.username == ""
        assert json.loads(st.info["info"])["chainID"].startswith("sha256:")
        listed = img.ListImages(pb.ListImagesRequest(filter=pb.ImageFilter(
            image=pb.ImageSpec(image=name))), timeout=30).images
        assert [i.id for i in listed] == [ref]
        missing = img.ImageStatus(pb.ImageStatusRequest(
            image=pb.ImageSpec(image="gcr.io/none/such:1")), timeout=30)
        assert not missing.HasField("image")
        with pytest.raises(grpc.RpcError) as info:
            img.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image="Bad:Ref")), timeout=30)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        img.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=ref)), timeout=30)
        img.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=ref)), timeout=30)
        assert img.ListImages(pb.ListImagesRequest(), timeout=30).images == []


def test_critest_image_manager(env: Env, daemon: Daemon) -> None:
    sock = f"unix://{daemon.cri_socket}"
    r = subprocess.run([tool("critest"), "--runtime-endpoint", sock, "--image-endpoint", sock,
                        "--ginkgo.no-color", f"--ginkgo.focus={CRITEST_FOCUS}",
                        "--ginkgo.skip=with digest"],
                       capture_output=True, text=True, timeout=600, cwd=env.tmp, check=False)
    out = r.stdout + r.stderr
    print("\n".join(line for line in out.splitlines() if "Ran " in line or "Passed" in line))
    assert r.returncode == 0, out
    assert "Ran 6 of " in out and "SUCCESS! -- 6 Passed | 0 Failed" in out, out
