"""Image records and how a reference finds one (pure).

An image is named by its id, the digest of its config (as containerd and Docker name it);
`repo_tags` (`name:tag`) and `repo_digests` (`name@<manifest or index digest>`) are the names it
was pulled by. A name belongs to one image at a time: pulling a tag that now points elsewhere
moves it, and an image left with no name at all is garbage. The content an image needs
(`blobs`: index, manifest, config, layers) and the layer directories (`chain_ids`) are freed
with the last image that needs them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from pydantic import BaseModel, ConfigDict

from podfsm.core.errors import InvalidImageReference
from podfsm.core.imageref import check_digest, parse_reference

RECORD_SCHEMA = 1
_HEX_PREFIX = re.compile(r"(?:sha256:)?([0-9a-f]{1,64})")


class LayerRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    digest: str
    media_type: str
    size: int
    diff_id: str
    chain_id: str


class ImageRecord(BaseModel):
    """One image in the store (written as JSON to `<image dir>/images/<id hex>.json`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = RECORD_SCHEMA
    id: str
    repo_tags: tuple[str, ...] = ()
    repo_digests: tuple[str, ...] = ()
    #: bytes of everything the image holds in the content store (compressed layers, config,
    #: manifests), as containerd reports it
    size: int
    uid: int | None = None
    username: str = ""
    pinned: bool = False
    platform: str
    manifest_digest: str
    manifest_media_type: str
    config_media_type: str
    #: every blob the image needs (index and manifest documents, config, layers)
    blobs: tuple[str, ...]
    layers: tuple[LayerRecord, ...]
    pulled_at: datetime

    @property
    def chain_ids(self) -> tuple[str, ...]:
        return tuple(layer.chain_id for layer in self.layers)

    def names(self) -> tuple[str, ...]:
        return self.repo_tags + self.repo_digests

    def evolve(self, **changes: object) -> ImageRecord:
        return self.model_copy(update=changes)


def resolve(images: Mapping[str, ImageRecord], ref: str) -> ImageRecord | None:
    """The image `ref` names: its id (with or without `sha256:`), a tag or digest reference in
    any spelling that normalizes to one of its names (`busybox` = docker.io/library/
    busybox:latest), or an unambiguous prefix of its id. None when none (or several) match;
    InvalidImageReference when `ref` is neither an id nor a reference."""
    ref = ref.strip()
    if not ref:
        raise InvalidImageReference("image reference is empty")
    full = ref if ref.startswith("sha256:") else f"sha256:{ref}"
    if full in images:
        return images[full]
    try:
        parsed = parse_reference(ref)
    except InvalidImageReference:
        parsed = None
    if parsed is not None:
        names = [n for n in (parsed.repo_tag if not parsed.digest else None,
                             parsed.repo_digest(parsed.digest) if parsed.digest else None) if n]
        for img in images.values():
            if any(n in img.repo_tags or n in img.repo_digests for n in names):
                return img
    m = _HEX_PREFIX.fullmatch(ref)
    if m is not None:
        found = [img for i, img in images.items() if i[len("sha256:"):].startswith(m[1])]
        if len(found) == 1:
            return found[0]
        return None
    if parsed is None:
        parse_reference(ref)  # raises, naming the problem
    return None


@dataclass(frozen=True)
class Placement:
    """What a finished pull changes: the new (or updated) record, and other images that lose a
    name to it (updated, or dropped when no name is left)."""

    record: ImageRecord
    updated: tuple[ImageRecord, ...]
    dropped: tuple[ImageRecord, ...]


def place(images: Mapping[str, ImageRecord], new: ImageRecord) -> Placement:
    """Add `new`'s names to the image with its id (or `new` itself), taking each name from any
    other image that holds it."""
    old = images.get(new.id)
    if old is not None:
        tags = _union(old.repo_tags, new.repo_tags)
        digests = _union(old.repo_digests, new.repo_digests)
        record = new.evolve(repo_tags=tags, repo_digests=digests, pinned=old.pinned or new.pinned)
    else:
        record = new
    names = set(new.names())
    updated: list[ImageRecord] = []
    dropped: list[ImageRecord] = []
    for img in images.values():
        if img.id == new.id or not names & set(img.names()):
            continue
        rest = img.evolve(repo_tags=tuple(t for t in img.repo_tags if t not in names),
                          repo_digests=tuple(d for d in img.repo_digests if d not in names))
        (updated if rest.names() else dropped).append(rest)
    return Placement(record, tuple(updated), tuple(dropped))


def _union(a: Iterable[str], b: Iterable[str]) -> tuple[str, ...]:
    out = list(a)
    out += [x for x in b if x not in out]
    return tuple(out)


def garbage(images: Iterable[ImageRecord], gone: Iterable[ImageRecord],
            busy_blobs: Iterable[str] = (), busy_layers: Iterable[str] = (),
            ) -> tuple[set[str], set[str]]:
    """(blobs, chain ids) that `gone` needed and no image of `images` (the ones that stay) nor
    a pull in flight (`busy_*`) needs."""
    keep_blobs = set(busy_blobs)
    keep_layers = set(busy_layers)
    for img in images:
        keep_blobs.update(img.blobs)
        keep_layers.update(img.chain_ids)
    blobs = {b for img in gone for b in img.blobs} - keep_blobs
    layers = {c for img in gone for c in img.chain_ids} - keep_layers
    return blobs, layers


def needed(images: Iterable[ImageRecord]) -> tuple[set[str], set[str]]:
    """Every blob and chain id some image needs (what recovery keeps)."""
    blobs: set[str] = set()
    layers: set[str] = set()
    for img in images:
        blobs.update(img.blobs)
        layers.update(img.chain_ids)
    return blobs, layers


def record_problem(rec: ImageRecord) -> str | None:
    """Why a loaded record cannot be trusted, or None."""
    try:
        check_digest(rec.id, "image id")
        for b in rec.blobs:
            check_digest(b, "blob")
        for layer in rec.layers:
            check_digest(layer.chain_id, "chain id")
    except InvalidImageReference as exc:
        return str(exc)
    if rec.id not in rec.blobs:
        return "its config is not among its blobs"
    return None
