"""The pure core of images: references as Docker normalizes them, the documents of a pull, the
platform choice, chain ids, containerd's hosts.toml, and how records find, share and free
content."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import pytest

from podfsm.core.errors import ImagePullError, InvalidImageReference, InvalidPullRequest
from podfsm.core.imageref import parse_reference, registry_host_dirs
from podfsm.core.images import ImageRecord, LayerRecord, garbage, place, resolve
from podfsm.core.imagespec import (
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    chain_ids,
    choose_manifest,
    config_user,
    document_type,
    host_platform,
    parse_config,
    parse_index,
    parse_manifest,
    parse_platform,
    sha256_digest,
)
from podfsm.core.registryhosts import HostsConfigError, auth_from_cri, parse_hosts

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


@pytest.mark.parametrize(("text", "expected"), [
    ("busybox", "docker.io/library/busybox:latest"),
    ("busybox:1.36", "docker.io/library/busybox:1.36"),
    ("library/busybox", "docker.io/library/busybox:latest"),
    ("index.docker.io/library/busybox", "docker.io/library/busybox:latest"),
    ("someone/app:v1", "docker.io/someone/app:v1"),
    ("registry.k8s.io/pause:3.9", "registry.k8s.io/pause:3.9"),
    ("localhost/app", "localhost/app:latest"),
    ("127.0.0.1:5000/a/b:c", "127.0.0.1:5000/a/b:c"),
    (f"busybox@{D1}", f"docker.io/library/busybox@{D1}"),
    (f"gcr.io/x/y:t@{D1}", f"gcr.io/x/y:t@{D1}"),
])
def test_references_normalize_as_docker_does(text: str, expected: str) -> None:
    assert str(parse_reference(text)) == expected


def test_a_digest_reference_pulls_the_digest_and_has_no_tag() -> None:
    ref = parse_reference(f"busybox@{D1}")
    assert (ref.tag, ref.digest, ref.pull_ref, ref.repo_tag) == (None, D1, D1, None)
    assert ref.repo_digest(D2) == f"docker.io/library/busybox@{D2}"
    assert parse_reference("127.0.0.1:5000/a").api_host == "127.0.0.1:5000"


@pytest.mark.parametrize(("text", "problem"), [
    ("", "empty"), ("Busybox", "lower case"), ("a:70000/b", "bad domain"),
    ("busybox@sha256:abc", "digest"),
    ("a/b:bad tag", "bad tag .bad tag."), ("a//b", "path component"), ("busybox:-x", "bad tag"),
])
def test_bad_references_are_refused_naming_the_problem(text: str, problem: str) -> None:
    with pytest.raises(InvalidImageReference, match=problem):
        parse_reference(text)


def test_host_directories_are_tried_as_containerd_tries_them() -> None:
    assert registry_host_dirs("127.0.0.1:5000") == ["127.0.0.1_5000_", "127.0.0.1:5000",
                                                    "_default"]
    assert registry_host_dirs("gcr.io") == ["gcr.io", "_default"]


def _index(entries: list[tuple[str, str]], media: str = OCI_INDEX) -> bytes:
    out = []
    for digest, plat in entries:
        p = plat.split("/")
        out.append({"mediaType": OCI_MANIFEST, "digest": digest, "size": 10,
                    "platform": {"os": p[0], "architecture": p[1],
                                 **({"variant": p[2]} if len(p) > 2 else {})}})
    return json.dumps({"schemaVersion": 2, "mediaType": media, "manifests": out}).encode()


def test_the_platform_is_chosen_never_the_first_entry() -> None:
    arm, amd, armv7 = "sha256:" + "a" * 64, "sha256:" + "b" * 64, "sha256:" + "c" * 64
    idx = parse_index(_index([(arm, "linux/arm64/v8"), (armv7, "linux/arm/v7"),
                              (amd, "linux/amd64")]), D1)
    assert choose_manifest(idx, host_platform("x86_64"), D1).digest == amd
    assert choose_manifest(idx, host_platform("aarch64"), D1).digest == arm
    assert choose_manifest(idx, parse_platform("linux/arm/v7"), D1).digest == armv7
    with pytest.raises(ImagePullError, match=r"no manifest for platform linux/s390x .*"
                                             r"offers linux/arm64/v8, linux/arm/v7"):
        choose_manifest(idx, parse_platform("linux/s390x"), D1)


def test_document_types_come_from_the_body_then_the_content_type() -> None:
    body = _index([(D1, "linux/amd64")], DOCKER_MANIFEST_LIST)
    assert document_type(body, OCI_INDEX, D2) == DOCKER_MANIFEST_LIST
    bare = json.dumps({"schemaVersion": 2, "manifests": []}).encode()
    assert document_type(bare, f"{OCI_INDEX}; charset=utf-8", D2) == OCI_INDEX
    with pytest.raises(ImagePullError, match="neither"):
        document_type(json.dumps({"mediaType": "text/plain"}).encode(), "", D2)


def test_manifests_and_configs_are_checked() -> None:
    man = {"schemaVersion": 2, "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                          "digest": D1, "size": 3},
           "layers": [{"mediaType": "application/x-tar", "digest": D2, "size": 1}]}
    with pytest.raises(ImagePullError, match="unsupported media type 'application/x-tar'"):
        parse_manifest(json.dumps(man).encode(), D1)
    man["schemaVersion"] = 1
    with pytest.raises(ImagePullError, match="schemaVersion 1"):
        parse_manifest(json.dumps(man).encode(), D1)
    cfg = {"rootfs": {"type": "layers", "diff_ids": [D1]}, "config": {"User": "1003:1004"}}
    assert parse_config(json.dumps(cfg).encode(), D2, 1).config.user == "1003:1004"
    with pytest.raises(ImagePullError, match="1 diff_ids for 2 layers"):
        parse_config(json.dumps(cfg).encode(), D2, 2)


def test_chain_ids_follow_the_oci_spec() -> None:
    assert chain_ids([D1]) == [D1]
    c2 = sha256_digest(f"{D1} {D2}".encode())
    assert chain_ids([D1, D2, D1]) == [D1, c2, sha256_digest(f"{c2} {D1}".encode())]


@pytest.mark.parametrize(("user", "expected"), [
    ("1002", (1002, "")), ("www-data", (None, "www-data")), ("1003:1004", (1003, "")),
    ("www-data:1004", (None, "www-data")), ("", (None, "")),
])
def test_the_config_user_gives_uid_or_username(user: str, expected: tuple[int | None, str],
                                               ) -> None:
    assert config_user(user) == expected


HOSTS = """
server = "https://registry.k8s.io"

