"""OCI and Docker image documents: media types, manifests, indexes, configs, the platform
choice, digests and chain ids (pure).

A pull reads three kinds of JSON from a registry: an index (OCI image index or Docker manifest
list) naming one manifest per platform, a manifest (OCI or Docker schema 2) naming a config
and layers, and the config (the image's runtime defaults and the layers' uncompressed digests,
`rootfs.diff_ids`). Each is parsed here from bytes already verified against their digest.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from podfsm.core.errors import ImagePullError
from podfsm.core.imageref import is_digest

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_ND = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_ND_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_ND_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"

INDEX_TYPES = frozenset({DOCKER_MANIFEST_LIST, OCI_INDEX})
MANIFEST_TYPES = frozenset({DOCKER_MANIFEST, OCI_MANIFEST})
CONFIG_TYPES = frozenset({DOCKER_CONFIG, OCI_CONFIG})
#: layer media type -> its compression ("" uncompressed)
LAYER_TYPES: dict[str, str] = {
    DOCKER_LAYER_GZIP: "gzip", DOCKER_LAYER_FOREIGN: "gzip",
    OCI_LAYER: "", OCI_LAYER_GZIP: "gzip", OCI_LAYER_ZSTD: "zstd",
    OCI_LAYER_ND: "", OCI_LAYER_ND_GZIP: "gzip", OCI_LAYER_ND_ZSTD: "zstd",
}
#: The Accept list of a manifest request: every kind podfsm can read (a registry answers 404
#: for an index it may not send as such, see research.md).
MANIFEST_ACCEPT = ", ".join([OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST])
#: manifests, indexes and configs are small; anything larger is not one
MAX_DOCUMENT_BYTES = 4 << 20

M = TypeVar("M", bound=BaseModel)

#: `uname -m` -> GOARCH, as the platform of an index entry names it
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
         "armv7l": "arm", "armv6l": "arm", "i386": "386", "i686": "386", "ppc64le": "ppc64le",
         "s390x": "s390x", "riscv64": "riscv64"}


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The chain id of each layer (OCI image spec): the first is its diff id, each next one
    sha256("<parent chain id> <diff id>")."""
    out: list[str] = []
    for diff in diff_ids:
        out.append(diff if not out else sha256_digest(f"{out[-1]} {diff}".encode()))
    return out


class _Doc(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


class Platform(_Doc):
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def host_platform(machine: str) -> Platform:
    """The platform of a Linux host whose `uname -m` is `machine` (arm64 as v8, arm as v7)."""
    arch = _ARCH.get(machine, machine)
    variant = {"arm64": "v8", "arm": "v6" if machine == "armv6l" else "v7"}.get(arch, "")
    return Platform(os="linux", architecture=arch, variant=variant)


def parse_platform(text: str) -> Platform:
    """`os/arch[/variant]`, as `linux/amd64`; ValueError otherwise."""
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"platform {text!r} is not os/arch[/variant]")
    return Platform(os=parts[0], architecture=_ARCH.get(parts[1], parts[1]),
                    variant=parts[2] if len(parts) == 3 else "")


class Descriptor(_Doc):
    media_type: str = Field(alias="mediaType")
    digest: str
    size: int = Field(ge=0)
    platform: Platform | None = None
    annotations: dict[str, str] = {}


class Index(_Doc):
    schema_version: int = Field(alias="schemaVersion")
    media_type: str = Field(default="", alias="mediaType")
    manifests: list[Descriptor]


class Manifest(_Doc):
    schema_version: int = Field(alias="schemaVersion")
    media_type: str = Field(default="", alias="mediaType")
    config: Descriptor
    layers: list[Descriptor]


class RootFS(_Doc):
    type: str
    diff_ids: list[str]


class ImageConfigBody(_Doc):
    user: str = Field(default="", alias="User")
    env: list[str] | None = Field(default=None, alias="Env")
    entrypoint: list[str] | None = Field(default=None, alias="Entrypoint")
    cmd: list[str] | None = Field(default=None, alias="Cmd")
    working_dir: str = Field(default="", alias="WorkingDir")
    labels: dict[str, str] | None = Field(default=None, alias="Labels")
    stop_signal: str = Field(default="", alias="StopSignal")
    volumes: dict[str, Any] | None = Field(default=None, alias="Volumes")
    exposed_ports: dict[str, Any] | None = Field(default=None, alias="ExposedPorts")


class ImageConfig(_Doc):
    architecture: str = ""
    os: str = ""
    variant: str = ""
    config: ImageConfigBody = ImageConfigBody()
    rootfs: RootFS


