"""`podfsm bench`: podfsm against the raw system steps, on its own directories and CNI network.

For each runtime and concurrency level it runs N sandboxes through run, stop and remove with an
embedded Controller, and the same system steps driven directly with no controller (the raw
baseline: namespaces made by the same worker pool, the CNI plugins, runtime create and start,
kill, runtime delete, CNI DEL, unpin — no records, no state machine, no events). It prints
per-operation p50/p95/p99 latency, lifecycle throughput, podfsm's figures as ratios of the raw
ones, the CPU time of podfsm's own processes (controller, namespace workers, reaper; not the
runtime or CNI binaries) per lifecycle, their peak memory, and how fast an external kill -9 of a
pause process is noticed. `--ready N` also holds N sandboxes Ready to measure memory and the
time a restart takes to recover them; `--soak N` runs N lifecycles back to back and checks open
fds and memory stay flat.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio

from podfsm.config import ControllerConfig
from podfsm.controller import Controller
from podfsm.core.errors import PodfsmError
from podfsm.core.requests import NamespaceRequest, NetworkRequest, PauseRequest
from podfsm.core.spec import IDMapping
from podfsm.core.states import State
from podfsm.drivers import factory, linux
from podfsm.drivers.runtime import pause_pids
from podfsm.tools.hostcare import host_left_as_found

# isort: off
from podfsm.tools.benchprocs import (  # moved there; importable from here as before
    _TICK as _TICK, _cmdline as _cmdline, podfsm_pids as podfsm_pids,
    cpu_ticks_by_pid as cpu_ticks_by_pid, process_kind as process_kind, memory_kb as memory_kb,
    open_fds as open_fds,
)
# isort: on


BENCH_NETWORK = "podfsm-bench"
BENCH_BRIDGE = "podfsm-bench0"
BENCH_SUBNET = "10.209.248.0/22"


def pod(i: int, tag: str) -> dict[str, Any]:
    return {
        "metadata": {"name": f"bench-{tag}-{i}", "namespace": "podfsm-bench", "uid": f"{tag}{i}"},
        "linux": {"security_context": {"namespace_options": {
            "network": "POD", "userns_options": {"mode": "POD"}}}},
    }


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


@dataclass
class Level:
    """The figures of one (runtime, mode, concurrency) level. Times in ms."""

    mode: str
    concurrency: int
    count: int
    run: list[float] = field(default_factory=list)
    teardown: list[float] = field(default_factory=list)  # stop + remove
    wall: float = 0.0
    cpu_ms: float = 0.0
    #: cpu_ms split by process kind: controller, reaper, namespace workers
    cpu_ms_by: dict[str, float] = field(default_factory=dict)
    #: the part of cpu_ms_by spent in the kernel (system time)
    sys_ms_by: dict[str, float] = field(default_factory=dict)

    def add(self, t0: float, t1: float, t2: float) -> None:
        """One lifecycle: run from t0 to t1, stop + remove from t1 to t2 (perf_counter)."""
        self.run.append((t1 - t0) * 1000)
        self.teardown.append((t2 - t1) * 1000)

    def summary(self) -> dict[str, Any]:
        def stats(v: list[float]) -> dict[str, float]:
            return {"p50": pct(v, 50), "p95": pct(v, 95), "p99": pct(v, 99)}

        return {
            "mode": self.mode, "concurrency": self.concurrency, "count": self.count,
            "run_ms": stats(self.run), "stop_remove_ms": stats(self.teardown),
            "cycles_per_s": self.count / self.wall if self.wall else 0.0,
            "cpu_ms_per_cycle": self.cpu_ms / self.count if self.count else 0.0,
            "cpu_ms_per_cycle_by_process": {
                k: v / self.count for k, v in self.cpu_ms_by.items()} if self.count else {},
            "sys_ms_per_cycle_by_process": {
                k: v / self.count for k, v in self.sys_ms_by.items()} if self.count else {},
        }


def _add_cpu(level: Level, kinds: dict[int, str], c0: dict[int, tuple[int, int]],
             c1: dict[int, tuple[int, int]]) -> None:
    """Add the CPU each process used between c0 and c1 to the level, by process kind."""
    for pid, (user, system) in c1.items():
        user0, system0 = c0.get(pid, (0, 0))
        ms = (user - user0 + system - system0) * 1000 / _TICK
        kind = kinds[pid]
        level.cpu_ms += ms
        level.cpu_ms_by[kind] = level.cpu_ms_by.get(kind, 0.0) + ms
        level.sys_ms_by[kind] = (level.sys_ms_by.get(kind, 0.0)
                                 + (system - system0) * 1000 / _TICK)


# ---------------------------------------------------------------- the bench world


@contextlib.contextmanager
def _one_bench_at_a_time() -> Iterator[None]:
    """Benches share the bridge, network and subnet (and would measure each other's load):
    a second one waits for the first."""
    lock_dir = "/run/lock" if os.path.isdir("/run/lock") else "/run"
    fd = os.open(os.path.join(lock_dir, "podfsm-bench.lock"),
                 os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("  waiting for another podfsm bench to finish", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def bench_world(runtime: str, run_on_tmpfs: bool = True) -> Iterator[ControllerConfig]:
    """Own directories and CNI network; the host is put back as it was afterwards.

    The run and netns directories are on a tmpfs of the bench's own, as /run is on every
    systemd host (podfsm's defaults are /run/podfsm and /run/netns); the records stay on the
    disk of the temporary directory, as /var/lib/podfsm. `run_on_tmpfs=False` keeps them on
    that disk too (this project's VM has /run on ext4: creating and removing files there costs
    every process involved kernel time that a tmpfs does not)."""
    with _one_bench_at_a_time(), host_left_as_found(BENCH_NETWORK, BENCH_BRIDGE):
        tmp = tempfile.mkdtemp(prefix="podfsm-bench-")
        os.chmod(tmp, 0o711)
        conf = os.path.join(tmp, "net.d")
        os.makedirs(conf)
        volatile = os.path.join(tmp, "volatile")
        os.makedirs(volatile, mode=0o711)
        try:
            if run_on_tmpfs:
                linux.mount("tmpfs", volatile, "tmpfs", 0, "mode=0711,size=512m")
            yield ControllerConfig(
                state_dir=os.path.join(tmp, "state"), run_dir=os.path.join(volatile, "run"),
                netns_dir=os.path.join(volatile, "netns"),
                runtime=runtime,  # type: ignore[arg-type]
                cni_conf_dir=conf, default_network_name=BENCH_NETWORK,
                default_bridge=BENCH_BRIDGE, default_subnet=BENCH_SUBNET,
            )
        finally:
            scrub(tmp, runtime)
            shutil.rmtree(tmp, ignore_errors=True)


def scrub(tmp: str, runtime: str) -> None:
    """Remove whatever a failed or interrupted bench left under `tmp`, records or not (the raw
    baseline keeps none): pause processes, containers (and so their cgroups), pinned
    namespaces. A no-op after a clean run."""
    for pid in pause_pids(os.path.join(tmp, "volatile", "run")):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    root = os.path.join(tmp, "volatile", "run", "runtime", runtime)
    with contextlib.suppress(FileNotFoundError):
        for cid in os.listdir(root):
            argv = [runtime, "--root", root, "delete", "-f", cid]
            if runtime == "crun":
                # crun 1.8.1 refuses hybrid cgroups unless the cgroup2 mount is out of its
                # view (runc needs it in view, to remove its cgroup there)
                cmd = "umount -l /sys/fs/cgroup/unified 2>/dev/null; exec \"$@\""
                argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", cmd, "sh",
                        *argv]
            subprocess.run(argv, capture_output=True, check=False, timeout=30)
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f]
    for target in sorted((m for m in mounts if m.startswith(tmp + "/")), reverse=True):
        with contextlib.suppress(OSError):
            linux.umount2(target, linux.MNT_DETACH)


async def _measure(level: Level, cfg: ControllerConfig,
                   one: Callable[[int], Awaitable[None]]) -> Level:
    """Run the level's lifecycles; wall time and the CPU of podfsm's processes go in it."""
    pids = podfsm_pids(cfg.run_dir)
    kinds = {pid: process_kind(pid) for pid in pids}
    c0 = cpu_ticks_by_pid(pids)
    label = f"{cfg.runtime} {level.mode:<6} c={level.concurrency}"
    level.wall = await _pool(level.count, level.concurrency, one, _progress(label, level.count))
    _add_cpu(level, kinds, c0, cpu_ticks_by_pid(pids))
    return level


async def _pool(count: int, concurrency: int, one: Callable[[int], Awaitable[None]],
                progress: Callable[[int], None]) -> float:
    """Run one(i) for i in range(count), `concurrency` at a time; wall seconds."""
    it = iter(range(count))
    done = 0

    async def worker() -> None:
        nonlocal done
        for i in it:
            await one(i)
            done += 1
            progress(done)

    t0 = time.perf_counter()
    # a task group, not gather: when one fails the others are cancelled (and unwind) rather
    # than left running behind the failure
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    return time.perf_counter() - t0


def _progress(label: str, count: int) -> Callable[[int], None]:
    """Progress on stderr (stdout stays clean for --json): a live counter on a terminal, one
    line per finished level elsewhere."""
    live = sys.stderr.isatty()

    def show(done: int) -> None:
        if live:
            end = "\n" if done == count else ""
            print(f"\r  {label}: {done}/{count}", end=end, file=sys.stderr, flush=True)
        elif done == count:
            print(f"  {label}: {done}/{count} done", file=sys.stderr, flush=True)

    return show


# ---------------------------------------------------------------- raw baseline


async def raw_level(cfg: ControllerConfig, count: int, concurrency: int) -> Level:
    """The system steps driven directly through the drivers: no controller around them."""
    ns = factory.namespaces(cfg)
    net = factory.network(cfg)
    rt = factory.runtime(cfg, cfg.runtime)
    await ns.start()
    await rt.start()
    await net.start()
    level = Level("raw", concurrency, count)
    os.makedirs(cfg.netns_dir, exist_ok=True)
    try:
        async def one(i: int) -> None:
            sid = f"{os.urandom(32).hex()}"
            netns = os.path.join(cfg.netns_dir, f"raw-{sid[:16]}")
            userns = os.path.join(cfg.run_dir, "raw", sid, "userns")
            m = IDMapping(container_id=0, host_id=(1 << 21) + i * 65536, length=65536)
            t0 = time.perf_counter()
            pinned = await ns.create(NamespaceRequest(sid, netns, userns, m, m))
            nreq = NetworkRequest(sid, netns, f"raw{i}", "podfsm-bench", f"raw{i}")
            result = await net.attach(nreq)
            task = await rt.create(PauseRequest(sid, "raw", pinned.netns_path,
                                                pinned.userns_path, m, m))
            await rt.start_task(sid)
            t1 = time.perf_counter()
            await rt.kill_task(task, 0)
            await rt.delete(sid)
            await net.detach(nreq, result)
            await ns.destroy(netns, userns)
            shutil.rmtree(os.path.dirname(userns), ignore_errors=True)
            level.add(t0, t1, time.perf_counter())

        await _measure(level, cfg, one)
    finally:
        await net.close()
        await rt.close()
        await ns.close()
    return level


# ---------------------------------------------------------------- podfsm


async def podfsm_level(ctl: Controller, cfg: ControllerConfig, count: int,
                       concurrency: int) -> Level:
    level = Level("podfsm", concurrency, count)
    tag = f"c{concurrency}x"

    async def one(i: int) -> None:
        t0 = time.perf_counter()
        st = await ctl.run_sandbox(pod(i, tag))
        t1 = time.perf_counter()
        await ctl.stop_sandbox(st.id)
        await ctl.remove_sandbox(st.id)
        level.add(t0, t1, time.perf_counter())

    return await _measure(level, cfg, one)


async def cri_level(ctl: Controller, cfg: ControllerConfig, count: int,
                    concurrency: int) -> Level:
    """The same lifecycles as podfsm_level, through the CRI face: a CriServer on this
    controller, driven by a load generator in its own process (podfsm.tools.loadgen), so
    the controller's CPU here less podfsm_level's is the gRPC server's."""
    from podfsm.faces.cri import CriServer

    level = Level("cri", concurrency, count)
    sock = os.path.join(cfg.run_dir, "bench-cri.sock")
    server = CriServer(ctl, sock)
    await server.start()
    try:
        pids = podfsm_pids(cfg.run_dir)  # before the load generator: it is not ours
        kinds = {pid: process_kind(pid) for pid in pids}
        c0 = cpu_ticks_by_pid(pids)
        gen = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "podfsm.tools.loadgen", sock, str(count),
            str(concurrency), f"g{concurrency}x", stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)
        out, err = await gen.communicate()
        c1 = cpu_ticks_by_pid(pids)
    finally:
        await server.stop()
    try:
        got = json.loads(out)
    except ValueError:
        raise PodfsmError(f"the CRI load generator failed: {err.decode()[-600:]}") from None
    if got["errors"]:
        raise PodfsmError(f"the CRI load generator failed: {got['errors'][0]}")
    level.run, level.teardown, level.wall = got["run_ms"], got["stop_remove_ms"], got["wall_s"]
    _add_cpu(level, kinds, c0, c1)
    _progress(f"{cfg.runtime} {'cri':<6} c={concurrency}", count)(count)
    return level


async def exit_latency(ctl: Controller, samples: int) -> list[float]:
    """ms from an external kill -9 of the pause process to the task_exit event."""
    out: list[float] = []
    show = _progress("kill -9 noticed", samples)
    for i in range(samples):
        st = await ctl.run_sandbox(pod(i, "exit"))
        assert st.pid is not None
        seen = asyncio.Event()

        async def watch(sid: str = st.id, ev: asyncio.Event = seen) -> None:
            async for e in ctl.events():
                if e.sandbox_id == sid and e.trigger == "task_exit":
                    ev.set()
                    return

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0)  # let the watcher subscribe
        t0 = time.perf_counter()
        os.kill(st.pid, signal.SIGKILL)
        await asyncio.wait_for(seen.wait(), 5)
        out.append((time.perf_counter() - t0) * 1000)
        watcher.cancel()
        await ctl.remove_sandbox(st.id)
        show(i + 1)
    return out


