"""The image verbs of the command line, in crictl's output shapes:

    podfsm pull IMAGE [--creds USER:PASS | --auth B64]   "Image is up to date for sha256:..."
    podfsm images [IMAGE] [-q] [--digests] [-o table|json]
    podfsm inspecti IMAGE...                             {"status": {...}, "info": {...}}
    podfsm rmi IMAGE...                                  "Deleted: <name>" per name

IMAGE is any name of an image (`busybox`, `name:tag`, `name@sha256:...`), its id or a unique
prefix of it; the daemon resolves it as the CRI's ImageStatus does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from podfsm.core.images import ImageRecord
from podfsm.faces.client import ApiError, Client

EXIT_OK, EXIT_FAILED = 0, 1
ClientVerb = Callable[[Client, argparse.Namespace], Awaitable[int]]


def add_verbs(sub: Any, client: argparse.ArgumentParser,
              wrap: Callable[[ClientVerb], Callable[[argparse.Namespace], int]]) -> None:
    """Add pull, images, inspecti and rmi to the subparsers `sub`."""
    p = sub.add_parser("pull", parents=[client], help="pull an image (crictl pull)")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--creds", metavar="USER[:PASSWORD]", help="registry credentials")
    p.add_argument("--auth", metavar="AUTH", help="base64 of USER:PASSWORD")
    p.set_defaults(run=wrap(_pull))

    p = sub.add_parser("images", parents=[client], help="list images (crictl images)")
    p.add_argument("image", metavar="IMAGE", nargs="?", help="only the image this names")
    p.add_argument("-q", "--quiet", action="store_true", help="only the ids")
    p.add_argument("--digests", action="store_true", help="show digests")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(run=wrap(_images))

    p = sub.add_parser("inspecti", parents=[client], help="images' records (crictl inspecti)")
    p.add_argument("images", metavar="IMAGE", nargs="+")
    p.set_defaults(run=wrap(_inspecti))

    p = sub.add_parser("rmi", parents=[client], help="remove images (crictl rmi)")
    p.add_argument("images", metavar="IMAGE", nargs="+")
    p.set_defaults(run=wrap(_rmi))


@contextlib.asynccontextmanager
async def _progress(what: str) -> AsyncIterator[None]:
    """On a terminal, a line saying how long the pull has taken so far (cleared after)."""
    if not sys.stderr.isatty():
        yield
        return
    started = time.monotonic()

    async def tick() -> None:
        while True:
            print(f"\rPulling {what} ... {time.monotonic() - started:.0f} s", end="",
                  file=sys.stderr, flush=True)
            await asyncio.sleep(0.5)

    task = asyncio.create_task(tick())
    try:
        yield
    finally:
        task.cancel()
        print("\r\033[K", end="", file=sys.stderr, flush=True)


async def _pull(c: Client, args: argparse.Namespace) -> int:
    auth: dict[str, str] = {}
    if args.creds:
        user, _, password = args.creds.partition(":")
        auth = {"username": user, "password": password}
    elif args.auth:
        auth = {"auth": args.auth}
    async with _progress(args.image):
        img = await c.pull_image(args.image, auth or None)
    print(f"Image is up to date for {img.id}")
    return EXIT_OK


async def _find(c: Client, ref: str) -> ImageRecord | None:
    found = await c.list_images(ref)
    return found[0] if found else None


def human_size(n: int) -> str:
    """Sizes as crictl prints them (go-units' HumanSizeWithPrecision, 3 digits, SI)."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if size < 1000 or unit == "PB":
            return f"{size:.3g}{unit}"
        size /= 1000
    raise AssertionError("unreachable")


def _cri_json(img: ImageRecord) -> dict[str, Any]:
    """An image as crictl's JSON shows the CRI's Image (protobuf JSON names)."""
    return {"id": img.id, "repoTags": list(img.repo_tags),
            "repoDigests": list(img.repo_digests), "size": str(img.size),
            "uid": None if img.uid is None else {"value": str(img.uid)},
            "username": img.username, "spec": {"image": img.id, "annotations": {}},
            "pinned": img.pinned}


def _rows(img: ImageRecord) -> list[tuple[str, str, str]]:
    """(repository, tag, digest) per name, as crictl images lists them."""
    digests = {d.split("@")[0]: d.split("@")[1] for d in img.repo_digests}
    rows = []
    for tag in img.repo_tags:
        repo, _, t = tag.rpartition(":")
        rows.append((repo, t, digests.get(repo, "")))
    if not rows:
        rows = [(repo, "<none>", d) for repo, d in digests.items()] or [("<none>", "<none>", "")]
    return rows


async def _images(c: Client, args: argparse.Namespace) -> int:
    imgs = await c.list_images(args.image)
    if args.quiet:
        for img in imgs:
            print(img.id)
        return EXIT_OK
    if args.output == "json":
        print(json.dumps({"images": [_cri_json(i) for i in imgs]}, indent=2))
        return EXIT_OK
    header = ["IMAGE", "TAG", *(["DIGEST"] if args.digests else []), "IMAGE ID", "SIZE"]
    table = []
    for img in imgs:
        for repo, tag, digest in _rows(img):
            row = [repo, tag, *([digest[7:20] if digest else "<none>"] if args.digests else []),
                   img.id[7:20], human_size(img.size)]
            table.append(row)
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    for row in [header, *table]:
        print("   ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK


async def _inspecti(c: Client, args: argparse.Namespace) -> int:
    code = EXIT_OK
    for ref in args.images:
        img = await _find(c, ref)
        if img is None:
            print(f"podfsm: no such image {ref!r}", file=sys.stderr)
            code = EXIT_FAILED
            continue
        info = img.model_dump(mode="json", include={"platform", "manifest_digest",
                                                   "manifest_media_type", "layers",
                                                   "pulled_at"})
        print(json.dumps({"status": _cri_json(img), "info": info}, indent=2))
    return code


async def _rmi(c: Client, args: argparse.Namespace) -> int:
    code = EXIT_OK
    for ref in args.images:
        try:
            img = await _find(c, ref)
            if img is None:
                print(f"podfsm: no such image {ref!r}", file=sys.stderr)
                code = EXIT_FAILED
                continue
            await c.remove_image(img.id)
        except ApiError as exc:
            print(f"podfsm: {ref}: {exc.message}", file=sys.stderr)
            code = EXIT_FAILED
            continue
        for name in img.repo_tags or img.repo_digests or (img.id,):
            print(f"Deleted: {name}")
    return code
