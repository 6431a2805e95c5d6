"""The namespace driver: a pool of single-threaded worker subprocesses (podfsm.drivers.nsworker).

The embedding program is an asyncio program, so it has threads, and a multi-threaded process
can neither unshare(CLONE_NEWUSER) nor safely fork without exec. So namespaces are made in
long-lived workers started with create_subprocess_exec; each request forks a fresh helper there,
which unshares, and the worker writes the id maps, pins and verifies (see nsworker for the
protocol). Destroy needs no worker: umount2 + unlink work from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

from podfsm.core.errors import StepFailed
from podfsm.core.records import PinnedNamespaces
from podfsm.core.requests import NamespaceRequest
from podfsm.core.spec import IDMapping
from podfsm.drivers import PACKAGE_DIR, linux

log = logging.getLogger(__name__)
_T = TypeVar("_T")

STEP = "namespaces"
# How a worker starts: like `python -m podfsm.drivers.nsworker`, but without running
# podfsm/__init__.py, which imports the whole controller (pydantic, pyroute2, ...). The worker
# needs only nsworker and linux (stdlib only): a small process forks faster on every request,
# and a broken import elsewhere in podfsm cannot break namespace creation. `-I` keeps
# PYTHONPATH and friends from injecting code into a root process.
_BOOTSTRAP = """\
import os, sys, types
pkg = sys.argv[1]
for name, path in (("podfsm", pkg), ("podfsm.drivers", os.path.join(pkg, "drivers"))):
    mod = types.ModuleType(name)
    mod.__path__ = [path]
    sys.modules[name] = mod