async def hold_ready(cfg: ControllerConfig, n: int) -> dict[str, Any]:
    """N sandboxes Ready: memory of podfsm's processes, then restart-recovery time."""
    show = _progress(f"{cfg.runtime} {n} Ready", n)
    ids: list[str] = []
    async with Controller(cfg) as ctl:
        async def one(i: int) -> None:
            ids.append((await ctl.run_sandbox(pod(i, "ready"))).id)

        await _pool(n, 8, one, show)
        pids = podfsm_pids(cfg.run_dir)
        rss_kb = memory_kb(pids, "VmRSS")
        pss_kb = memory_kb(pids, "Pss")
        self_kb = memory_kb([os.getpid()], "VmRSS")
        # the controller and its namespace workers, without the reaper (the runtime's helper)
        workers = [p for p in pids if p != os.getpid() and cfg.run_dir not in _cmdline(p)]
        ctl_workers_kb = self_kb + memory_kb(workers, "VmRSS")
    t0 = time.perf_counter()
    async with Controller(cfg) as ctl:
        recover_s = time.perf_counter() - t0
        states = [s.state for s in await ctl.list_sandboxes()]
        ready = sum(1 for s in states if s is State.READY)
        await _pool(len(ids), 8, lambda i: ctl.remove_sandbox(ids[i]),
                    _progress("removing", len(ids)))
    return {"sandboxes": n, "rss_mb_all": rss_kb / 1024, "pss_mb_all": pss_kb / 1024,
            "rss_mb_controller": self_kb / 1024,
            "rss_mb_controller_and_workers": ctl_workers_kb / 1024,
            "processes": len(pids), "recover_s": recover_s, "ready_after_restart": ready}


