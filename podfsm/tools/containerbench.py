"""`podfsm bench --containers`: pod + one container (busybox `sleep`) created, started,
stopped and removed through the library, at each concurrency, beside the drivers-only
baseline of the pods alone (bench's raw level, whose pods have a user namespace): p50 times,
cycles/s and podfsm's own CPU per cycle (the controller, its workers and the reaper; conmon and
the runtimes apart). The container level runs twice: in pods without a user namespace (a
plain overlay rootfs) and in pods with one (an overlay over idmapped layers, joining the pod's
user namespace), so the difference of their create+start times is what the idmapped rootfs
costs a container start."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

from podfsm import Controller
from podfsm.config import ControllerConfig
from podfsm.core.errors import PodfsmError
from podfsm.tools.bench import (
    Level,
    _measure,
    bench_world,
    pct,
    raw_level,
)
from podfsm.tools.localimage import import_busybox


def pod(i: int, tag: str, userns: str = "NODE") -> dict[str, Any]:
    """A pod with (`userns` POD) or without (NODE) a user namespace of its own."""
    return {
        "metadata": {"name": f"bench-{tag}-{i}", "namespace": "podfsm-bench", "uid": f"{tag}{i}"},
        "linux": {"security_context": {"namespace_options": {
            "network": "POD", "userns_options": {"mode": userns}}}},
    }


async def container_level(ctl: Controller, cfg: ControllerConfig, image: str, count: int,
                          concurrency: int, userns: str = "NODE") -> tuple[Level, list[float]]:
    level = Level("pod+ctr" if userns == "NODE" else "pod+ctr userns", concurrency, count)
    starts: list[float] = []  # pod Ready to container Running
    tag = f"k{concurrency}{userns[0].lower()}x"

    async def one(i: int) -> None:
        t0 = time.perf_counter()
        st = await ctl.run_sandbox(pod(i, tag, userns))
        t_pod = time.perf_counter()
        cid = await ctl.create_container(st.id, {
            "metadata": {"name": "sleeper"}, "image": {"image": image},
            "command": ["sleep", "3600"]})
        await ctl.start_container(cid)
        t1 = time.perf_counter()
        starts.append((t1 - t_pod) * 1000)
        await ctl.stop_container(cid, 0)
        await ctl.remove_container(cid)
        await ctl.stop_sandbox(st.id)
        await ctl.remove_sandbox(st.id)
        level.add(t0, t1, time.perf_counter())

    return await _measure(level, cfg, one), starts


async def bench_runtime(runtime: str, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"runtime": runtime, "levels": []}
    with bench_world(runtime, run_on_tmpfs=not args.run_on_disk) as cfg:
        image = await import_busybox(cfg)
        for c in args.concurrency:
            raw = await raw_level(cfg, args.count, c)
            async with Controller(cfg) as ctl:
                level, starts = await container_level(ctl, cfg, image, args.count, c)
                ulevel, ustarts = await container_level(ctl, cfg, image, args.count, c,
                                                        "POD")
            out["levels"].append({
                "raw_pod": raw.summary(), "pod_and_container": level.summary(),
                "container_create_start_ms_p50": pct(starts, 50),
                "userns_pod_and_container": ulevel.summary(),
                "userns_container_create_start_ms_p50": pct(ustarts, 50)})
    return out


def report(results: list[dict[str, Any]]) -> str:
    lines = ["runtime  c   raw pod run p50  pod+ctr run p50  ctr create+start p50  "
             "raw cycles/s  pod+ctr cycles/s  podfsm CPU ms/cycle (ctl, reaper)"
             "  userns ctr create+start p50"]
    for r in results:
        for lv in r["levels"]:
            raw, mine = lv["raw_pod"], lv["pod_and_container"]
            ctr = lv["container_create_start_ms_p50"]
            uctr = lv.get("userns_container_create_start_ms_p50", 0.0)
            by = mine["cpu_ms_per_cycle_by_process"]
            lines.append(
                f"{r['runtime']:<7}{mine['concurrency']:>3}  {raw['run_ms']['p50']:>12.1f} ms"
                f"  {mine['run_ms']['p50']:>12.1f} ms  {ctr:>17.1f} ms"
                f"  {raw['cycles_per_s']:>12.1f}  {mine['cycles_per_s']:>16.1f}"
                f"  {mine['cpu_ms_per_cycle']:>6.1f} ({by.get('controller', 0):.1f}, "
                f"{by.get('reaper', 0):.1f})  {uctr:>12.1f} ms")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    runtimes = args.runtime if isinstance(args.runtime, list) else [args.runtime]
    if os.geteuid() != 0:
        print("podfsm bench: must run as root", file=sys.stderr)
        return 2
    try:
        results = [asyncio.run(bench_runtime(rt, args)) for rt in runtimes]
    except PodfsmError as exc:
        print(f"podfsm bench --containers: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"results": results}, indent=2) if args.json else report(results))
    return 0
