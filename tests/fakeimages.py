"""A fake image driver (drivers.base.ImageDriver) for unit tests: a registry and a store in
memory. It verifies digests as the real one does, so the controller's logic (platform choice,
names, shared downloads, garbage) is tested without sockets; the real driver against a real
registry is tests/integration/test_images.py."""

from __future__ import annotations

import hashlib
import json
import time

import anyio

from podfsm.core.errors import DigestMismatch, ImagePullError
from podfsm.core.imageref import ImageReference
from podfsm.core.images import ImageRecord
from podfsm.core.imagespec import (
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    Descriptor,
    Platform,
    host_platform,
)
from podfsm.core.records import FilesystemUsage
from podfsm.core.registryhosts import Endpoint, RegistryAuth

ENDPOINT = Endpoint(api="http://fake.invalid/v2")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class FakeImages:
    """Remote content by digest and tag; local blobs, layers and records."""

    def __init__(self) -> None:
        self.remote: dict[str, bytes] = {}
        self.tags: dict[str, tuple[str, str]] = {}  # "name:tag" -> (digest, media type)
        self.blobs: dict[str, bytes] = {}
        self.layers: set[str] = set()
        self.records: dict[str, ImageRecord] = {}
        self.fetch_delay = 0.0
        self.fetched: list[str] = []

    def publish(self, name: str, tag: str, layers: list[bytes], user: str = "",
                label: str = "") -> tuple[str, str]:
        """Put an image (layers as uncompressed bytes, stored as they are) in the fake
        registry under name:tag; (image id, manifest digest)."""
        diff_ids = [sha(la) for la in layers]
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "config": {"User": user, "Labels": {"l": label}},
                             "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": DOCKER_CONFIG, "digest": sha(config), "size": len(config)},
            "layers": [{"mediaType": DOCKER_LAYER_GZIP, "digest": sha(la), "size": len(la)}
                       for la in layers]}).encode()
        for data in (config, manifest, *layers):
            self.remote[sha(data)] = data
        self.tags[f"{name}:{tag}"] = (sha(manifest), DOCKER_MANIFEST)
        return sha(config), sha(manifest)

    async def open(self) -> dict[str, ImageRecord]:
        return dict(self.records)

    async def close(self) -> None:
        pass

    def platform(self) -> Platform:
        return host_platform("x86_64")

    async def resolve(self, ref: ImageReference, auth: RegistryAuth,
                      ) -> tuple[bytes, str, str, Endpoint]:
        if ref.digest:
            digest, media = ref.digest, DOCKER_MANIFEST
        elif f"{ref.name}:{ref.tag}" in self.tags:
            digest, media = self.tags[f"{ref.name}:{ref.tag}"]
        else:
            raise ImagePullError(f"pulling {ref}: the fake registry has no such tag")
        if digest not in self.remote:
            raise ImagePullError(f"pulling {ref}: the fake registry has no {digest}")
        return self.remote[digest], media, digest, ENDPOINT

    async def fetch_manifest(self, ref: ImageReference, desc: Descriptor, first: Endpoint,
                             auth: RegistryAuth) -> tuple[bytes, str]:
        return self.remote[desc.digest], desc.media_type

    async def has_blob(self, digest: str, size: int) -> bool:
        return digest in self.blobs

    async def put_document(self, digest: str, data: bytes) -> None:
        self.blobs[digest] = data

    async def read_blob(self, digest: str) -> bytes:
        return self.blobs[digest]

    async def fetch_blob(self, ref: ImageReference, desc: Descriptor, first: Endpoint,
                         auth: RegistryAuth) -> None:
        self.fetched.append(desc.digest)
        if self.fetch_delay:
            await anyio.sleep(self.fetch_delay)
        data = self.remote.get(desc.digest)
        if data is None:
            raise ImagePullError(f"blob {desc.digest}: not in the fake registry")
        if sha(data) != desc.digest or len(data) != desc.size:
            raise DigestMismatch(desc.digest, f"it hashes to {sha(data)}")
        self.blobs[desc.digest] = data

    async def unpack(self, chain_id: str, parent: str | None, digest: str,
                     media_type: str) -> str:
        assert parent is None or parent in self.layers, "a layer is unpacked after its parent"
        self.layers.add(chain_id)
        return f"/fake/layers/{chain_id}"

    async def save_image(self, rec: ImageRecord) -> None:
        self.records[rec.id] = rec

    async def delete_image(self, image_id: str) -> None:
        self.records.pop(image_id, None)

    async def remove_content(self, blobs: set[str], chain_ids: set[str]) -> None:
        for b in blobs:
            self.blobs.pop(b, None)
        self.layers -= chain_ids

    async def usage(self) -> FilesystemUsage:
        return FilesystemUsage(mountpoint="/", timestamp_ns=time.time_ns(),
                               used_bytes=sum(map(len, self.blobs.values())),
                               inodes_used=len(self.blobs) + len(self.layers)
                               + len(self.records))
