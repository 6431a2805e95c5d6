"""The image driver: the registry client, the content store and the layer store behind the one
interface the controller uses (drivers.base.ImageDriver). Blocking file work (hashing into the
store, fsync, unpacking, walking the store for its usage) runs in worker threads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform as _platform
import re
import time
from collections.abc import Mapping
from typing import Protocol

import anyio

from podfsm.core.errors import DigestMismatch, UnpackError
from podfsm.core.failpoints import Failpoint
from podfsm.core.imageref import ImageReference
from podfsm.core.images import ImageRecord, garbage
from podfsm.core.imagespec import Descriptor, Platform, host_platform
from podfsm.core.records import FilesystemUsage
from podfsm.core.registryhosts import Endpoint, RegistryAuth
from podfsm.drivers import sysinfo
from podfsm.drivers.imagestore import ImageStore, check_document
from podfsm.drivers.layers import LayerInfo, LayerStore
from podfsm.drivers.registry import Registry

log = logging.getLogger(__name__)
_CHAIN_DIR = re.compile(r"[0-9a-f]{64}")


class Layers(Protocol):
    """What the image driver uses of drivers.layers.LayerStore (tests may hand another)."""

    def recover(self) -> None: ...

    def info(self, chain: str) -> LayerInfo | None: ...

    def ensure(self, chain_id: str, parent_chain_id: str | None, blob_path: str,
               media_type: str) -> str: ...

    def remove(self, chain_id: str) -> None: ...

    def usage(self) -> tuple[int, int]: ...


class LocalImages:
    """drivers.base.ImageDriver on this host."""

    def __init__(self, image_dir: str, registry_config_dir: str, *,
                 platform: Platform | None = None, layers: Layers | None = None,
                 timeout: float = 60.0, failpoints: Mapping[str, Failpoint] | None = None,
                 ) -> None:
        self.store = ImageStore(image_dir)
        self.registry = Registry(registry_config_dir, timeout=timeout)
        self._platform = platform or host_platform(_platform.machine())
        self._layers = layers
        self._failpoints = failpoints
        self._limiter = anyio.CapacityLimiter(4)

    @property
    def layers(self) -> Layers:
        if self._layers is None:
            self._layers = LayerStore(self.store.layer_dir, self._failpoints)
        return self._layers

    async def open(self) -> dict[str, ImageRecord]:
        self.store.open()
        try:
            return await anyio.to_thread.run_sync(self._recover)
        except BaseException:
            self.store.close()
            raise

    def _recover(self) -> dict[str, ImageRecord]:
        layers = self.layers
        layers.recover()
        names = [n for n in os.listdir(self.store.layer_dir) if _CHAIN_DIR.fullmatch(n)]
        images, stale = self.store.recover(names)
        for chain in stale:
            layers.remove(chain)
        dropped = [img for img in list(images.values()) if not self._repair(img)]
        for img in dropped:
            self.store.delete_image(img.id)
            del images[img.id]
        blobs, chains = garbage(images.values(), dropped)
        for chain in chains:
            layers.remove(chain)
        self.store.remove_blobs(blobs)
        return images

    def _repair(self, img: ImageRecord) -> bool:
        """Unpack again, from its blob, each layer of `img` whose directory is gone (a layer
        directory without its layer.json was removed by the layer store's recover()); False
        (logged) when that cannot be done and the image must be dropped. A record never
        names a missing blob here: the store dropped those already."""
        parent: str | None = None
        for layer in img.layers:
            if self.layers.info(layer.chain_id) is None:
                log.warning("image %s (%s): layer %s is not unpacked: unpacking it again from "
                            "blob %s", img.id, ", ".join(img.names()) or "no name",
                            layer.chain_id, layer.digest)
                try:
                    self.layers.ensure(layer.chain_id, parent,
                                       self.store.blob_path(layer.digest), layer.media_type)
                except (OSError, UnpackError) as exc:
                    log.error("image %s (%s) removed: its layer %s cannot be unpacked again "
                              "from blob %s (%s); pull the image again", img.id,
                              ", ".join(img.names()) or "no name", layer.chain_id,
                              layer.digest, exc)
                    return False
            parent = layer.chain_id
        return True

    async def close(self) -> None:
        await self.registry.aclose()
        self.store.close()

    def platform(self) -> Platform:
        return self._platform

    async def resolve(self, ref: ImageReference, auth: RegistryAuth,
                      ) -> tuple[bytes, str, str, Endpoint]:
        return await self.registry.resolve(ref, auth)

    async def fetch_manifest(self, ref: ImageReference, desc: Descriptor, first: Endpoint,
                             auth: RegistryAuth) -> tuple[bytes, str]:
        return await self.registry.fetch_manifest(ref, desc, first, auth)

    async def has_blob(self, digest: str, size: int) -> bool:
        return self.store.has_blob(digest, size)

    async def put_document(self, digest: str, data: bytes) -> None:
        check_document(digest, len(data), data)
        await anyio.to_thread.run_sync(self.store.put_blob, digest, data)

    async def read_blob(self, digest: str) -> bytes:
        return await anyio.to_thread.run_sync(self.store.read_blob, digest)

    async def fetch_blob(self, ref: ImageReference, desc: Descriptor, first: Endpoint,
                         auth: RegistryAuth) -> None:
        ingest = self.store.ingest(desc.digest, desc.size)
        try:
            await self.registry.fetch_blob(ref, desc, first, auth, ingest.write, ingest.reset)
            with anyio.CancelScope(shield=True):  # a rename is not left half done
                await anyio.to_thread.run_sync(ingest.commit)
        finally:
            ingest.abort()

    async def unpack(self, chain_id: str, parent: str | None, digest: str,
                     media_type: str) -> str:
        path = self.store.blob_path(digest)
        try:
            with anyio.CancelScope(shield=True):  # the unpacker finishes or undoes its work
                out: str = await anyio.to_thread.run_sync(
                    self.layers.ensure, chain_id, parent, path, media_type,
                    limiter=self._limiter)
        except UnpackError as exc:
            if exc.entry:  # a hostile or unrepresentable entry: the error names it
                raise
            # the stream's fault (its diff id, its compression, its tar format): the blob
            raise DigestMismatch(digest, f"as layer {chain_id}: {exc.reason}") from None
        return out

    async def save_image(self, rec: ImageRecord) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.store.save_image, rec)

    async def delete_image(self, image_id: str) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.store.delete_image, image_id)

    async def remove_content(self, blobs: set[str], chain_ids: set[str]) -> None:
        def remove() -> None:
            for chain in chain_ids:
                self.layers.remove(chain)
            self.store.remove_blobs(blobs)

        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(remove)

    async def usage(self) -> FilesystemUsage:
        def measure() -> FilesystemUsage:
            used, inodes = self.store.usage()
            with contextlib.suppress(OSError):
                lb, li = self.layers.usage()
                used, inodes = used + lb, inodes + li
            fs = sysinfo.filesystem_usage([self.store.root])
            mount = fs[0].mountpoint if fs else self.store.root
            return FilesystemUsage(mountpoint=mount, timestamp_ns=time.time_ns(),
                                   used_bytes=used, inodes_used=inodes)

        return await anyio.to_thread.run_sync(measure)
