"""The OCI runtime driver: runs the pause container with runc or crun.

Every container of a controller lives under its own runtime root, `<run_dir>/runtime/<name>`, so
controllers on different run_dirs never see each other's containers, and the runtime's defaults
(/run/runc, /run/crun) are never touched. Bundles live in `<run_dir>/bundles/<container_id>`; all
of them share one read-only pause rootfs, `<run_dir>/pause-rootfs`, holding only a static pause
binary.

`create` runs through the reaper (podfsm.drivers.reaper), a subreaper process, so the pause
process is reparented to it when the runtime exits and its exit status can be learned. crun
1.8.1 refuses to create a container on a hybrid cgroup host unless the hybrid cgroup2 mount is
hidden from it, which the reaper does in a private mount namespace for `crun create`; so every
runtime command goes through the reaper. What acts on the pause process itself and on cgroups
(pidfds, /proc checks, cgroup directories) is in :mod:`podfsm.drivers.pauseprocs`, importable
from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from podfsm.core.errors import PrerequisiteMissing, StepFailed
from podfsm.core.ocispec import pause_spec
from podfsm.core.records import TaskInfo
from podfsm.core.requests import PauseRequest
from podfsm.drivers import linux
from podfsm.drivers.reaper import ReaperError
from podfsm.drivers.reaperclient import ReaperClient, RunResult

# isort: off
from podfsm.drivers.pauseprocs import (  # moved there; importable from here as before
    log as log, STEP as STEP, PAUSE_NAME as PAUSE_NAME, _CONTAINER_ID as _CONTAINER_ID,
    PauseTasks as PauseTasks, _open_path_for_mapped_root as _open_path_for_mapped_root,
    _task_pidfd as _task_pidfd, end_process as end_process, wait_process_exit as wait_process_exit,
    _check_netns_owner as _check_netns_owner, pause_alive as pause_alive,
    pause_problem as pause_problem, _check_joined as _check_joined, _check_id as _check_id,
    pause_pids as pause_pids, _empty_cgroups as _empty_cgroups,
    cgroup_parent_dirs as cgroup_parent_dirs, _cgroup_roots as _cgroup_roots,
    container_cgroup_dirs as container_cgroup_dirs, remove_new_dirs as remove_new_dirs,
    _read_text as _read_text,
)
# isort: on


#: The Debian package that ships each binary, for the error that says what to install.
DEBIAN_PACKAGES = {"runc": "runc", "crun": "crun", "catatonit": "catatonit"}
_ROOTFS_DIRS = ("proc", "sys", "dev", "etc", "tmp")
# Mount points of the sandbox's files (see core.ocispec.sandbox_file_mounts): made here, since
# the pod's mapped root could not create them in the read-only, host-owned rootfs.
_ROOTFS_FILES = ("etc/hostname", "etc/hosts", "etc/resolv.conf")
_RUNC_MSG = re.compile(r'msg="((?:[^"\\]|\\.)*)"')
_PT_INTERP = 3
_LISTING_START = re.compile(r"^(?:\[|null)", re.MULTILINE)
DEFAULT_COMMAND_TIMEOUT = 60.0


def _is_static_elf(path: str) -> bool:
    """True when `path` is an ELF executable without a program interpreter (statically linked);
    an empty rootfs has no dynamic loader for anything else."""
    with open(path, "rb") as f:
        ident = f.read(64)
        if len(ident) < 52 or ident[:4] != b"\x7fELF":
            return False
        is64 = ident[4] == 2
        endian = "<" if ident[5] == 1 else ">"
        if is64:
            phoff, = struct.unpack_from(endian + "Q", ident, 32)
            phentsize, phnum = struct.unpack_from(endian + "HH", ident, 54)
        else:
            phoff, = struct.unpack_from(endian + "I", ident, 28)
            phentsize, phnum = struct.unpack_from(endian + "HH", ident, 42)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        p_type, = struct.unpack_from(endian + "I", table, i * phentsize)
        if p_type == _PT_INTERP:
            return False
    return True


def _same_file_content(a: str, b: str) -> bool:
    try:
        if os.path.getsize(a) != os.path.getsize(b):
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            return fa.read() == fb.read()
    except OSError:
        return False


def assemble_pause_rootfs(rootfs: str, pause_binary: str) -> None:
    """Make `rootfs` hold the pause binary as /catatonit plus the mount points the spec needs.

    Built beside the target and renamed into place, so concurrent controllers sharing a run_dir
    and a crash halfway never leave a partial rootfs. An existing rootfs with the same binary is
    kept as it is.
    """
    if not os.path.isfile(pause_binary):
        raise PrerequisiteMissing(
            f"pause binary {pause_binary} not found: install the Debian package "
            f"'{DEBIAN_PACKAGES['catatonit']}' or set pause_binary"
        )
    if not _is_static_elf(pause_binary):
        raise PrerequisiteMissing(
            f"pause binary {pause_binary} is not a statically linked executable; the pause rootfs "
            f"has no libraries: use Debian's '{DEBIAN_PACKAGES['catatonit']}' (static)"
        )
    target = os.path.join(rootfs, PAUSE_NAME)
    if _same_file_content(pause_binary, target) and all(
        os.path.isdir(os.path.join(rootfs, d)) for d in _ROOTFS_DIRS
    ) and all(os.path.isfile(os.path.join(rootfs, f)) for f in _ROOTFS_FILES):
        return
    parent = os.path.dirname(rootfs)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{rootfs}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp, mode=0o755)
    for d in _ROOTFS_DIRS:
        os.mkdir(os.path.join(tmp, d), 0o755)
    for name in _ROOTFS_FILES:
        with open(os.path.join(tmp, name), "x"):
            pass
        os.chmod(os.path.join(tmp, name), 0o644)
    shutil.copyfile(pause_binary, os.path.join(tmp, PAUSE_NAME))
    os.chmod(os.path.join(tmp, PAUSE_NAME), 0o755)
    # Directories are 0755 whatever the umask: inside a user namespace the files show as owned
    # by nobody, and the pause process only needs to traverse and execute.
    os.chmod(tmp, 0o755)
    old = f"{rootfs}.old-{os.getpid()}"
    if os.path.lexists(rootfs):
        # Bundles of running containers refer to the path; their mounts keep the old inode alive.
        os.rename(rootfs, old)
    try:
        os.rename(tmp, rootfs)
    except OSError:
        # Another controller won the race: its rootfs is as good as ours.
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def _trim(text: str, limit: int = 600) -> str:
    """The runtime's error in one line: runc's logrus `msg="..."` fields, or the last lines."""
    msgs = [m.encode().decode("unicode_escape") for m in _RUNC_MSG.findall(text)]
    out = "; ".join(msgs) if msgs else " ".join(text.strip().splitlines()[-3:])
    out = out.strip() or "no output"
    return out if len(out) <= limit else out[: limit - 3] + "..."


def installed(name: str) -> bool:
    """Whether the OCI runtime `name` is on PATH (or in /usr/sbin, /sbin)."""
    return bool(shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin"))


class OciRuntime(PauseTasks):
    """RuntimeDriver for runc and crun (see podfsm.drivers.base.RuntimeDriver).

    Every runtime command runs as a child of the reaper. For crun that is required (the cgroup
    workaround); for runc only `create` needs it, but running its other verbs straight from this
    process measured no faster (start 4.3 vs 4.4 ms, delete 4.8 vs 4.6 ms, medians of 20), and
    this way the embedding program never has a child process of ours.
    """

    def __init__(
        self,
        name: Literal["runc", "crun"],
        run_dir: str,
        binary: str | None = None,
        pause_binary: str = "/usr/bin/catatonit",
        command_timeout: float = DEFAULT_COMMAND_TIMEOUT,
    ) -> None:
        if name not in ("runc", "crun"):
            raise ValueError(f"unsupported OCI runtime {name!r} (runc or crun)")
        self.name: str = name
        self.run_dir = os.path.abspath(run_dir)
        self.binary = binary
        self.pause_binary = pause_binary
        #: seconds a runtime command may run before the reaper kills its process group
        self.command_timeout = command_timeout
        self.root = os.path.join(self.run_dir, "runtime", name)
        self.bundles_dir = os.path.join(self.run_dir, "bundles")
        self.rootfs = os.path.join(self.run_dir, "pause-rootfs")
        self._resolved: str | None = None
        #: an ancestor of the rootfs that a pod's mapped root cannot traverse, if any
        self._unreachable: str | None = None
        self._reaper = ReaperClient(self.run_dir)
        self._cgroup_roots: list[str] | None = None

    @property
    def reaper(self) -> ReaperClient:
        """The client of this run_dir's reaper."""
        return self._reaper

    # -- lifecycle ---------------------------------------------------------------------------

    def _resolve_binary(self) -> str:
        pkg = DEBIAN_PACKAGES[self.name]
        if self.binary is not None:
            if os.path.isfile(self.binary) and os.access(self.binary, os.X_OK):
                return os.path.abspath(self.binary)
            raise PrerequisiteMissing(
                f"OCI runtime {self.name} not found at {self.binary}: install the Debian package "
                f"'{pkg}' or fix runtime_binary"
            )
        found = shutil.which(self.name) or shutil.which(self.name, path="/usr/sbin:/sbin")
        if found is None:
            raise PrerequisiteMissing(
                f"OCI runtime {self.name} not found on PATH: install the Debian package '{pkg}'"
            )
        return found

    async def start(self) -> None:
        """Check the runtime binary, assemble the shared pause rootfs, connect to the reaper."""
        self._resolved = self._resolve_binary()
        for d in (self.root, self.bundles_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        await asyncio.to_thread(assemble_pause_rootfs, self.rootfs, self.pause_binary)
        self._unreachable = _open_path_for_mapped_root(self.run_dir)
        try:
            await self._reaper.connect()
        except ReaperError as exc:
            raise StepFailed(STEP, str(exc)) from exc

    async def close(self) -> None:
        """Disconnect; containers and the reaper keep running."""
        await self._reaper.close()

    @property
    def resolved_binary(self) -> str | None:
        """The runtime binary found at start() (None before): containers run it too."""
        return self._resolved

    # -- paths -------------------------------------------------------------------------------

    def bundle_path(self, container_id: str) -> str:
        """Where the bundle of `container_id` lives (under run_dir)."""
        _check_id(container_id)
        return os.path.join(self.bundles_dir, container_id)

    def bundle_ids(self) -> list[str]:
        try:
            return os.listdir(self.bundles_dir)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _exists(self, container_id: str) -> bool:
        # Both runtimes keep one directory per container under --root, from create to delete.
        return os.path.isdir(os.path.join(self.root, container_id))

    # -- commands ----------------------------------------------------------------------------

    def _argv(self, *args: str) -> list[str]:
        if self._resolved is None:
            raise StepFailed(STEP, f"{self.name} driver used before start()")
        return [self._resolved, "--root", self.root, *args]

    async def _run(
        self, verb: str, args: Sequence[str], *, output_file: str | None = None,
        then: Mapping[str, Any] | None = None,
    ) -> RunResult:
        argv = self._argv(verb, *args)
        # crun refuses hybrid cgroups only where it creates the container's cgroups: `create`.
        # Its other verbs work on hybrid hosts as they are (measured here: start, kill, list,
        # state, and delete, which also removes the cgroups that create made), and so run
        # without the private mount namespace, whose preexec_fn rules out vfork in the reaper.
        workaround = self.name == "crun" and verb == "create"
        try:
            return await self._reaper.run(
                argv, mount_workaround=workaround, timeout=self.command_timeout,
                output_file=output_file, then=then,
            )
        except ReaperError as exc:
            raise StepFailed(STEP, f"{self.name} {verb} failed: {exc}") from exc

    def _failed(self, verb: str, stderr: str) -> StepFailed:
        return StepFailed(STEP, f"{self.name} {verb} failed: {_trim(stderr)}")

    async def create(self, req: PauseRequest) -> TaskInfo:
        """Write the bundle and run `create --pid-file`; the pause process exists, not started.

        On failure nothing of this container is left: not in the runtime, no bundle.
        """
        bundle = self.bundle_path(req.container_id)
        try:
            spec = pause_spec(
                req, rootfs=self.rootfs, pause_args=("/" + PAUSE_NAME, "-P"), runtime=self.name
            )
        except ValueError as exc:
            raise StepFailed(STEP, f"{self.name} create failed: {exc}") from exc
        if req.userns_path is not None and self._unreachable is not None:
            raise StepFailed(
                STEP,
                f"{self.name} create failed: the pause rootfs {self.rootfs} is out of reach of "
                f"the pod's mapped root: {self._unreachable} is not searchable by others "
                "(chmod o+x it or choose another run_dir)",
            )
        _check_netns_owner(self.name, req)
        if self._exists(req.container_id) or os.path.lexists(bundle):
            # Cleaning up after a failed create would then destroy the existing container.
            raise StepFailed(
                STEP, f"{self.name} create failed: container {req.container_id} already exists"
            )
        pid_file = os.path.join(bundle, "pid")
        try:
            _write_bundle(bundle, spec)
        except OSError as exc:
            raise StepFailed(STEP, f"cannot write the bundle {bundle}: {exc}") from exc
        try:
            # The container inherits the runtime's stdio: a file, never a pipe someone waits on.
            # Create, then (in the same reaper request) read the pid file, write task.json and
            # watch the pause process: task.json is written before the reaper persists
            # anything for the process, so a crash in between leaves a task.json that
            # delete() uses to make the reaper forget it.
            res = await self._run(
                "create", ["--bundle", bundle, "--pid-file", pid_file, req.container_id],
                output_file=os.path.join(bundle, "pause.log"),
                then={"watch_pid_file": pid_file,
                      "task_file": os.path.join(bundle, "task.json")},
            )
            if res.rc != 0:
                raise self._failed("create", res.stderr)
            if res.watched is None:
                raise StepFailed(
                    STEP, f"{self.name} create left no usable pid file {pid_file}, or the "
                          f"pause process cannot be supervised: {res.then_error}")
            task = TaskInfo(pid=res.watched.pid, start_time=res.watched.start_time)
            _check_joined(self.name, req, task.pid)
            return task
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.delete(req.container_id))
            raise

    async def start_task(self, container_id: str) -> None:
        """Run `start`."""
        _check_id(container_id)
        res = await self._run("start", [container_id])
        if res.rc != 0:
            raise self._failed("start", res.stderr)

    async def delete(self, container_id: str) -> None:
        """`delete --force` and remove the bundle. Idempotent."""
        _check_id(container_id)
        bundle = self.bundle_path(container_id)
        task = _read_task(os.path.join(bundle, "task.json"))
        # cgroup paths are global: only a container of this root (or whose bundle this
        # controller wrote) may have its cgroups removed here
        ours = os.path.isdir(bundle) or self._exists(container_id)
        forgotten = False
        if self._exists(container_id):
            if task is not None:
                await self._kill_and_wait(task)
            # delete, then (same request) forget the pause's exit status
            then = None if task is None else {
                "forget": {"pid": task.pid, "start_time": task.start_time}}
            res = await self._run("delete", ["--force", container_id], then=then)
            if res.rc != 0 and self._exists(container_id):
                raise self._failed("delete", res.stderr)
            forgotten = res.rc == 0 and res.then_error is None
        if task is not None and not forgotten:
            with contextlib.suppress(ReaperError):
                await self._reaper.forget(task.pid, task.start_time)
        # A `create` killed halfway (timeout, or a controller SIGKILLed) leaves the container's
        # cgroups behind with no state that `delete` could find them by, sometimes with the
        # container's init still in them, waiting for a `start` that never comes (crun's
        # calls setsid, so it outlives the group kill and is reparented to the reaper). The
        # runtime knows the container no more, so what is left in its own cgroup is this
        # container's and is killed, then the cgroups go.
        if self._cgroup_roots is None:
            self._cgroup_roots = _cgroup_roots()  # the hierarchies are mounted at boot
        dirs = container_cgroup_dirs(bundle, container_id, self._cgroup_roots) if ours else []
        if dirs and not self._exists(container_id):
            await _empty_cgroups(dirs, container_id)
        for d in dirs:
            try:
                os.rmdir(d)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.info("cgroup %s stays: %s", d, exc.strerror)
        try:
            linux.remove_flat_dir(bundle)
        except OSError as exc:
            raise StepFailed(STEP, f"cannot remove the bundle {bundle}: {exc}") from exc

    async def kill_task(self, task: TaskInfo, grace: float) -> int | None:
        # One reaper request: it signals through a pidfd, sees the exit and reaps the status.
        try:
            _, status = await self._reaper.kill(task.pid, task.start_time, grace)
            return status
        except ReaperError as exc:
            if "survived SIGKILL" in str(exc):
                raise StepFailed("kill task", f"pause pid {task.pid} survived SIGKILL") \
                    from None
            log.warning("the reaper could not end pause pid %d (%s): ending it here",
                        task.pid, exc)
        return await super().kill_task(task, grace)

    async def _kill_and_wait(self, task: TaskInfo) -> None:
        """SIGKILL a live pause process and wait until it is reaped.

        `runc delete --force` of a running container polls for the end of the process in
        100 ms steps; the reaper sees it in under a millisecond, after which delete takes ~5 ms.
        """
        with contextlib.suppress(StepFailed):  # `delete --force` tries again
            if not await end_process(task, 0):
                return
        with contextlib.suppress(ReaperError):
            await self._reaper.wait_exit(task.pid, task.start_time, timeout=2.0)

    async def list_containers(self) -> list[str]:
        """Ids of every container under this controller's runtime root."""
        # One directory per container, created by `create` and removed by `delete`: reading it
        # costs no process and agrees with `<runtime> list`.
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if os.path.isdir(os.path.join(self.root, n)))

    async def states(self) -> dict[str, str]:
        """`<runtime> list --format json`: every container's status in one process."""
        if not await self.list_containers():
            return {}
        # through a file: with hundreds of containers the listing outgrows what the reaper
        # keeps of a command's output
        fd, path = tempfile.mkstemp(prefix="list-", suffix=".json", dir=self.run_dir)
        os.close(fd)
        try:
            res = await self._run("list", ["--format", "json"], output_file=path)
            out = await asyncio.to_thread(_read_text, path)
        finally:
            os.unlink(path)
        if res.rc != 0:
            raise self._failed("list", res.stderr)
        # The file holds stderr too: runc warns there about a container whose `create` was
        # killed halfway ("load container ...: container does not exist") before the listing.
        # runc prints the listing on one line, crun over several: it starts at a line's start.
        start = next((m.start() for m in _LISTING_START.finditer(out)), 0)
        try:
            entries = json.JSONDecoder().raw_decode(out, start)[0] or []
            return {str(e["id"]): str(e["status"]) for e in entries}
        except (ValueError, KeyError, TypeError) as exc:
            raise StepFailed(STEP, f"{self.name} list gave unreadable output: {out[:200]!r}") \
                from exc

    async def wait_exit_status(self, task: TaskInfo, timeout: float) -> int | None:
        """The task's exit status as a shell reports it (128+signal for a signal), once the
        reaper has reaped it within `timeout` seconds; None when it cannot be known."""
        try:
            return await self._reaper.wait_exit(task.pid, task.start_time, timeout)
        except ReaperError as exc:
            raise StepFailed(STEP, f"cannot learn the exit status of pid {task.pid}: {exc}") \
                from exc


def _write_json(path: str, data: Any) -> None:
    tmp = f"{path}.tmp"
    # json.dumps without indent runs the C encoder; json.dump(f) would run the Python one
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, separators=(",", ":")))
    os.replace(tmp, path)


def _write_bundle(bundle: str, spec: dict[str, Any]) -> None:
    os.makedirs(bundle, mode=0o700, exist_ok=True)
    _write_json(os.path.join(bundle, "config.json"), spec)


def _read_task(path: str) -> TaskInfo | None:
    try:
        with open(path, "rb") as f:
            return TaskInfo.model_validate_json(f.read())
    except (OSError, ValueError):
        return None
