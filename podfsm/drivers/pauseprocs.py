"""The pause process and its cgroups, apart from the OCI runtime's commands
(:mod:`podfsm.drivers.runtime`): ending a pause process and waiting for it through a pidfd,
checking that it is still the one recorded and still in its namespaces (`PauseTasks`, shared by
every runtime handler and the fake), finding pause processes, and the cgroup directories of pods
and containers (found, emptied, removed when new).

Everything here is importable from :mod:`podfsm.drivers.runtime` as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import glob
import json
import logging
import os
import re
import signal
import stat
import time
from collections.abc import Sequence
from typing import Any

import anyio

from podfsm.core.errors import PodfsmError, StepFailed
from podfsm.core.ocispec import DEFAULT_CGROUP_PARENT, cgroups_path
from podfsm.core.records import PinnedNamespaces, TaskInfo
from podfsm.core.requests import PauseRequest
from podfsm.drivers import linux

log = logging.getLogger("podfsm.drivers.runtime")  # the name it always had

STEP = "runtime"
PAUSE_NAME = "catatonit"
# A container id becomes a path component and a cgroup name: keep it to the OCI-safe alphabet.
_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class PauseTasks:
    """The RuntimeDriver members that act on the pause process itself, not on the runtime's
    state: one implementation for every runtime handler and for the fake, whose pause is a real
    process too. The class that uses it provides `wait_exit_status`."""

    async def wait_exit_status(self, task: TaskInfo, timeout: float) -> int | None:
        raise NotImplementedError

    async def kill_task(self, task: TaskInfo, grace: float) -> int | None:
        ended = await end_process(task, grace)
        if ended is None:
            return None
        try:
            return await self.wait_exit_status(task, 1.0 if ended else 0.05)
        except PodfsmError as exc:
            log.warning("exit status of pause pid %d unknown: %s", task.pid, exc)
            return None

    async def wait_task_exit(self, task: TaskInfo) -> None:
        await wait_process_exit(task)

    def task_alive(self, task: TaskInfo) -> bool:
        return pause_alive(task)

    def task_problem(self, task: TaskInfo, ns: PinnedNamespaces | None) -> str | None:
        return pause_problem(task, ns)


def _open_path_for_mapped_root(run_dir: str) -> str | None:
    """Let a pod's mapped root reach the rootfs under `run_dir`; return the first ancestor
    that stays out of its reach, or None.

    In a user namespace the container's root is an unprivileged host uid: the runtime, already
    inside that namespace when it mounts the rootfs, needs search permission on every ancestor.
    run_dir is ours, so it gets o+x (search without listing, as containerd's 0711 state dirs);
    ancestors above it are only checked.
    """
    st = os.stat(run_dir)
    if not st.st_mode & stat.S_IXOTH:
        os.chmod(run_dir, stat.S_IMODE(st.st_mode) | stat.S_IXOTH)
    path = os.path.dirname(run_dir)
    while True:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return path
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def _task_pidfd(task: TaskInfo) -> int | None:
    """A pidfd of the pause process `task`, for the caller to close; None when its pid belongs
    to another process now (it exited long ago). ProcessLookupError when no process has the pid.
    The start time is checked after the pidfd is taken, so the pidfd cannot be of a reuse."""
    pidfd = os.pidfd_open(task.pid)
    if not pause_alive(task):
        os.close(pidfd)
        return None
    return pidfd


async def end_process(task: TaskInfo, grace: float) -> bool | None:
    """End the pause process `task` through a pidfd, so a reuse of its pid is never signalled:
    SIGTERM, then SIGKILL after `grace` seconds (at once when `grace` is 0); return once it has
    exited. True: it was running and has exited; False: it was gone already; None: its pid
    belongs to another process now (it exited long ago). StepFailed if it survives SIGKILL.

    Ending a pause process from this process: PauseTasks.kill_task, for the fakes and for
    OciRuntime when its reaper cannot be reached (the reaper's `kill` request does the same
    inside the reaper, and reaps the status in the same request).
    """
    try:
        pidfd = _task_pidfd(task)
    except ProcessLookupError:
        return False
    if pidfd is None:
        return None
    try:
        term = ((signal.SIGTERM, grace),) if grace > 0 else ()
        for sig, wait in (*term, (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(pidfd, sig)
            with anyio.move_on_after(wait):
                await anyio.wait_readable(pidfd)
                return True
        raise StepFailed("kill task", f"pause pid {task.pid} survived SIGKILL")
    finally:
        os.close(pidfd)


async def wait_process_exit(task: TaskInfo) -> None:
    """RuntimeDriver.wait_task_exit (PauseTasks). A pidfd is readable the moment its process
    exits (a zombie, reaped or not, has exited), so the exit is seen within milliseconds and
    nothing polls."""
    try:
        pidfd = _task_pidfd(task)
    except ProcessLookupError:
        return
    if pidfd is None:
        return
    try:
        await anyio.wait_readable(pidfd)
    finally:
        os.close(pidfd)


def _check_netns_owner(runtime: str, req: PauseRequest) -> None:
    """Refuse a netns that the pod's user namespace does not own.

    sysfs can then not be mounted, and crun 1.8.1 does not fail: it quietly bind-mounts the
    HOST's /sys instead (read-write, host interfaces visible). Never rely on the runtime to fail.
    """
    if req.userns_path is None or req.netns_path is None:
        return
    problem = linux.netns_owner_problem(req.netns_path, req.userns_path)
    if problem is not None:
        raise StepFailed(STEP, f"{runtime} create failed: {problem}: the pod could not mount "
                               "its own sysfs")


def pause_alive(task: TaskInfo) -> bool:
    """RuntimeDriver.task_alive (PauseTasks). /proc/<pid>/stat's start time tells
    the process from a later one that reuses its pid."""
    return linux.proc_start_time(task.pid) == task.start_time


def pause_problem(task: TaskInfo, ns: PinnedNamespaces | None) -> str | None:
    """RuntimeDriver.task_problem (PauseTasks)."""
    want_user = (ns.userns_inode if ns and ns.userns_inode else
                 linux.ns_inode("/proc/self/ns/user"))
    want_net = (ns.netns_inode if ns and ns.netns_inode else
                linux.ns_inode("/proc/self/ns/net"))
    pid = task.pid
    try:
        if not pause_alive(task):
            raise ProcessLookupError(errno.ESRCH, "pause process exited")
        got_user = linux.ns_inode(f"/proc/{pid}/ns/user")
        got_net = linux.ns_inode(f"/proc/{pid}/ns/net")
    except OSError as exc:
        return f"pause pid {pid} is gone: {exc.strerror}"
    if got_user != want_user or got_net != want_net:
        return (f"pause pid {pid} is in user ns {got_user} / net ns {got_net}, "
                f"expected {want_user} / {want_net}")
    return None


def _check_joined(runtime: str, req: PauseRequest, pid: int) -> None:
    """The created process is in the pinned namespaces, whatever the runtime did."""
    for kind, path in (("user", req.userns_path), ("net", req.netns_path)):
        if path is None:
            continue
        try:
            ok = linux.ns_inode(f"/proc/{pid}/ns/{kind}") == linux.ns_inode(path)
        except OSError as exc:
            raise StepFailed(
                STEP, f"{runtime} create failed: the pause process {pid} is gone: {exc}"
            ) from exc
        if not ok:
            raise StepFailed(
                STEP, f"{runtime} create failed: the pause process {pid} is not in the pinned "
                      f"{kind} namespace {path}"
            )


def _check_id(container_id: str) -> None:
    if not _CONTAINER_ID.match(container_id):
        raise StepFailed(STEP, f"invalid container id {container_id!r}")


def pause_pids(run_dir: str) -> list[int]:
    """Live processes running the pause binary of `run_dir`'s pause rootfs: the pause
    processes of that controller, whatever its records say (for tools and tests that must
    leave nothing). Told by the executable's inode, which /proc/<pid>/exe reaches across mount
    namespaces (/proc/<pid>/root reads "/" there: the runtime pivots into the rootfs)."""
    try:
        st = os.stat(os.path.join(run_dir, "pause-rootfs", PAUSE_NAME))
    except OSError:
        return []
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            exe = os.stat(f"/proc/{pid}/exe")
            if (exe.st_dev, exe.st_ino) == (st.st_dev, st.st_ino):
                pids.append(int(pid))
    return pids


async def _empty_cgroups(dirs: list[str], container_id: str, within: float = 2.0) -> None:
    """SIGKILL every process left in the container's cgroup directories and wait (briefly)
    until they are empty. A pid is signalled through a pidfd taken after checking that the
    process is still in this container's cgroup, so a reused pid is never hit."""
    deadline = time.monotonic() + within
    while True:
        pids: set[int] = set()
        for d in dirs:
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(p) for p in _read_text(os.path.join(d, "cgroup.procs")).split())
        if not pids or time.monotonic() > deadline:
            return
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                if container_id in _read_text(f"/proc/{pid}/cgroup"):
                    log.warning("killing pid %d left in the cgroup of container %s", pid,
                                container_id)
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
            except OSError:
                pass
            finally:
                os.close(fd)
        await asyncio.sleep(0.01)