def _load(data: bytes, what: str, digest: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise ImagePullError(f"{what} {digest} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ImagePullError(f"{what} {digest} is not a JSON object")
    return doc


def _model(cls: type[M], doc: dict[str, Any], what: str, digest: str) -> M:
    try:
        return cls.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ImagePullError(f"{what} {digest}: {where}: {first['msg']}") from None


def document_type(data: bytes, content_type: str, digest: str) -> str:
    """The media type of a manifest or index: its own `mediaType` field, else the registry's
    Content-Type; ImagePullError when it is neither kind podfsm reads."""
    doc = _load(data, "manifest", digest)
    media = doc.get("mediaType") or content_type.split(";")[0].strip()
    if not isinstance(media, str) or media not in INDEX_TYPES | MANIFEST_TYPES:
        if not media and "manifests" in doc:
            return OCI_INDEX
        if not media and "config" in doc:
            return OCI_MANIFEST
        raise ImagePullError(f"manifest {digest} has media type {media!r}, which is neither "
                             "an OCI/Docker manifest nor an index")
    return media


def parse_index(data: bytes, digest: str) -> Index:
    index = _model(Index, _load(data, "index", digest), "index", digest)
    for d in index.manifests:
        _check_descriptor(d, "index", digest)
    return index


def parse_manifest(data: bytes, digest: str) -> Manifest:
    doc = _load(data, "manifest", digest)
    if doc.get("schemaVersion") != 2:
        raise ImagePullError(f"manifest {digest}: schemaVersion {doc.get('schemaVersion')!r} "
                             "(only schema 2 is supported)")
    man = _model(Manifest, doc, "manifest", digest)
    if man.config.media_type not in CONFIG_TYPES:
        raise ImagePullError(f"manifest {digest}: config media type {man.config.media_type!r} "
                             "is not an image config")
    _check_descriptor(man.config, "manifest", digest)
    for layer in man.layers:
        _check_descriptor(layer, "manifest", digest)
        if layer.media_type not in LAYER_TYPES:
            raise ImagePullError(f"manifest {digest}: layer {layer.digest} has unsupported "
                                 f"media type {layer.media_type!r}")
    return man


def parse_config(data: bytes, digest: str, layers: int) -> ImageConfig:
    cfg = _model(ImageConfig, _load(data, "config", digest), "config", digest)
    if cfg.rootfs.type != "layers":
        raise ImagePullError(f"config {digest}: rootfs.type {cfg.rootfs.type!r} is not 'layers'")
    if len(cfg.rootfs.diff_ids) != layers:
        raise ImagePullError(f"config {digest}: {len(cfg.rootfs.diff_ids)} diff_ids for "
                             f"{layers} layers")
    for diff in cfg.rootfs.diff_ids:
        if not is_digest(diff) or not diff.startswith("sha256:"):
            raise ImagePullError(f"config {digest}: diff_id {diff!r} is not a sha256 digest")
    return cfg


def _check_descriptor(d: Descriptor, what: str, digest: str) -> None:
    if not is_digest(d.digest) or not d.digest.startswith("sha256:"):
        raise ImagePullError(f"{what} {digest}: descriptor digest {d.digest!r} is not "
                             "sha256:<64 hex digits>")


def choose_manifest(index: Index, want: Platform, digest: str) -> Descriptor:
    """The entry of `index` for platform `want`: same os and architecture, and the same variant
    when both name one (an entry without a variant matches any); an exact variant match is
    preferred. Never just the first entry: ImagePullError lists what the index offers."""
    candidates = [d for d in index.manifests
                  if d.platform is not None and d.media_type in MANIFEST_TYPES
                  and d.platform.os == want.os and d.platform.architecture == want.architecture]
    exact = [d for d in candidates if d.platform is not None
             and d.platform.variant == want.variant]
    loose = [d for d in candidates if d.platform is not None
             and (not d.platform.variant or not want.variant)]
    if exact or loose:
        return (exact or loose)[0]
    offered = ", ".join(str(d.platform) if d.platform else "(no platform)"
                        for d in index.manifests) or "nothing"
    raise ImagePullError(f"index {digest} has no manifest for platform {want} "
                         f"(it offers {offered})")


def config_user(user: str) -> tuple[int | None, str]:
    """(uid, username) of a config's `User` ("1002", "www-data", "1003:1004",
    "www-data:1004"), as the CRI's Image.uid/username: a numeric user is a uid, else a name."""
    name = user.split(":", 1)[0]
    if not name:
        return None, ""
    if name.isdigit():
        return int(name), ""
    return None, name
