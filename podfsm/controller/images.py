"""The controller's images: pull, list, status, remove, usage (see docs/images.md).

A pull resolves the reference (mirrors first, as the registry config says), picks the
platform's manifest from an index, downloads the config and every layer into the content store
(each verified against its digest before it is kept), unpacks each layer once by chain id, and
only then writes the image's record: a record never names content that is not there, and what
a failed or crashed pull leaves is removed (at once, or at the next start). Concurrent pulls of
one blob or layer share one download or unpacking: the first does the work, the others wait
for it (and take over if the first is cancelled).

Blobs and layers are garbage when no record needs them and no pull in flight uses them: a
remove frees them with the last image that needed them.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Any

import anyio

from podfsm.core.errors import ImageInUse, ImageNotFound, ImagePullError
from podfsm.core.imageref import ImageReference, parse_reference
from podfsm.core.images import ImageRecord, LayerRecord, garbage, place, resolve
from podfsm.core.imagespec import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    Descriptor,
    chain_ids,
    choose_manifest,
    config_user,
    document_type,
    parse_config,
    parse_index,
    parse_manifest,
)
from podfsm.core.records import FilesystemUsage
from podfsm.core.registryhosts import Endpoint, RegistryAuth
from podfsm.drivers.base import ImageDriver

Failpoints = Callable[[str], AbstractAsyncContextManager[None]]
#: layer downloads of one pull at once
PARALLEL_DOWNLOADS = 3


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report of several downloads that failed together: the first that is not
    a cancellation (the others were cancelled because of it)."""
    leaves: list[BaseException] = []

    def walk(g: BaseExceptionGroup[BaseException]) -> None:
        for e in g.exceptions:
            walk(e) if isinstance(e, BaseExceptionGroup) else leaves.append(e)

    walk(group)
    cancelled = anyio.get_cancelled_exc_class()
    return next((e for e in leaves if not isinstance(e, cancelled)), leaves[0])


class _Flight:
    def __init__(self) -> None:
        self.done = anyio.Event()
        self.error: BaseException | None = None


