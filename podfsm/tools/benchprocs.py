"""What the bench (:mod:`podfsm.tools.bench`) measures of podfsm's own processes: which they are
(the controller, reapers, namespace workers, pause processes), their CPU ticks, resident memory
and open file descriptors, read from /proc.

Everything here is importable from :mod:`podfsm.tools.bench` as before.
"""

from __future__ import annotations

import contextlib
import os

from podfsm.drivers import linux

# ---------------------------------------------------------------- our own processes

_TICK = os.sysconf("SC_CLK_TCK")


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def podfsm_pids(run_dir: str) -> list[int]:
    """This process, its namespace workers (its python children) and the reaper of run_dir."""
    me = os.getpid()
    pids = [me]
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        if pid == me:
            continue
        fields = linux.proc_stat(pid)
        if fields is None:
            continue
        argv = _cmdline(pid)
        is_python = bool(argv) and "python" in os.path.basename(argv[0])
        if (int(fields[1]) == me and is_python) or (is_python and run_dir in argv):
            pids.append(pid)
    return pids


def cpu_ticks_by_pid(pids: list[int]) -> dict[int, tuple[int, int]]:
    """(utime, stime) of each process, in clock ticks; not its children's."""
    out = {}
    for pid in pids:
        fields = linux.proc_stat(pid)
        if fields is not None:
            out[pid] = (int(fields[11]), int(fields[12]))
    return out


def process_kind(pid: int) -> str:
    """controller (this process), reaper or workers (the namespace workers)."""
    if pid == os.getpid():
        return "controller"
    argv = " ".join(_cmdline(pid))
    return "reaper" if "drivers.reaper" in argv else "workers"


def memory_kb(pids: list[int], key: str) -> int:
    """Sum of a /proc/<pid>/status field (VmRSS, VmHWM) or, for "Pss", of the proportional set
    size from smaps_rollup: pages the processes share (the interpreter, libraries) counted
    once between them rather than once per process."""
    total = 0
    source = "smaps_rollup" if key == "Pss" else "status"
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/{source}") as f:
            for line in f:
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
    return total


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))
