"""`podfsm bench --unpack`: the layer extractor's throughput next to GNU tar's on the same
layers (as root).

Two layers are built in a temporary directory: busybox (the host's /bin/busybox, Debian's
busybox-static, with a hard link per applet, as a busybox image lays it out) and a synthetic
one of many small files and a few big ones, each gzip-compressed as a registry serves them. Each
is unpacked `rounds` times by LayerStore.ensure (decompression, diff id, extraction, usage walk,
syncfs, rename) and by `tar -xzf` (GNU tar, gzip in a process of its own, no sync) and `tar
-xzf` followed by `sync -f` (flushed as the store flushes). Throughput is uncompressed tar bytes
per second, the median of the rounds; CPU seconds (user + system, of this process and of tar
and its gzip) are printed too, as the wall time of a loaded machine says little.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from podfsm.drivers.layers import LayerStore

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
BUSYBOX = "/bin/busybox"


@dataclass
class Result:
    layer: str
    tar_mb: float
    blob_mb: float
    entries: int
    podfsm_s: float
    tar_s: float
    tar_sync_s: float
    podfsm_cpu_s: float
    tar_cpu_s: float

    @property
    def podfsm_mbps(self) -> float:
        return self.tar_mb / self.podfsm_s

    @property
    def tar_mbps(self) -> float:
        return self.tar_mb / self.tar_s

    @property
    def tar_sync_mbps(self) -> float:
        return self.tar_mb / self.tar_sync_s


def _info(name: str, kind: bytes, mode: int, size: int = 0) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.size, ti.mtime = kind, mode, size, 1_600_000_000
    return ti


def busybox_tar() -> bytes:
    """busybox in bin/ with a hard link per applet."""
    applets = subprocess.run([BUSYBOX, "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()
    with open(BUSYBOX, "rb") as f:
        binary = f.read()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "tmp", "root"):
            tf.addfile(_info(d, tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755))
        tf.addfile(_info("bin/busybox", tarfile.REGTYPE, 0o755, len(binary)),
                   io.BytesIO(binary))
        for applet in applets:
            if applet == "bin/busybox":
                continue
            link = _info(applet, tarfile.LNKTYPE, 0o755)
            link.linkname = "bin/busybox"
            tf.addfile(link)
    return buf.getvalue()


def synthetic_tar(small: int = 12000, big: int = 4, big_mb: int = 8, seed: int = 1) -> bytes:
    """`small` files of 0.5-8 KiB in directories of 100 and `big` files of `big_mb` MiB; the
    data half random, half text, so it compresses about as a layer of binaries does."""
    rnd = random.Random(seed)
    words = [rnd.randbytes(rnd.randint(3, 9)).hex().encode() for _ in range(2000)]
    buf = io.BytesIO()

    def data(size: int) -> bytes:
        half = size // 2
        text = b" ".join(rnd.choices(words, k=half // 8 + 1))[:size - half]
        return rnd.randbytes(half) + text

    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for i in range(small):
            if i % 100 == 0:
                tf.addfile(_info(f"usr/share/d{i // 100}", tarfile.DIRTYPE, 0o755))
            body = data(rnd.randint(512, 8192))
            tf.addfile(_info(f"usr/share/d{i // 100}/f{i}", tarfile.REGTYPE, 0o644, len(body)),
                       io.BytesIO(body))
        for i in range(big):
            body = data(big_mb << 20)
            tf.addfile(_info(f"opt/big{i}", tarfile.REGTYPE, 0o755, len(body)), io.BytesIO(body))
    return buf.getvalue()


def _cpu() -> float:
    me, kids = os.times(), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.user + me.system + kids.ru_utime + kids.ru_stime


def _timed(action: Callable[[], object]) -> tuple[float, float]:
    """Wall and CPU seconds of `action` (this process's threads and reaped children)."""
    start, cpu = time.perf_counter(), _cpu()
    action()
    return time.perf_counter() - start, _cpu() - cpu


def measure(name: str, raw: bytes, work: str, rounds: int) -> Result:
    blob = os.path.join(work, f"{name}.tar.gz")
    with open(blob, "wb") as f:
        f.write(gzip.compress(raw, compresslevel=6, mtime=0))
    diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    ours: list[tuple[float, float]] = []
    tar: list[tuple[float, float]] = []
    tar_sync: list[tuple[float, float]] = []
    entries = 0
    for n in range(rounds):
        root = os.path.join(work, f"store-{name}-{n}")
        store = LayerStore(root)
        ours.append(_timed(lambda: store.ensure(diff_id, None, blob, GZIP)))  # noqa: B023
        info = store.info(diff_id)
        entries = info.entries if info else 0
        shutil.rmtree(root)
        for sync, times in ((False, tar), (True, tar_sync)):
            dest = os.path.join(work, f"tar-{name}-{n}")
            os.mkdir(dest)
            cmd = ["tar", "-xzf", blob, "-C", dest]

            def run(cmd: list[str] = cmd, dest: str = dest, sync: bool = sync) -> None:
                subprocess.run(cmd, check=True)
                if sync:
                    subprocess.run(["sync", "-f", dest], check=True)

            times.append(_timed(run))
            shutil.rmtree(dest)
    return Result(layer=name, tar_mb=len(raw) / 1e6, blob_mb=os.path.getsize(blob) / 1e6,
                  entries=entries, podfsm_s=statistics.median(w for w, _ in ours),
                  tar_s=statistics.median(w for w, _ in tar),
                  tar_sync_s=statistics.median(w for w, _ in tar_sync),
                  podfsm_cpu_s=statistics.median(c for _, c in ours),
                  tar_cpu_s=statistics.median(c for _, c in tar))


def run(rounds: int = 5, directory: str | None = None) -> list[Result]:
    with tempfile.TemporaryDirectory(prefix="podfsm-unpackbench-", dir=directory) as work:
        layers = [("busybox", busybox_tar()), ("synthetic", synthetic_tar())]
        return [measure(name, raw, work, rounds) for name, raw in layers]


def main(args: argparse.Namespace) -> int:
    results = run(directory=getattr(args, "unpack_dir", None))
    if getattr(args, "json", False):
        print(json.dumps([{**asdict(r), "podfsm_mbps": r.podfsm_mbps, "tar_mbps": r.tar_mbps,
                           "tar_sync_mbps": r.tar_sync_mbps} for r in results], indent=2))
        return 0
    print(f"{'layer':<10} {'tar MB':>7} {'gz MB':>6} {'entries':>7} {'podfsm MB/s':>12} "
          f"{'tar -x MB/s':>12} {'tar+sync MB/s':>14} {'time ratio':>11} "
          f"{'podfsm CPU s':>13} {'tar CPU s':>10}")
    for r in results:
        print(f"{r.layer:<10} {r.tar_mb:>7.1f} {r.blob_mb:>6.1f} {r.entries:>7} "
              f"{r.podfsm_mbps:>12.0f} {r.tar_mbps:>12.0f} {r.tar_sync_mbps:>14.0f} "
              f"{r.podfsm_s / r.tar_s:>10.2f}x {r.podfsm_cpu_s:>13.3f} {r.tar_cpu_s:>10.3f}")
    return 0