class ImageManager:
    """The images of one controller (its records in memory, its driver for the rest)."""

    def __init__(self, driver: ImageDriver, failpoints: Failpoints) -> None:
        self.driver = driver
        self._failpoints = failpoints
        self._images: dict[str, ImageRecord] = {}
        self._lock = anyio.Lock()
        self._flights: dict[str, _Flight] = {}
        self._busy_blobs: Counter[str] = Counter()
        self._busy_layers: Counter[str] = Counter()
        #: image id -> whether a container uses it (containers arrive in a later issue)
        self.in_use: Callable[[str], bool] = lambda image_id: False
        #: how many downloads and unpackings actually ran (tests prove sharing with them)
        self.fetches: Counter[str] = Counter()

    async def open(self) -> None:
        self._images = await self.driver.open()

    async def close(self) -> None:
        await self.driver.close()

    # queries

    def find(self, ref: str) -> ImageRecord | None:
        """The image `ref` names (id, id prefix, tag, digest, short name), or None."""
        return resolve(self._images, ref)

    def get(self, ref: str) -> ImageRecord:
        img = self.find(ref)
        if img is None:
            raise ImageNotFound(ref)
        return img

    def all(self, ref: str | None = None) -> list[ImageRecord]:
        if ref:
            img = self.find(ref)
            return [img] if img is not None else []
        return sorted(self._images.values(), key=lambda r: (r.pulled_at, r.id))

    async def info(self, img: ImageRecord) -> dict[str, Any]:
        """The verbose status's info: the config as pulled, the chain id, where it came
        from."""
        import json

        try:
            spec = json.loads(await self.driver.read_blob(img.id))
        except (OSError, ValueError):
            spec = None
        return {
            "chainID": img.layers[-1].chain_id if img.layers else "",
            "imageSpec": spec,
            "manifestDigest": img.manifest_digest,
            "manifestMediaType": img.manifest_media_type,
            "platform": img.platform,
            "layers": [layer.model_dump() for layer in img.layers],
            "pulledAt": img.pulled_at.isoformat(),
        }

    async def usage(self) -> FilesystemUsage:
        return await self.driver.usage()

    # remove

    async def remove(self, ref: str) -> ImageRecord | None:
        """Remove the image `ref` names with all its names, and the content only it needed.
        An unknown image is not an error (None)."""
        async with self._lock:
            img = self.find(ref)
            if img is None:
                return None
            if self.in_use(img.id):
                raise ImageInUse(f"image {img.id} is in use by a container")
            await self.driver.delete_image(img.id)
            del self._images[img.id]
            await self._collect([img])
            return img

    async def _collect(self, gone: Iterable[ImageRecord]) -> None:
        blobs, layers = garbage(self._images.values(), gone, self._busy_blobs,
                                self._busy_layers)
        if blobs or layers:
            await self.driver.remove_content(blobs, layers)

    # pull

    async def pull(self, reference: str, auth: RegistryAuth | None = None, *,
                   timeout: float | None = None) -> ImageRecord:
        """Pull `reference` (see the module's doc); the image's record. `timeout`: seconds
        the whole pull may take (TimeoutError after, and nothing of it is kept)."""
        ref = parse_reference(reference)
        scope = anyio.fail_after(timeout) if timeout is not None else contextlib.nullcontext()
        with scope:
            return await self._pull(ref, auth or RegistryAuth())

    async def _pull(self, ref: ImageReference, auth: RegistryAuth) -> ImageRecord:
        drv = self.driver
        body, ctype, top, ep = await drv.resolve(ref, auth)
        docs = {top: body}
        media = document_type(body, ctype, top)
        manifest_digest, mbody, platform = top, body, ""
        if media in INDEX_TYPES:
            desc = choose_manifest(parse_index(body, top), drv.platform(), top)
            mbody, mctype = await drv.fetch_manifest(ref, desc, ep, auth)
            manifest_digest, media = desc.digest, document_type(mbody, mctype, desc.digest)
            if media not in MANIFEST_TYPES:
                raise ImagePullError(f"index {top}: entry {desc.digest} is {media}, not a "
                                     "manifest")
            docs[manifest_digest] = mbody
            platform = str(desc.platform) if desc.platform else ""
        man = parse_manifest(mbody, manifest_digest)
        blobs = [*docs, man.config.digest, *(layer.digest for layer in man.layers)]
        async with self._busy(blobs, ()):
            await self._blob(ref, man.config, ep, auth)
            cfg = parse_config(await drv.read_blob(man.config.digest), man.config.digest,
                               len(man.layers))
            chains = chain_ids(cfg.rootfs.diff_ids)
            async with self._busy((), chains):
                await self._layers(ref, man.layers, chains, ep, auth)
                for digest, data in docs.items():
                    if not await drv.has_blob(digest, len(data)):
                        await drv.put_document(digest, data)
                uid, username = config_user(cfg.config.user)
                rec = ImageRecord(
                    id=man.config.digest,
                    repo_tags=(ref.repo_tag,) if ref.repo_tag and not ref.digest else (),
                    repo_digests=(ref.repo_digest(top),),
                    size=sum(len(d) for d in docs.values()) + man.config.size
                    + sum(layer.size for layer in man.layers),
                    uid=uid, username=username,
                    platform=platform or "/".join(p for p in (cfg.os, cfg.architecture,
                                                               cfg.variant) if p),
                    manifest_digest=manifest_digest, manifest_media_type=media,
                    config_media_type=man.config.media_type,
                    blobs=tuple(dict.fromkeys(blobs)),
                    layers=tuple(LayerRecord(digest=d.digest, media_type=d.media_type,
                                             size=d.size, diff_id=diff, chain_id=chain)
                                 for d, diff, chain in zip(man.layers, cfg.rootfs.diff_ids,
                                                           chains, strict=True)),
                    pulled_at=datetime.now(UTC))
                return await self._save(rec)

    async def _save(self, rec: ImageRecord) -> ImageRecord:
        async with self._lock:
            placement = place(self._images, rec)
            with anyio.CancelScope(shield=True):
                async with self._failpoints("save_image"):
                    await self.driver.save_image(placement.record)
                self._images[rec.id] = placement.record
                for other in placement.updated:
                    await self.driver.save_image(other)
                    self._images[other.id] = other
                for other in placement.dropped:
                    await self.driver.delete_image(other.id)
                    del self._images[other.id]
                await self._collect(placement.dropped)
            return placement.record

    async def _layers(self, ref: ImageReference, layers: list[Descriptor],
                      chains: list[str], ep: Endpoint, auth: RegistryAuth) -> None:
        limiter = anyio.Semaphore(PARALLEL_DOWNLOADS)

        async def one(desc: Descriptor) -> None:
            async with limiter:
                await self._blob(ref, desc, ep, auth)

        try:
            async with anyio.create_task_group() as tg:
                for desc in layers:
                    tg.start_soon(one, desc)
        except BaseExceptionGroup as group:
            raise _first(group) from None
        parent: str | None = None
        for desc, chain in zip(layers, chains, strict=True):
            await self._once(f"layer:{chain}", self._unpack_fn(chain, parent, desc))
            parent = chain

    def _unpack_fn(self, chain: str, parent: str | None,
                   desc: Descriptor) -> Callable[[], Awaitable[None]]:
        async def unpack() -> None:
            # (its failpoints, unpack_layer.*, are the layer store's: they fire in its thread)
            self.fetches[f"layer:{chain}"] += 1
            await self.driver.unpack(chain, parent, desc.digest, desc.media_type)

        return unpack

    async def _blob(self, ref: ImageReference, desc: Descriptor, ep: Endpoint,
                    auth: RegistryAuth) -> None:
        if await self.driver.has_blob(desc.digest, desc.size):
            return

        async def fetch() -> None:
            if await self.driver.has_blob(desc.digest, desc.size):
                return
            async with self._failpoints("fetch_blob"):
                self.fetches[desc.digest] += 1
                await self.driver.fetch_blob(ref, desc, ep, auth)

        await self._once(desc.digest, fetch)

    async def _once(self, key: str, work: Callable[[], Awaitable[None]]) -> None:
        """Run `work` unless a run for `key` is under way: then wait for it, and take over if
        it was cancelled (its error, if it failed, is this caller's too)."""
        while (flight := self._flights.get(key)) is not None:
            await flight.done.wait()
            if flight.error is None:
                return
            if not isinstance(flight.error, anyio.get_cancelled_exc_class()):
                raise flight.error
        flight = self._flights[key] = _Flight()
        try:
            await work()
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            del self._flights[key]
            flight.done.set()

    @contextlib.asynccontextmanager
    async def _busy(self, blobs: Iterable[str], layers: Iterable[str]) -> AsyncIterator[None]:
        """Keep `blobs` and `layers` from garbage collection while a pull uses them; on the
        way out (failed or done), collect any of them that no record needs."""
        blobs, layers = list(blobs), list(layers)
        self._busy_blobs.update(blobs)
        self._busy_layers.update(layers)
        try:
            yield
        finally:
            self._busy_blobs.subtract(blobs)
            self._busy_layers.subtract(layers)
            self._busy_blobs += Counter()  # drop the zeros
            self._busy_layers += Counter()
            with anyio.CancelScope(shield=True):
                async with self._lock:
                    left_blobs = {b for b in blobs if not self._busy_blobs[b]}
                    left_layers = {c for c in layers if not self._busy_layers[c]}
                    keep_b: set[str] = set()
                    keep_l: set[str] = set()
                    for img in self._images.values():
                        keep_b.update(img.blobs)
                        keep_l.update(img.chain_ids)
                    left_blobs -= keep_b
                    left_layers -= keep_l
                    if left_blobs or left_layers:
                        await self.driver.remove_content(left_blobs, left_layers)
