"""`podfsm bench --pull`: pulling a 3-layer image from a registry on 127.0.0.1, cold and warm,
and the unpacking of its layers next to GNU tar's (as root).

A docker-registry (Debian's, distribution 2.8) is started in a temporary directory on a free
loopback port (podfsm.tools.imagekit) and given one image of three gzip layers: busybox (the
host's busybox-static, a hard link per applet), many small generated files, and a few big
generated ones. Then, each `runs` times:

- cold pull: a new, empty image store; the whole pull through the controller's ImageManager and
  the real image driver (resolve, manifest, config, three downloads verified against their
  digests, three layers unpacked and flushed, the record written);
- warm re-pull: the same reference pulled again into a store that has it (resolve, manifest,
  nothing downloaded or unpacked).

The p50 (and min, max) of each is printed, then each layer's unpacking by the layer store next
to `tar -xzf` of the same blob (podfsm.tools.unpackbench.measure), and their sum: the extractor
is meant to stay within 2x of GNU tar.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import os
import shutil
import signal
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import Any

from podfsm.controller.images import ImageManager
from podfsm.drivers.images import LocalImages
from podfsm.tools import imagekit as ik
from podfsm.tools.unpackbench import Result, busybox_tar, measure, synthetic_tar

REPO = "bench/pull"
TAG = "v1"


@dataclass(frozen=True)
class Sizes:
    small: int = 12000  # small files (0.5-8 KiB) in the second layer
    big: int = 4  # big files in the third layer
    big_mb: int = 8  # MiB each


@dataclass
class Timings:
    runs: list[float]  # wall seconds
    cpu: list[float]  # CPU seconds of this process (the registry's are not counted)

    @property
    def p50(self) -> float:
        return statistics.median(self.runs)

    @property
    def cpu_p50(self) -> float:
        return statistics.median(self.cpu)

    def as_dict(self) -> dict[str, float]:
        return {"p50_s": self.p50, "min_s": min(self.runs), "max_s": max(self.runs),
                "cpu_p50_s": self.cpu_p50}


def _cpu() -> float:
    return time.process_time()  # every thread's; finer than os.times()'s clock ticks


@dataclass
class PullResult:
    image_mb: float  # the image's compressed size (what a cold pull downloads)
    tar_mb: float  # its layers uncompressed
    cold: Timings
    warm: Timings
    layers: list[Result]

    @property
    def podfsm_s(self) -> float:
        return sum(r.podfsm_s for r in self.layers)

    @property
    def tar_s(self) -> float:
        return sum(r.tar_s for r in self.layers)

    @property
    def ratio(self) -> float:
        """Wall time of the layer store's unpacking over GNU tar's, all layers."""
        return self.podfsm_s / self.tar_s

    def as_dict(self) -> dict[str, Any]:
        return {
            "image_mb": self.image_mb, "tar_mb": self.tar_mb,
            "cold_pull": self.cold.as_dict(), "warm_pull": self.warm.as_dict(),
            "cold_pull_mbps": self.image_mb / self.cold.p50,
            "layers": [{**asdict(r), "podfsm_mbps": r.podfsm_mbps, "tar_mbps": r.tar_mbps,
                        "tar_sync_mbps": r.tar_sync_mbps} for r in self.layers],
            "unpack": {"podfsm_mbps": self.tar_mb / self.podfsm_s,
                       "tar_mbps": self.tar_mb / self.tar_s, "ratio": self.ratio},
        }


def layer_tars(sizes: Sizes) -> list[tuple[str, bytes]]:
    return [("busybox", busybox_tar()),
            ("small", synthetic_tar(small=sizes.small, big=0, seed=2)),
            ("big", synthetic_tar(small=0, big=sizes.big, big_mb=sizes.big_mb, seed=3))]


def build(tars: list[tuple[str, bytes]]) -> ik.Image:
    layers = [ik.Layer(tar=raw, blob=gzip.compress(raw, compresslevel=6, mtime=0))
              for _, raw in tars]
    return ik.build_image(layers, oci=True, label="bench")


@contextlib.asynccontextmanager
async def _manager(image_dir: str, certs: str) -> AsyncIterator[ImageManager]:
    mgr = ImageManager(LocalImages(image_dir, certs),
                       lambda name: contextlib.nullcontext())
    await mgr.open()
    try:
        yield mgr
    finally:
        await mgr.close()


def _downloads(mgr: ImageManager) -> int:
    """Blob downloads so far (a warm pull only asks the layer store, which finds each layer
    in place)."""
    return sum(n for key, n in mgr.fetches.items() if not key.startswith("layer:"))


async def _pulls(reference: str, work: str, runs: int) -> tuple[Timings, Timings]:
    certs = os.path.join(work, "certs.d")  # none: a loopback registry is plain HTTP
    cold = Timings([], [])
    for n in range(runs):
        store = os.path.join(work, f"cold-{n}")
        async with _manager(store, certs) as mgr:
            start, cpu = time.perf_counter(), _cpu()
            await mgr.pull(reference)
            cold.runs.append(time.perf_counter() - start)
            cold.cpu.append(_cpu() - cpu)
        shutil.rmtree(store)
    warm = Timings([], [])
    store = os.path.join(work, "warm")
    async with _manager(store, certs) as mgr:
        first = await mgr.pull(reference)
        done = _downloads(mgr)
        for _ in range(runs):
            start, cpu = time.perf_counter(), _cpu()
            again = await mgr.pull(reference)
            warm.runs.append(time.perf_counter() - start)
            warm.cpu.append(_cpu() - cpu)
            if again.id != first.id or _downloads(mgr) != done:
                raise RuntimeError("a warm re-pull downloaded again: "
                                   f"{dict(mgr.fetches)}")
    shutil.rmtree(store)
    return cold, warm


def run(runs: int = 5, sizes: Sizes | None = None, directory: str | None = None) -> PullResult:
    tars = layer_tars(sizes or Sizes())
    img = build(tars)
    with tempfile.TemporaryDirectory(prefix="podfsm-pullbench-", dir=directory) as work, \
            ik.run_registry() as reg:
        reg.push_image(REPO, img, TAG)
        cold, warm = asyncio.run(_pulls(f"{reg.host}/{REPO}:{TAG}", work, runs))
        layers = [measure(name, raw, work, runs) for name, raw in tars]
    return PullResult(image_mb=sum(len(la.blob) for la in img.layers) / 1e6,
                      tar_mb=sum(len(raw) for _, raw in tars) / 1e6,
                      cold=cold, warm=warm, layers=layers)


def report(r: PullResult, runs: int) -> str:
    lines = [f"image: 3 layers, {r.image_mb:.1f} MB gzip, {r.tar_mb:.1f} MB tar; {runs} runs",
             f"cold pull   p50 {r.cold.p50:7.3f} s (min {min(r.cold.runs):.3f}, max "
             f"{max(r.cold.runs):.3f})  {r.image_mb / r.cold.p50:.1f} MB/s of gzip, "
             f"CPU {r.cold.cpu_p50:.3f} s",
             f"warm pull   p50 {r.warm.p50:7.3f} s (min {min(r.warm.runs):.3f}, max "
             f"{max(r.warm.runs):.3f})  CPU {r.warm.cpu_p50:.3f} s",
             "",
             f"{'layer':<8} {'tar MB':>7} {'gz MB':>6} {'entries':>7} {'podfsm MB/s':>12} "
             f"{'tar -x MB/s':>12} {'tar+sync MB/s':>14} {'time ratio':>11}"]
    for la in r.layers:
        lines.append(f"{la.layer:<8} {la.tar_mb:>7.1f} {la.blob_mb:>6.1f} {la.entries:>7} "
                     f"{la.podfsm_mbps:>12.0f} {la.tar_mbps:>12.0f} {la.tar_sync_mbps:>14.0f} "
                     f"{la.podfsm_s / la.tar_s:>10.2f}x")
    verdict = "within" if r.ratio <= 2 else "NOT within"
    lines.append(f"{'all':<8} {r.tar_mb:>7.1f} {r.image_mb:>6.1f} {'':>7} "
                 f"{r.tar_mb / r.podfsm_s:>12.0f} {r.tar_mb / r.tar_s:>12.0f} {'':>14} "
                 f"{r.ratio:>10.2f}x  ({verdict} 2x of GNU tar)")
    return "\n".join(lines)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so that the registry is stopped and the work removed


def main(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    runs = getattr(args, "pull_runs", 5)
    sizes = Sizes(small=getattr(args, "pull_small", Sizes.small),
                  big=getattr(args, "pull_big", Sizes.big),
                  big_mb=getattr(args, "pull_big_mb", Sizes.big_mb))
    result = run(runs, sizes, getattr(args, "unpack_dir", None))
    if getattr(args, "json", False):
        print(json.dumps({"runs": runs, **result.as_dict()}, indent=2))
    else:
        print(report(result, runs))
    return 0