from podfsm.drivers import nsworker
sys.exit(nsworker.main())
"""


class _NotAccepted(Exception):
    """The worker was gone before it acknowledged the request: the request had no effect."""


class _Lost(Exception):
    """The worker failed after acknowledging the request: its effect is unknown."""


def _describe_exit(pid: int | None, returncode: int | None) -> str:
    if returncode is None:
        return f"namespace worker pid {pid} stopped"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"namespace worker pid {pid} was killed by {name}"
    return f"namespace worker pid {pid} exited with status {returncode}"


class _Worker:
    """One slot of the pool: a worker process, or none while it is being replaced."""

    def __init__(self, index: int, python: str) -> None:
        self.index = index
        self.python = python
        self.proc: asyncio.subprocess.Process | None = None
        self.pid: int | None = None
        self._pidfd: int | None = None
        self._next_id = 1
        #: how many times the slot was taken from the idle queue, and the timer that retires
        #: it if that does not change (see WorkerPoolNamespaces._release)
        self.uses = 0
        self.retire_timer: asyncio.TimerHandle | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def spawn(self, timeout: float) -> None:
        """Start a worker process and wait for its ready line."""
        proc = await asyncio.create_subprocess_exec(
            self.python, "-I", "-c", _BOOTSTRAP, PACKAGE_DIR,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        self.proc, self.pid, self._next_id = proc, proc.pid, 1
        # asyncio's child watcher reaps the worker only after it exits, and it has just
        # started Python, so this pidfd is the worker's.
        try:
            self._pidfd = os.pidfd_open(proc.pid)
        except ProcessLookupError:
            self._pidfd = None  # already gone: reading its ready line fails below
        try:
            async with asyncio.timeout(timeout):
                hello = await self._read()
        except BaseException as exc:
            rc = await self.stop(kill=True)
            if isinstance(exc, (_Lost, TimeoutError)):
                raise RuntimeError(
                    f"{_describe_exit(proc.pid, rc)} before it was ready: {exc}"
                ) from None
            raise
        if hello.get("event") != "ready":
            await self.stop(kill=True)
            raise RuntimeError(f"namespace worker pid {proc.pid} said {hello!r}, not ready")

    async def call(self, payload: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one request and return the final response.

        Raises _NotAccepted if the worker was gone before it acknowledged the request, _Lost
        if it died, hung past `timeout` or broke the protocol after that.
        """
        proc = self.proc
        if proc is None or proc.stdin is None:
            raise _NotAccepted("no worker process")
        rid = self._next_id
        self._next_id += 1
        line = json.dumps({**payload, "id": rid}).encode() + b"\n"
        try:
            async with asyncio.timeout(timeout):
                try:
                    proc.stdin.write(line)
                    await proc.stdin.drain()
                    ack = await self._read()
                except (_Lost, ConnectionError) as exc:
                    raise _NotAccepted(str(exc) or type(exc).__name__) from None
                if ack.get("id") != rid or not ack.get("ack"):
                    raise _Lost(f"protocol error: expected the ack of request {rid}, got {ack!r}")
                resp = await self._read()
                if resp.get("id") != rid or "ok" not in resp:
                    raise _Lost(f"protocol error: expected the answer to {rid}, got {resp!r}")
                return resp
        except TimeoutError:
            raise _Lost(f"no answer within {timeout:g} s") from None

    async def _read(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            line = await self.proc.stdout.readline()
        except (ValueError, asyncio.LimitOverrunError) as exc:
            raise _Lost(f"protocol error: {exc}") from None
        if not line.endswith(b"\n"):
            raise _Lost("the worker closed its output")
        try:
            msg = json.loads(line)
        except ValueError:
            raise _Lost(f"protocol error: not JSON: {line[:200]!r}") from None
        if not isinstance(msg, dict):
            raise _Lost(f"protocol error: not an object: {line[:200]!r}")
        return msg

    async def stop(self, kill: bool = False, timeout: float = 5.0) -> int | None:
        """End the worker: EOF on stdin (it finishes the current request first), SIGKILL when
        `kill` or after `timeout`. Returns its exit status. Idempotent."""
        # Taken from the slot at once: a replacement may be spawned into it meanwhile.
        proc, self.proc = self.proc, None
        pidfd, self._pidfd = self._pidfd, None
        if proc is None:
            return None
        try:
            if proc.stdin is not None:
                proc.stdin.close()
            if kill:
                _kill(pidfd)
            try:
                async with asyncio.timeout(timeout):
                    await proc.wait()
            except TimeoutError:
                _kill(pidfd)
                await proc.wait()
        finally:
            if pidfd is not None:
                os.close(pidfd)
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL the worker through its pidfd."""
        _kill(self._pidfd)


def _kill(pidfd: int | None) -> None:
    """SIGKILL a worker through its pidfd.

    Not Process.kill(): Popen.send_signal() polls first, which REAPS an exited worker and so
    steals its exit status from asyncio's child watcher (it then reports 255).
    """
    if pidfd is not None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)


class PinChecks:
    """The NamespaceDriver members that read pins, not make them: one implementation for the
    worker pool and for the fake, whose pins are symlinks to real namespaces."""

    def owner_problem(self, ns: PinnedNamespaces) -> str | None:
        if not ns.netns_path or not ns.userns_path:
            return None
        return linux.netns_owner_problem(ns.netns_path, ns.userns_path, ns.userns_inode)

    def pin_problem(self, ns: PinnedNamespaces) -> str | None:
        for kind, path, inode in (("netns", ns.netns_path, ns.netns_inode),
                                  ("userns", ns.userns_path, ns.userns_inode)):
            if not path or not inode:
                continue
            try:
                ok = linux.ns_inode(path) == inode
            except OSError:
                ok = False
            if not ok:
                return f"the {kind} pin {path} no longer holds the pod's namespace"
        return None

    def pins_exist(self, *paths: str | None) -> bool:
        return any(p and os.path.lexists(p) for p in paths)

    def pins_in(self, directory: str, prefix: str) -> list[str]:
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.startswith(prefix))


class WorkerPoolNamespaces(PinChecks):
    """NamespaceDriver backed by a pool of `workers` nsworker subprocesses.

    Concurrent requests run on different workers in parallel; a request waits for an idle
    worker when all are busy. A worker that dies is replaced; a request it was serving fails
    with StepFailed and whatever it may have pinned is unpinned. With `idle_exit`, a worker
    that served nothing for that many seconds exits (~14 MB each), and the next request that
    needs it starts it again (~50 ms, once).
    """

    #: seconds a worker may take to answer one request before it is killed and replaced
    request_timeout: float = 30.0
    #: seconds a worker may take to start, and to exit after EOF before it is killed
    start_timeout: float = 30.0
    stop_timeout: float = 5.0

    def __init__(self, workers: int = 2, python: str = sys.executable,
                 idle_exit: float | None = None) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if idle_exit is not None and idle_exit <= 0:
            raise ValueError(f"idle_exit must be > 0 seconds or None, got {idle_exit}")
        self._size = workers
        self._python = python
        self._idle_exit = idle_exit
        self._slots: list[_Worker] = []
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        # Requests in flight and the clean-up of abandoned ones: close() waits for them.
        self._tasks: set[asyncio.Task[Any]] = set()
        # Pin paths of requests in flight (until their clean-up is done, if any): a second
        # request for the same path is refused, so clean-up never removes another's pin.
        self._claimed: set[str] = set()
        self._started = False
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn the workers and wait until each is ready. Idempotent."""
        if self._closed:
            raise StepFailed(STEP, "the namespace worker pool is closed")
        if self._started:
            return
        slots = [_Worker(i, self._python) for i in range(self._size)]
        results = await asyncio.gather(*(w.spawn(self.start_timeout) for w in slots),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await asyncio.gather(*(w.stop(kill=True) for w in slots))
            raise StepFailed(STEP, f"cannot start the namespace workers: {errors[0]}") from (
                errors[0])
        self._slots = slots
        for w in slots:
            self._release(w)
        self._started = True

    async def close(self) -> None:
        """Let requests in flight finish, then stop the workers (killed after stop_timeout).
        Pinned namespaces stay pinned. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for w in self._slots:
            if w.retire_timer is not None:
                w.retire_timer.cancel()
                w.retire_timer = None
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.stop_timeout)
        await asyncio.gather(*(w.stop(timeout=self.stop_timeout) for w in self._slots))
        # A request still running now has lost its worker and is cleaning up; let it.
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.stop_timeout)

    # -- the driver -----------------------------------------------------------------------

    async def create(self, req: NamespaceRequest) -> PinnedNamespaces:
        """Create, pin and verify the namespaces of `req`. On failure (StepFailed) nothing of
        this request is left pinned; a pin path that already exists is refused and left alone.
        """
        _validate(req)
        if req.netns_path is None and req.userns_path is None:
            return PinnedNamespaces()
        if not self._started or self._closed:
            raise StepFailed(STEP, "the namespace worker pool is "
                             + ("closed" if self._closed else "not started"))
        paths = [p for p in (req.userns_path, req.netns_path) if p is not None]
        for path in paths:
            # The worker refuses too (O_EXCL); checked here so clean-up after a lost worker can
            # only remove files this request made.
            if path in self._claimed or os.path.lexists(path):
                exc = FileExistsError(errno.EEXIST, "pin path already exists", path)
                raise StepFailed(STEP, f"create of {req.sandbox_id}: {exc}") from exc
        self._claimed.update(paths)

        def release(_: object = None) -> None:
            self._claimed.difference_update(paths)

        task = self._track(self._create(req))
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            # The worker finishes the request either way (interrupting it would leave a
            # half-made pin): undo its result once it is done.
            self._track(self._undo_abandoned(task, req)).add_done_callback(release)
            raise
        except BaseException:
            release()
            raise
        release()
        return result

    async def destroy(self, netns_path: str | None, userns_path: str | None) -> None:
        """Unpin the netns, then the userns (MNT_DETACH + unlink). Idempotent: missing pins are
        not an error. Works without the pool (also before start and after close)."""
        paths = [p for p in (netns_path, userns_path) if p is not None]
        if not paths:
            return
        failed = await asyncio.to_thread(_unpin_all, paths)
        if failed:
            raise StepFailed(STEP, "cannot unpin " + "; ".join(failed))

    # -- internals ------------------------------------------------------------------------

    def _track(self, coro: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _create(self, req: NamespaceRequest) -> PinnedNamespaces:
        payload = {
            "op": "create",
            "netns_path": req.netns_path,
            "userns_path": req.userns_path,
            "uid_map": _map(req.uid_mapping),
            "gid_map": _map(req.gid_mapping),
        }
        why = ""
        # A request whose worker died before acknowledging it had no effect and is retried;
        # one more attempt than there are workers survives every worker having died idle.
        attempts = self._size + 1
        for _ in range(attempts):
            worker = await self._acquire()
            try:
                resp = await worker.call(payload, self.request_timeout)
            except _NotAccepted as exc:
                why = f"{await self._recycle(worker)} ({exc})"
                log.warning("%s before it took a request; retrying", why)
                continue
            except _Lost as exc:
                # Wait for the worker to be really gone before unpinning, so it cannot pin
                # after our clean-up.
                why = f"{await self._recycle(worker)} ({exc})"
                cleanup = await self._cleanup(req)
                raise StepFailed(STEP, f"create of {req.sandbox_id}: {why} during the "
                                 f"request; {cleanup}") from None
            except BaseException:
                # Only reached if this task itself is cancelled (event loop shutdown): the
                # worker's state is unknown, so it must not serve another request.
                worker.kill()
                self._idle.put_nowait(worker)
                raise
            self._release(worker)
            return await self._result(req, resp)
        raise StepFailed(STEP, f"create of {req.sandbox_id}: no namespace worker took the "
                         f"request in {attempts} attempts; last: {why}")

    async def _result(self, req: NamespaceRequest, resp: dict[str, Any]) -> PinnedNamespaces:
        if resp.get("ok"):
            log.debug("namespaces of %s created in %s ms", req.sandbox_id, resp.get("ms"))
            try:
                return PinnedNamespaces.model_validate(resp.get("result"))
            except ValueError as exc:
                cleanup = await self._cleanup(req)
                raise StepFailed(STEP, f"create of {req.sandbox_id}: the worker's answer "
                                 f"{resp!r} is not valid ({exc}); {cleanup}") from None
        msg = f"create of {req.sandbox_id} failed at step {resp.get('step')!r}: {resp.get('error')}"
        if resp.get("leftovers"):
            # The worker could not undo everything; try its pins once more from here.
            paths = [p for p in resp.get("leftover_paths") or [] if isinstance(p, str)]
            still = await asyncio.to_thread(_unpin_all, paths)
            others = [x for x in resp["leftovers"] if not str(x).startswith("/")]
            if still or others:
                msg += "; left on the system: " + "; ".join([*still, *map(str, others)])
        code = resp.get("errno")
        cause: Exception
        if resp.get("exists"):
            cause = FileExistsError(errno.EEXIST, "pin path already exists", resp.get("path"))
        elif isinstance(code, int):
            cause = OSError(code, str(resp.get("error")), resp.get("path"))
        else:
            cause = RuntimeError(str(resp.get("error")))
        raise StepFailed(STEP, msg) from cause

    async def _acquire(self) -> _Worker:
        worker = await self._idle.get()
        worker.uses += 1
        if self._closed:
            self._idle.put_nowait(worker)
            raise StepFailed(STEP, "the namespace worker pool is closed")
        if not worker.alive:
            # Died while idle, or its replacement failed to start earlier: replace it now.
            try:
                if worker.proc is not None:
                    log.warning("%s while idle; replacing it",
                                _describe_exit(worker.pid, worker.proc.returncode))
                    await worker.stop(kill=True)
                await worker.spawn(self.start_timeout)
            except Exception as exc:
                self._idle.put_nowait(worker)
                raise StepFailed(STEP, f"cannot start a namespace worker: {exc}") from exc
        return worker

    async def _recycle(self, worker: _Worker) -> str:
        """Kill a worker that failed, wait for its end, start a replacement. Returns what
        happened to the old one."""
        pid = worker.pid
        try:
            rc = await worker.stop(kill=True)
            what = _describe_exit(pid, rc)
            if not self._closed:
                try:
                    await worker.spawn(self.start_timeout)
                except Exception as exc:
                    # The slot stays empty; _acquire retries the start.
                    log.warning("cannot replace %s: %s", what, exc)
        finally:
            self._release(worker)
        return what

    def _release(self, worker: _Worker) -> None:
        """Back to the idle queue; with idle_exit, it retires if nobody takes it meanwhile."""
        self._idle.put_nowait(worker)
        if self._idle_exit is not None:
            if worker.retire_timer is not None:
                worker.retire_timer.cancel()
            worker.retire_timer = asyncio.get_running_loop().call_later(
                self._idle_exit, self._retire_if_idle, worker, worker.uses)

    def _retire_if_idle(self, worker: _Worker, uses: int) -> None:
        # Not taken since it was released: it is still in the idle queue, and _acquire starts
        # it again when it is next taken (its process is gone from the slot at once).
        worker.retire_timer = None
        if worker.uses == uses and worker.alive and not self._closed:
            log.debug("namespace worker pid %s idle for %g s: retiring it", worker.pid,
                      self._idle_exit)
            self._track(worker.stop(timeout=self.stop_timeout))

    async def _cleanup(self, req: NamespaceRequest) -> str:
        try:
            await self.destroy(req.netns_path, req.userns_path)
        except StepFailed as exc:
            return f"and unpinning failed too: {exc.message}"
        return "nothing of it is left pinned"

    async def _undo_abandoned(self, task: asyncio.Task[PinnedNamespaces],
                              req: NamespaceRequest) -> None:
        try:
            await task
        except BaseException:
            return  # a failed create has already undone its own pins
        try:
            await self.destroy(req.netns_path, req.userns_path)
        except StepFailed as exc:
            log.error("cancelled create of %s: %s", req.sandbox_id, exc)


def _validate(req: NamespaceRequest) -> None:
    problems = []
    for kind, mapping in (("uid", req.uid_mapping), ("gid", req.gid_mapping)):
        if (mapping is None) != (req.userns_path is None):
            problems.append(
                f"a {kind} mapping is required with userns_path" if mapping is None
                else f"a {kind} mapping needs userns_path (no user namespace requested)"
            )
        elif mapping is not None and mapping.length <= 0:
            problems.append(f"the {kind} mapping has length {mapping.length}")
    for name in ("netns_path", "userns_path"):
        path = getattr(req, name)
        if path is not None and not os.path.isabs(path):
            problems.append(f"{name} {path!r} is not absolute")
    if req.netns_path is not None and req.netns_path == req.userns_path:
        problems.append("netns_path and userns_path are the same file")
    if problems:
        raise StepFailed(STEP, f"create of {req.sandbox_id}: " + "; ".join(problems))


def _map(mapping: IDMapping | None) -> list[int] | None:
    return None if mapping is None else [mapping.container_id, mapping.host_id, mapping.length]


def _unpin_all(paths: list[str]) -> list[str]:
    failed = []
    for path in paths:
        try:
            linux.unpin(path)
        except OSError as exc:
            failed.append(f"{path}: {exc}")
    return failed