def cgroup_parent_dirs(parent: str = DEFAULT_CGROUP_PARENT) -> set[str]:
    """The directories of the default cgroup parent in every mounted hierarchy. The runtime
    creates them with the first pod and leaves them; tools and tests that must leave the host
    as they found it remove the ones that were not there before (see remove_new_dirs)."""
    name = parent.strip("/")
    return {d for d in glob.glob(f"/sys/fs/cgroup/*/{name}") + glob.glob(f"/sys/fs/cgroup/{name}")
            if os.path.isdir(d)}


def _cgroup_roots() -> list[str]:
    """The mount points of the cgroup hierarchies under /sys/fs/cgroup (one with cgroup v2,
    one per controller and the unified one with v1 or hybrid)."""
    roots = []
    with contextlib.suppress(OSError), open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            # "... mount_point options [optional...] - fstype source super_options"
            try:
                fstype = fields[fields.index("-") + 1]
            except (ValueError, IndexError):
                continue
            mount_point = fields[4]
            if fstype in ("cgroup", "cgroup2") and (
                    mount_point == "/sys/fs/cgroup" or mount_point.startswith("/sys/fs/cgroup/")):
                roots.append(mount_point)
    return sorted(set(roots))


def container_cgroup_dirs(bundle: str, container_id: str,
                          roots: Sequence[str] | None = None) -> list[str]:
    """The directories of the container's cgroup in every mounted hierarchy (`roots`, else
    read now): `cgroupsPath` from the bundle's config.json (the default parent without one),
    accepted only as an absolute, normalized path that ends in the container id."""
    path: Any = None
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        path = json.loads(_read_text(os.path.join(bundle, "config.json")))["linux"]["cgroupsPath"]
    if not (isinstance(path, str) and path.startswith("/") and os.path.normpath(path) == path
            and os.path.basename(path) == container_id):
        path = cgroups_path(container_id)
    rel = path.lstrip("/")
    found = []
    for root in _cgroup_roots() if roots is None else roots:
        d = os.path.join(root, rel)
        # a stat each, against two globs listing every hierarchy: this runs at every delete
        if os.path.isdir(d) and not os.path.islink(d):
            found.append(d)
    return found


def remove_new_dirs(before: set[str]) -> None:
    """rmdir the cgroup parent dirs that appeared since `before` (only empty ones go)."""
    for d in sorted(cgroup_parent_dirs() - before, reverse=True):
        with contextlib.suppress(OSError):
            os.rmdir(d)


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()
