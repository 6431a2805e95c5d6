"""The containers' part of the chaos run (podfsm.tools.chaos with `containers=True`): the
child's tasks also create and start writer containers in random Ready pods (pods without a
user namespace then, as containers are refused in one), stop and remove them; after each
recovery the containers' invariants are checked; at the end nothing of them may be left."""

from __future__ import annotations

import os
import random
from typing import Any

from podfsm.config import ControllerConfig
from podfsm.controller import Controller
from podfsm.core import failpoints as fp
from podfsm.core.containerstates import TRANSITIONS, ContainerState
from podfsm.drivers import linux

#: the container operations a child's tasks choose from, with their weights
OPS = {"create_ctr": 3, "stop_ctr": 1, "remove_ctr": 1}
_EDGES = {(t.source.value, t.trigger.value, t.dest.value) for t in TRANSITIONS}
#: a container that writes a counter, one line every 50 ms: a lost line shows as a gap
WRITER = ["sh", "-c", "i=0; while true; do echo $i; i=$((i+1)); sleep 0.05; done"]
NAMES: tuple[str, ...] = tuple(n for n in fp.NAMES if n.startswith("container_"))


def log_directory(cfg: ControllerConfig) -> str:
    return os.path.join(os.path.dirname(cfg.state_dir), "chaos-logs")


async def operation(ctl: Controller, op: str, rnd: random.Random, image: str) -> None:
    """One container operation on a random pod or container (nothing when there is none)."""
    if op == "create_ctr":
        ready = [s for s in await ctl.list_sandboxes() if s.state.value == "Ready"]
        if not ready:
            return
        sid = rnd.choice(ready).id
        name = f"w{rnd.randrange(4)}"
        cid = await ctl.create_container(sid, {
            "metadata": {"name": name}, "image": {"image": image}, "command": WRITER,
            "log_path": f"{sid[:12]}-{name}-{rnd.randrange(1 << 30)}.log"})
        await ctl.start_container(cid)
        return
    ctrs = await ctl.list_containers()
    if not ctrs:
        return
    cid = rnd.choice(ctrs).id
    if op == "stop_ctr":
        await ctl.stop_container(cid, 0)
    else:
        await ctl.remove_container(cid)


def violations(ctl: Controller, sandboxes: set[str], sts: list[Any]) -> list[str]:
    """What is wrong with the recovered containers: a state between the machine's, a history
    that is no path through the table, a Running one whose process is gone, a container of a
    pod that is gone, a writer's log with a line missing."""
    out = []
    for st in sts:
        if st.state is ContainerState.UNKNOWN:
            out.append(f"container {st.id}: left Unknown (a create neither done nor unwound)")
        state = ContainerState.UNKNOWN.value
        for h in st.history:
            if (h.source, h.trigger, h.dest) not in _EDGES or h.source != state:
                out.append(f"container {st.id}: history step {h.source}-{h.trigger}->"
                           f"{h.dest} after {state} is not an edge of the table")
            state = h.dest
        if st.sandbox_id not in sandboxes:
            out.append(f"container {st.id}: its sandbox {st.sandbox_id} is gone")
        if st.state is ContainerState.RUNNING and (st.pid is None
                                                   or linux.proc_stat(st.pid) is None):
            out.append(f"container {st.id}: Running but its pid {st.pid} is gone")
        if st.log_path:
            out += [f"container {st.id}: {p}" for p in _log_problems(st.log_path)]
    return out


def _log_problems(path: str) -> list[str]:
    try:
        with open(path, "rb") as f:
            lines = f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    numbers = []
    for line in lines:
        parts = line.split(" ", 3)
        if len(parts) == 4 and parts[2] == "F" and parts[3].isdigit():
            numbers.append(int(parts[3]))
    if numbers != list(range(len(numbers))):
        return [f"its log {path} misses lines (a counter with a gap)"]
    return []


def leftovers(cfg: ControllerConfig) -> dict[str, list[str]]:
    """Container directories, containers under the container roots, live conmons."""

    def listing(*parts: str) -> list[str]:
        path = os.path.join(*parts)
        return sorted(os.listdir(path)) if os.path.isdir(path) else []

    conmons = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"conmon") and any(cfg.state_dir.encode() in a for a in argv):
            conmons.append(pid)
    found = {
        "container dirs": listing(cfg.state_dir, "containers"),
        "workload containers": [n for rt in ("runc", "crun")
                                for n in listing(cfg.run_dir, "containers", rt)],
        "conmons": conmons,
    }
    return {k: v for k, v in found.items() if v}
