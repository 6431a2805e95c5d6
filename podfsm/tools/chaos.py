"""`podfsm bench --chaos N`: a randomized run on the real drivers, with kills.

Each of N rounds starts a controller in a child process (its own session, as a node daemon
runs) with random failpoints (`error`, `delay(ms)`, `crash`); several tasks in it run, stop,
remove and inspect sandboxes of a few names at random. At a random moment a pause process may
be SIGKILLed (six rounds in ten), then the controller is SIGKILLed (unless a `crash`
failpoint killed it first). A controller in this process then recovers and the invariants are
checked: every sandbox Ready or NotReady, its history a path through the transitions table, a
Ready one's pause process alive in its pinned namespaces, names unique, id ranges disjoint, no
recovery problem. At the end every sandbox is removed and nothing may be left under the run's
directories, in the runtime's root or in the IPAM store. The figures (operations, kills, time)
are reported.

The integration suite runs a short version on runc and crun (tests/integration/test_chaos.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel

from podfsm.config import ControllerConfig
from podfsm.controller import Controller
from podfsm.core import failpoints as fp
from podfsm.core.errors import PodfsmError
from podfsm.core.idmap import find_overlap
from podfsm.core.records import SandboxStatus
from podfsm.core.states import TRANSITIONS, State
from podfsm.drivers import linux
from podfsm.drivers.runtime import container_cgroup_dirs, pause_pids
from podfsm.tools import chaoscontainers as chaosctr

CNI_STORE = "/var/lib/cni/networks"
_EDGES = {(t.source.value, t.trigger.value, t.dest.value) for t in TRANSITIONS}
#: operations a child's tasks choose from, with their weights
_OPS = {"run": 4, "stop": 2, "remove": 2, "status": 1, "list": 1}


@dataclass
class ChaosReport:
    """What a chaos run did and found."""

    runtime: str
    rounds: int = 0
    operations: dict[str, int] = field(default_factory=dict)  # "run ok" -> count
    controller_kills: int = 0  # SIGKILLs sent by the run
    failpoint_crashes: int = 0  # controllers that died at a `crash` failpoint first
    pause_kills: int = 0
    recoveries: int = 0
    max_recovery_s: float = 0.0
    seconds: float = 0.0
    violations: list[str] = field(default_factory=list)
    leftovers: dict[str, list[str]] = field(default_factory=dict)

    @property
    def total_operations(self) -> int:
        return sum(self.operations.values())

    def summary(self) -> str:
        ops = ", ".join(f"{k} {v}" for k, v in sorted(self.operations.items()))
        return (f"chaos {self.runtime}: {self.rounds} rounds in {self.seconds:.1f} s, "
                f"{self.total_operations} operations ({ops}); {self.controller_kills} "
                f"controller SIGKILLs + {self.failpoint_crashes} crash failpoints, "
                f"{self.pause_kills} pause SIGKILLs; {self.recoveries} recoveries "
                f"(slowest {self.max_recovery_s:.2f} s); {len(self.violations)} invariant "
                f"violations; leftovers: {self.leftovers or 'none'}")


def random_failpoints(rnd: random.Random, containers: bool = False) -> str:
    """A PODFSM_FAILPOINTS value: none a third of the time, else one or two random points
    (the containers' too, with `containers`)."""
    if rnd.random() < 1 / 3:
        return ""
    entries = []
    names = fp.SANDBOX_NAMES + (chaosctr.NAMES if containers else ())
    for name in rnd.sample(names, rnd.choice((1, 2))):
        action = rnd.choices(
            (f"{rnd.randint(1, 3)}*error", f"delay({rnd.randint(20, 400)})", "1*crash"),
            weights=(4, 4, 2))[0]
        entries.append(f"{name}={action}")
    return ";".join(entries)


# ---------------------------------------------------------------- invariants


def violations(ctl: Controller, sts: list[SandboxStatus]) -> list[str]:
    """What is wrong with the recovered world (empty when the invariants hold)."""
    out = [f"recovery problem: {p}" for p in ctl.recovery_problems]
    names: set[tuple[str, str, int]] = set()
    for st in sts:
        key = (st.namespace, st.name, st.attempt)
        if key in names:
            out.append(f"{st.id}: name {key} held twice")
        names.add(key)
        if st.state not in (State.READY, State.NOT_READY):
            out.append(f"{st.id}: left in {st.state.value}")
        state = State.UNKNOWN.value
        for h in st.history:
            if (h.source, h.trigger, h.dest) not in _EDGES or h.source != state:
                out.append(f"{st.id}: history step {h.source}-{h.trigger}->{h.dest} after "
                           f"{state} is not an edge of the table")
            state = h.dest
        if state != st.state.value:
            out.append(f"{st.id}: history ends in {state}, state is {st.state.value}")
        if st.state is State.READY:
            out += [f"{st.id}: Ready but {p}" for p in _ready_problems(st)]
    for kind in ("uid_mappings", "gid_mappings"):
        maps = [(st.id, m) for st in sts for m in getattr(st, kind)]
        for i, (sid, m) in enumerate(maps):
            other = find_overlap(m, [m2 for _, m2 in maps[i + 1:]])
            if other is not None:
                out.append(f"{sid}: {kind} {m} overlaps {other}")
    return out


def _ready_problems(st: SandboxStatus) -> list[str]:
    if st.pid is None or linux.proc_stat(st.pid) is None:
        return [f"its pause pid {st.pid} is not alive"]
    problems = []
    for kind, pin in (("net", st.netns_path), ("user", st.userns_path)):
        if pin is None:
            continue
        try:
            same = os.stat(f"/proc/{st.pid}/ns/{kind}").st_ino == os.stat(pin).st_ino
        except OSError as exc:
            problems.append(f"its {kind} namespace cannot be compared with {pin}: {exc}")
            continue
        if not same:
            problems.append(f"pid {st.pid} is not in the {kind} namespace pinned at {pin}")
    return problems


def leftovers(cfg: ControllerConfig, ids: Iterable[str] = ()) -> dict[str, list[str]]:
    """What the controller of `cfg` left on the host (empty lists dropped): pins, run and
    bundle directories, mounts, containers in its runtime root, pause processes, records,
    addresses in its network's IPAM store, and cgroups of the sandboxes `ids`."""

    def listing(*parts: str) -> list[str]:
        path = os.path.join(*parts)
        return sorted(os.listdir(path)) if os.path.isdir(path) else []

    with open("/proc/self/mountinfo") as f:
        roots = (cfg.run_dir + "/", cfg.netns_dir + "/", cfg.state_dir + "/")
        mounts = [ln.split()[4] for ln in f if ln.split()[4].startswith(roots)]
    found = {
        "netns pins": listing(cfg.netns_dir),
        "sandbox run dirs": listing(cfg.run_dir, "sandboxes"),
        "bundles": listing(cfg.run_dir, "bundles"),
        "mounts": mounts,
        "containers": listing(cfg.run_dir, "runtime", cfg.runtime),
        "pause processes": [str(p) for p in pause_pids(cfg.run_dir)],
        "records": listing(cfg.state_dir, "sandboxes"),
        "addresses": [n for n in listing(CNI_STORE, cfg.default_network_name)
                      if n != "lock" and not n.startswith("last_reserved_ip")],
        "cgroups": [d for sid in sorted(ids) for d in container_cgroup_dirs("", sid)],
    }
    return {k: v for k, v in found.items() if v}


# ---------------------------------------------------------------- the run


def _session(sid: int) -> list[int]:
    """Live (non-zombie) processes of session `sid` (the child and its namespace workers; the
    reaper has its own session and outlives the controller by design)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        fields = linux.proc_stat(int(pid))
        if fields is not None and fields[0] != "Z" and int(fields[3]) == sid:
            out.append(int(pid))
    return out


async def run_chaos(cfg: ControllerConfig, rounds: int, *, seed: int | str = 0,
                    tasks: int = 4, names: int = 6,
                    round_seconds: tuple[float, float] = (0.3, 2.5),
                    workdir: str | None = None, containers: bool = False,
                    progress: Callable[[ChaosReport], None] | None = None) -> ChaosReport:
    """Run `rounds` rounds (see the module's doc) on `cfg`'s directories, then remove every
    sandbox. Returns the figures, the invariant violations and what was left. With
    `containers`, writer containers are created, stopped and removed too (see
    podfsm.tools.chaoscontainers)."""
    rnd = random.Random(f"{seed}-{cfg.runtime}")
    report = ChaosReport(runtime=cfg.runtime)
    workdir = workdir or os.path.dirname(cfg.state_dir)
    seen: set[str] = set()  # every sandbox id a recovery found
    t0 = time.monotonic()
    image = ""
    if containers:
        from podfsm.tools.localimage import import_busybox

        image = await import_busybox(cfg)
    for n in range(rounds):
        spec = {"cfg": cfg.model_dump(mode="json"), "seed": rnd.random(), "tasks": tasks,
                "names": names, "image": image}
        failpoints = random_failpoints(rnd, containers)
        out_path = os.path.join(workdir, f"chaos-{n}.out")
        proc = _start_child(spec, failpoints, out_path)
        try:
            await _one_round(proc, cfg.run_dir, out_path, rnd, round_seconds, report)
        finally:
            for pid in _session(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            await anyio.to_thread.run_sync(proc.wait)
        deadline = time.monotonic() + 10
        while _session(proc.pid):  # its namespace workers follow it
            if time.monotonic() > deadline:
                report.violations.append(f"round {n}: the killed controller's workers linger")
                break
            await anyio.sleep(0.02)
        for line in _read(out_path).decode(errors="replace").splitlines():
            if line.startswith("op "):
                report.operations[line[3:]] = report.operations.get(line[3:], 0) + 1
        t_rec = time.monotonic()
        async with Controller(cfg, failpoints="") as ctl:
            report.recoveries += 1
            report.max_recovery_s = max(report.max_recovery_s, time.monotonic() - t_rec)
            sts = await ctl.list_sandboxes()
            seen.update(st.id for st in sts)
            found = violations(ctl, sts)
            if containers:
                found += chaosctr.violations(ctl, {st.id for st in sts},
                                             await ctl.list_containers())
        if found:
            tail = _read(out_path + ".err")[-2000:].decode(errors="replace")
            report.violations += [f"round {n} (failpoints {failpoints!r}): {v}" for v in found]
            report.violations.append(f"round {n}: the child's stderr ended: {tail}")
        for path in (out_path, out_path + ".err"):
            os.unlink(path)
        report.rounds += 1
        if progress is not None:
            progress(report)
    async with Controller(cfg, failpoints="") as ctl:
        for st in await ctl.list_sandboxes():
            try:
                await ctl.remove_sandbox(st.id)
            except PodfsmError as exc:
                report.violations.append(f"final remove of {st.id}: {exc}")
        if containers:
            await ctl.remove_image(image)
    report.leftovers = leftovers(cfg, seen)
    if containers:
        report.leftovers.update(chaosctr.leftovers(cfg))
    report.seconds = time.monotonic() - t0
    return report


async def _one_round(proc: subprocess.Popen[bytes], run_dir: str, out_path: str,
                     rnd: random.Random, round_seconds: tuple[float, float],
                     report: ChaosReport) -> None:
    """Wait for the child's controller, let it work for a random time (SIGKILLing a pause
    process on the way, six rounds in ten), then SIGKILL it unless it already died."""
    deadline = time.monotonic() + 60
    while proc.poll() is None and b"started" not in _read(out_path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the chaos controller did not start: {_read(out_path + '.err')!r}")
        await anyio.sleep(0.02)
    budget = rnd.uniform(*round_seconds)
    kill_pause_at = rnd.uniform(0, budget) if rnd.random() < 0.6 else None
    t0 = time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < budget:
        if kill_pause_at is not None and time.monotonic() - t0 >= kill_pause_at:
            kill_pause_at = None
            victims = pause_pids(run_dir)
            if victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(rnd.choice(victims), signal.SIGKILL)
                report.pause_kills += 1
            else:  # none yet: try again a little later
                kill_pause_at = time.monotonic() - t0 + 0.1
        await anyio.sleep(0.02)
    if proc.poll() is None:
        report.controller_kills += 1
    elif proc.returncode == -signal.SIGKILL:
        report.failpoint_crashes += 1


def _start_child(spec: dict[str, Any], failpoints: str, out_path: str,
                 ) -> subprocess.Popen[bytes]:
    """The round's controller: its own session, as a node daemon; output to files (a pipe
    nobody reads while it works would block it)."""
    with open(out_path, "wb") as out, open(out_path + ".err", "wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "podfsm.tools.chaos", json.dumps(spec)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
            env={**os.environ, "PODFSM_FAILPOINTS": failpoints})


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


# ---------------------------------------------------------------- the child


async def _child(spec: dict[str, Any]) -> None:
    """A controller whose tasks do random operations until it is killed."""
    cfg = ControllerConfig.model_validate(spec["cfg"])
    rnd = random.Random(spec["seed"])
    image = spec.get("image", "")
    all_ops = {**_OPS, **(chaosctr.OPS if image else {})}
    ops, weights = list(all_ops), list(all_ops.values())
    # containers are refused in a pod with a user namespace: those pods have none
    userns = "NODE" if image else "POD"

    def say(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    async def worker(ctl: Controller) -> None:
        while True:
            op = rnd.choices(ops, weights)[0]
            try:
                if op == "run":
                    name = f"chaos-{rnd.randrange(spec['names'])}"
                    await ctl.run_sandbox({
                        "metadata": {"name": name, "namespace": "podfsm-chaos", "uid": name},
                        **({"log_directory": chaosctr.log_directory(cfg)} if image else {}),
                        "linux": {"security_context": {"namespace_options": {
                            "network": "POD", "userns_options": {"mode": userns}}}}})
                elif op in chaosctr.OPS:
                    await chaosctr.operation(ctl, op, rnd, image)
                elif op == "list":
                    await ctl.list_sandboxes()
                else:
                    sts = await ctl.list_sandboxes()
                    if not sts:
                        continue
                    sid = rnd.choice(sts).id
                    if op == "stop":
                        await ctl.stop_sandbox(sid)
                    elif op == "remove":
                        await ctl.remove_sandbox(sid)
                    else:
                        await ctl.sandbox_status(sid)
            except PodfsmError:
                say(f"op {op} failed")
            else:
                say(f"op {op} ok")
            await anyio.lowlevel.checkpoint()

    async with Controller(cfg) as ctl:  # failpoints from PODFSM_FAILPOINTS
        say("started")
        async with anyio.create_task_group() as tg:
            for _ in range(spec["tasks"]):
                tg.start_soon(worker, ctl)


if __name__ == "__main__":
    anyio.run(_child, json.loads(sys.argv[1]))