[host."http://127.0.0.1:5000"]
  capabilities = ["pull", "resolve"]
  [host."http://127.0.0.1:5000".header]
    x-a = "1"
    x-b = ["2", "3"]

[host."https://mirror.example/prefix"]
  capabilities = ["pull"]
  skip_verify = true
  ca = ["ca.crt"]
  client = [["c.crt", "c.key"]]
  override_path = true
"""


def test_hosts_toml_gives_mirrors_in_order_then_the_server() -> None:
    eps = parse_hosts(HOSTS, "registry.k8s.io", "/etc/podfsm/certs.d/registry.k8s.io/hosts.toml")
    assert [e.api for e in eps] == ["http://127.0.0.1:5000/v2", "https://mirror.example/prefix",
                                    "https://registry.k8s.io/v2"]
    local, mirror, server = eps
    assert local.plain_http and local.capabilities == ("pull", "resolve")
    assert local.headers == (("x-a", "1"), ("x-b", "2"), ("x-b", "3"))
    assert mirror.skip_verify and not mirror.can("resolve")
    assert mirror.ca == ("/etc/podfsm/certs.d/registry.k8s.io/ca.crt",)
    assert mirror.client == (("/etc/podfsm/certs.d/registry.k8s.io/c.crt",
                              "/etc/podfsm/certs.d/registry.k8s.io/c.key"),)
    assert server.can("resolve") and not server.mirror


def test_hosts_toml_without_server_falls_back_to_the_registry_itself() -> None:
    eps = parse_hosts('[host."http://127.0.0.1:1"]\n', "docker.io", "/x/hosts.toml")
    assert [e.api for e in eps] == ["http://127.0.0.1:1/v2", "https://registry-1.docker.io/v2"]


@pytest.mark.parametrize(("text", "problem"), [
    ("server = 3", "server must be a URL"),
    ('[host."http://a"]\ncapabilities = ["fly"]', "unknown fly"),
    ('[host."ftp://a"]\n', "not an http"),
    ("mirrors = 1", "unknown key"),
    ("server = ", "not TOML"),
    ('[host."http://a"]\nskip_verify = "yes"', "true or false"),
])
def test_bad_hosts_toml_is_refused_naming_the_key(text: str, problem: str) -> None:
    with pytest.raises(HostsConfigError, match=problem):
        parse_hosts(text, "gcr.io", "/d/gcr.io/hosts.toml")


def test_cri_auth_decodes_the_auth_field() -> None:
    a = auth_from_cri(auth=base64.b64encode(b"me:se:cret").decode())
    assert (a.username, a.password) == ("me", "se:cret")
    assert auth_from_cri(username="u", password="p", auth="garbage!").username == "u"
    with pytest.raises(InvalidPullRequest, match="not base64"):
        auth_from_cri(auth="garbage!")
    with pytest.raises(InvalidPullRequest, match="registry_token is not printable ASCII"):
        auth_from_cri(registry_token="tok en")


def _rec(cfg: str, tags: tuple[str, ...], digests: tuple[str, ...], layers: list[str],
         ) -> ImageRecord:
    lrs = tuple(LayerRecord(digest=d, media_type="m", size=1, diff_id=d, chain_id=d)
                for d in layers)
    return ImageRecord(id=cfg, repo_tags=tags, repo_digests=digests, size=1,
                       platform="linux/amd64", manifest_digest=cfg, manifest_media_type="m",
                       config_media_type="c", blobs=(cfg, *layers), layers=lrs,
                       pulled_at=datetime.now(UTC))


def test_a_reference_finds_an_image_by_any_of_its_names() -> None:
    a = _rec("sha256:" + "ab" * 32, ("docker.io/library/busybox:latest",),
             (f"docker.io/library/busybox@{D1}",), [D2])
    images = {a.id: a}
    for ref in (a.id, a.id[7:], "abab", "sha256:abab", "busybox", "busybox:latest",
                "docker.io/library/busybox", f"busybox@{D1}"):
        assert resolve(images, ref) is a, ref
    for ref in ("busybox:other", "ff", f"busybox@{D2}"):
        assert resolve(images, ref) is None, ref
    with pytest.raises(InvalidImageReference):
        resolve(images, "Not A Ref")


def test_a_name_moves_to_the_newest_image_and_an_image_without_names_is_dropped() -> None:
    old = _rec("sha256:" + "a" * 64, ("x:1", "x:2"), ("x@" + D1,), [D1])
    lone = _rec("sha256:" + "b" * 64, ("y:1",), (), [D2])
    new = _rec("sha256:" + "c" * 64, ("x:1", "y:1"), (), [D2])
    p = place({old.id: old, lone.id: lone}, new)
    assert [r.repo_tags for r in p.updated] == [("x:2",)]
    assert [r.id for r in p.dropped] == [lone.id]
    again = place({new.id: new}, _rec(new.id, ("z:1",), ("z@" + D1,), [D2]))
    assert again.record.repo_tags == ("x:1", "y:1", "z:1")


def test_content_is_freed_with_the_last_image_that_needs_it() -> None:
    a = _rec("sha256:" + "a" * 64, ("a:1",), (), [D1, D2])
    b = _rec("sha256:" + "b" * 64, ("b:1",), (), [D2])
    assert garbage([b], [a]) == ({a.id, D1}, {D1})
    assert garbage([], [a], busy_blobs=[D1]) == ({a.id, D2}, {D1, D2})