async def soak(ctl: Controller, n: int) -> dict[str, Any]:
    """N lifecycles back to back: fds and RSS after the first 100 vs at the end."""
    show = _progress("soak", n)
    marks: dict[int, tuple[int, int]] = {}
    for i in range(n):
        st = await ctl.run_sandbox(pod(i, "soak"))
        await ctl.stop_sandbox(st.id)
        await ctl.remove_sandbox(st.id)
        if i + 1 in (min(100, n), n):
            pids = podfsm_pids(ctl.config.run_dir)
            marks[i + 1] = (open_fds(), memory_kb(pids, "VmRSS"))
        show(i + 1)
    first, last = marks[min(100, n)], marks[n]
    return {"lifecycles": n, "fds_at_100": first[0], "fds_at_end": last[0],
            "rss_kb_at_100": first[1], "rss_kb_at_end": last[1],
            "rss_growth_pct": 100 * (last[1] - first[1]) / max(first[1], 1),
            "left": await ctl.list_sandboxes() != []}


# ---------------------------------------------------------------- driver


async def bench_runtime(runtime: str, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"runtime": runtime, "levels": []}
    with bench_world(runtime, run_on_tmpfs=not args.run_on_disk) as cfg:
        for c in args.concurrency:
            raw = await raw_level(cfg, args.count, c)
            async with Controller(cfg) as ctl:
                mine = await podfsm_level(ctl, cfg, args.count, c)
                cri = await cri_level(ctl, cfg, args.count, c) if args.cri else None
                if c == args.concurrency[0]:
                    out["exit_ms"] = await exit_latency(ctl, args.exit_samples)
                out["peak_rss_mb"] = max(out.get("peak_rss_mb", 0.0), memory_kb(
                    podfsm_pids(cfg.run_dir), "VmHWM") / 1024)
            out["levels"].append({"raw": raw.summary(), "podfsm": mine.summary(),
                                  **({"cri": cri.summary()} if cri else {})})
        if args.ready:
            out["ready"] = await hold_ready(cfg, args.ready)
        if args.soak:
            async with Controller(cfg) as ctl:
                out["soak"] = await soak(ctl, args.soak)
    return out


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def report(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        lines.append(f"\n== {r['runtime']} ==")
        lines.append(f"{'level':<14}{'run p50/p95/p99 ms':>24}{'stop+rm p50/p95/p99 ms':>27}"
                     f"{'cycles/s':>10}{'cpu ms/cyc':>12}")
        seq_raw_rate = None
        for lv in r["levels"]:
            modes = [m for m in ("raw", "podfsm", "cri") if m in lv]
            for mode in modes:
                s = lv[mode]
                run, td = s["run_ms"], s["stop_remove_ms"]
                lines.append(
                    f"{mode + ' c=' + str(s['concurrency']):<14}"
                    f"{run['p50']:>10.1f}{run['p95']:>7.1f}{run['p99']:>7.1f}"
                    f"{td['p50']:>13.1f}{td['p95']:>7.1f}{td['p99']:>7.1f}"
                    f"{s['cycles_per_s']:>10.1f}{s['cpu_ms_per_cycle']:>12.2f}")
            raw, mine = lv["raw"], lv["podfsm"]
            by = [f"{mode} " + ", ".join(
                f"{k} {v:.1f} ({lv[mode].get('sys_ms_per_cycle_by_process', {}).get(k, 0):.1f})"
                for k, v in sorted(lv[mode].get("cpu_ms_per_cycle_by_process", {}).items()))
                for mode in modes]
            lines.append(f"{'  cpu by proc':<14}  {'; '.join(by)} "
                         "(ms/cycle; in parentheses the kernel's part)")
            if seq_raw_rate is None:
                seq_raw_rate = raw["cycles_per_s"]
            lines.append(
                f"{'  ratio':<14}{_ratio(mine['run_ms']['p50'], raw['run_ms']['p50']):>10}"
                f"{'':>14}{_ratio(mine['stop_remove_ms']['p50'], raw['stop_remove_ms']['p50']):>13}"
                f"{'':>14}{_ratio(mine['cycles_per_s'], raw['cycles_per_s']):>10}"
                f"   (vs raw sequential: "
                f"{_ratio(mine['cycles_per_s'], seq_raw_rate)})")
            if "cri" in lv:
                cri = lv["cri"]
                grpc_ms = (cri["cpu_ms_per_cycle_by_process"].get("controller", 0.0)
                           - mine["cpu_ms_per_cycle_by_process"].get("controller", 0.0))
                lines.append(
                    f"{'  cri/podfsm':<14}{_ratio(cri['run_ms']['p50'], mine['run_ms']['p50']):>10}"
                    f"{'':>14}"
                    f"{_ratio(cri['stop_remove_ms']['p50'], mine['stop_remove_ms']['p50']):>13}"
                    f"{'':>14}{_ratio(cri['cycles_per_s'], mine['cycles_per_s']):>10}"
                    f"   (gRPC server CPU: {grpc_ms:+.2f} ms/cycle)")
        ex = r.get("exit_ms") or []
        if ex:
            lines.append(f"kill -9 noticed: p50 {pct(ex, 50):.2f} ms, p99 {pct(ex, 99):.2f} ms "
                         f"({len(ex)} samples)")
        lines.append(f"peak RSS of podfsm's processes: {r.get('peak_rss_mb', 0):.1f} MB")
        if "ready" in r:
            rd = r["ready"]
            lines.append(f"{rd['sandboxes']} Ready: {rd['rss_mb_all']:.1f} MB resident "
                         f"(PSS {rd['pss_mb_all']:.1f} MB) in "
                         f"{rd['processes']} podfsm processes "
                         f"(controller {rd['rss_mb_controller']:.1f} MB, with its namespace "
                         f"workers {rd['rss_mb_controller_and_workers']:.1f} MB); restart "
                         f"recovered "
                         f"{rd['ready_after_restart']} Ready in {rd['recover_s']:.2f} s")
        if "soak" in r:
            sk = r["soak"]
            lines.append(f"soak {sk['lifecycles']}: fds {sk['fds_at_100']} -> {sk['fds_at_end']}, "
                         f"RSS {sk['rss_kb_at_100']} -> {sk['rss_kb_at_end']} kB "
                         f"({sk['rss_growth_pct']:+.1f}%)")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """The lifecycle bench (`podfsm bench` without a kind), its arguments as
    podfsm.tools.benchmain.prepare leaves them."""
    runtimes: list[str] = args.runtime
    try:
        results = [asyncio.run(bench_runtime(rt, args)) for rt in runtimes]
    except PodfsmError as exc:
        print(f"podfsm bench: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"results": results}, indent=2))
    else:
        print(report(results))
    return 0


def chaos_main(runtimes: list[str], rounds: int, *, as_json: bool = False,
               containers: bool = False) -> int:
    """`podfsm bench --chaos N`: the chaos run of podfsm.tools.chaos on each runtime, in the
    bench's own world; 1 when an invariant was broken or something was left."""
    from podfsm.tools.chaos import run_chaos

    def progress(rep: Any) -> None:
        print(f"  chaos {rep.runtime}: round {rep.rounds}/{rounds}, "
              f"{rep.total_operations} operations, {len(rep.violations)} violations",
              file=sys.stderr, flush=True)

    reports = []
    for rt in runtimes:
        with bench_world(rt) as cfg:
            reports.append(asyncio.run(run_chaos(cfg, rounds, seed=time.time_ns(),
                                                 containers=containers, progress=progress)))
    if as_json:
        print(json.dumps({"chaos": [{**vars(r), "total_operations": r.total_operations}
                                    for r in reports]}, indent=2))
    else:
        for r in reports:
            print(r.summary())
            for v in r.violations:
                print(f"  violation: {v}")
    return 1 if any(r.violations or r.leftovers for r in reports) else 0


def _split(value: Any, kind: type[Any]) -> list[Any]:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        for part in str(item).split(","):
            if part.strip():
                out.append(kind(part.strip()))
    return out

