"""The namespace worker: `python -m podfsm.drivers.nsworker`.

A long-lived, single-threaded process that creates and pins pod namespaces on request. It exists
because `unshare(CLONE_NEWUSER)` fails with EINVAL in a multi-threaded process (any asyncio
program), and because the embedding program must never fork without exec. The worker itself never
unshares: each create forks a fresh helper child that unshares, so nothing leaks from one request
into the next.

Protocol: JSON lines on stdin/stdout, one request at a time, each carrying an `id`.

On start the worker writes ``{"id": 0, "event": "ready", "pid": N}``.

For every request line the worker first writes an acknowledgement ``{"id": I, "ack": true}``
before it touches the system, so a client that sees the worker die before the ack knows the
request had no effect and may retry it elsewhere. Then it writes exactly one final response:
``{"id": I, "ok": true, "result": {...}, "ms": F}`` or
``{"id": I, "ok": false, "step": S, "error": E, "errno": N|null, "path": P|null,
"exists": B, "leftovers": [..], "leftover_paths": [..], "ms": F}``.

Requests:

- ``{"id": I, "op": "ping"}`` -> result ``{"pid", "netns_inode", "userns_inode"}`` (the worker's
  own namespaces, which never change).
- ``{"id": I, "op": "create", "netns_path": P|null, "userns_path": P|null,
  "uid_map": [container_id, host_id, length]|null, "gid_map": [...]|null}`` -> result with the
  PinnedNamespaces fields (netns_path, userns_path, netns_inode, userns_inode,
  netns_owner_inode). A mapping is required iff userns_path is given. On failure nothing this
  request pinned is left pinned (`leftovers` names what could not be undone, if anything); a pin
  path that already exists is refused with ``"exists": true`` and left alone.
- ``{"id": I, "op": "destroy", "netns_path": P|null, "userns_path": P|null}`` -> unpin both
  (MNT_DETACH + unlink), idempotent.

EOF on stdin ends the worker.

Test hooks: PODFSM_NSWORKER_TEST_HOOKS="action@stage,..." with stage one of before-maps,
before-pin, after-pin and action one of kill-child (SIGKILL the helper and wait until it is a
zombie), die (SIGKILL the worker itself, after writing the helper's pid to the file named by
PODFSM_NSWORKER_TEST_PIDFILE if set) or sleep:<ms>. They exist only so the integration tests can
prove the failure paths; nothing sets them in normal use.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sys
import time
from collections.abc import Iterable
from typing import Any, BinaryIO, NoReturn

from podfsm.drivers import linux

HOOKS_ENV = "PODFSM_NSWORKER_TEST_HOOKS"
PIDFILE_ENV = "PODFSM_NSWORKER_TEST_PIDFILE"
_STAGES = ("before-maps", "before-pin", "after-pin")

#: modes of pin directories this worker creates (an existing directory keeps its mode)
NETNS_DIR_MODE = 0o755
USERNS_DIR_MODE = 0o700
PIN_FILE_MODE = 0o444


class _Request(ValueError):
    """A malformed request."""


def _parse_hooks(spec: str) -> dict[str, list[str]]:
    hooks: dict[str, list[str]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        action, _, stage = item.partition("@")
        if stage not in _STAGES:
            raise SystemExit(f"nsworker: bad {HOOKS_ENV} item {item!r}")
        hooks.setdefault(stage, []).append(action)
    return hooks


class _Helper:
    """The forked child that owns the new namespaces until they are pinned.

    It stays our unreaped child until stop(), so its pid cannot be reused while we write its id
    maps and bind-mount its /proc/<pid>/ns files; the pidfd double-checks that.
    """

    def __init__(self) -> None:
        self.pid: int | None = None
        self.pidfd: int | None = None
        self._ready_r: int | None = None
        self._release_w: int | None = None

    def fork(self, flags: list[int]) -> None:
        ready_r, ready_w = os.pipe()
        release_r, release_w = os.pipe()
        self._ready_r, self._release_w = ready_r, release_w
        try:
            pid = os.fork()
        except BaseException:
            for fd in (ready_w, release_r):
                os.close(fd)
            raise
        if pid == 0:
            _helper_main(flags, ready_w, release_r, (ready_r, release_w))
        self.pid = pid
        os.close(ready_w)
        os.close(release_r)
        self.pidfd = os.pidfd_open(pid)

    def wait_unshared(self) -> None:
        """Block until the helper reports that it unshared (or why it could not)."""
        assert self._ready_r is not None
        msg = os.read(self._ready_r, 1024)
        if msg == b"K":
            return
        if msg.startswith(b"E"):
            code, _, text = msg[1:].decode(errors="replace").partition(":")
            raise OSError(int(code or 0), f"helper could not unshare: {text}")
        raise ChildProcessError(f"helper pid {self.pid} exited before it unshared")

    def ns_path(self, kind: str) -> str:
        return f"/proc/{self.pid}/ns/{kind}"

    def check_alive(self) -> None:
        """Raise unless the helper is still running (not exited, not reaped)."""
        assert self.pidfd is not None
        # Signal 0 through the pidfd fails with ESRCH if the process is gone; a zombie still
        # accepts it, so also ask waitid (WNOWAIT: do not reap) whether it has exited.
        signal.pidfd_send_signal(self.pidfd, 0)
        if os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            raise ChildProcessError(
                f"helper pid {self.pid} died before pinning finished (pidfd check)"
            )

    def kill_and_wait_zombie(self) -> None:
        """Test hook: kill the helper and wait until it has exited, without reaping it."""
        assert self.pidfd is not None
        signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED | os.WNOWAIT)

    def stop(self) -> None:
        """Kill and reap the helper and close every fd. Safe to call more than once."""
        pid, self.pid = self.pid, None
        try:
            if pid is not None:
                if self.pidfd is not None:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
                else:
                    # No pidfd, but the child is unreaped, so the pid is still ours.
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        finally:
            for name in ("pidfd", "_ready_r", "_release_w"):
                fd = getattr(self, name)
                if fd is not None:
                    setattr(self, name, None)
                    os.close(fd)


def _helper_main(flags: list[int], ready_w: int, release_r: int,
                 inherited: tuple[int, ...]) -> NoReturn:
    """The helper child: unshare, report, then block until killed. Never returns."""
    status = 1
    try:
        # Drop the worker's end of our pipes (so EOF reaches us when the worker dies) and its
        # stdin/stdout (so a dead worker's client sees EOF even while we linger).
        for fd in (*inherited, 0, 1):
            with contextlib.suppress(OSError):
                os.close(fd)
        try:
            for flag in flags:
                linux.unshare(flag)
        except OSError as exc:
            os.write(ready_w, f"E{exc.errno or 0}:{exc.strerror or exc}".encode(errors="replace"))
        else:
            os.write(ready_w, b"K")
            os.read(release_r, 1)  # returns only at EOF: the worker died or gave up on us
            status = 0
    finally:
        os._exit(status)


class Worker:
    """The request loop. One instance per worker process."""

    def __init__(self, hooks: dict[str, list[str]] | None = None,
                 pidfile: str | None = None) -> None:
        self.hooks = hooks or {}
        self.pidfile = pidfile
        # The worker never unshares, so these stay the host's (the embedding program's).
        self.own_netns = linux.ns_inode("/proc/self/ns/net")
        self.own_userns = linux.ns_inode("/proc/self/ns/user")

    # -- requests -------------------------------------------------------------------------

    def handle(self, req: Any) -> dict[str, Any]:
        """Answer one decoded request (without its id)."""
        t0 = time.perf_counter()
        if not isinstance(req, dict):
            return _error("request", _Request("request must be a JSON object"), t0)
        op = req.get("op")
        if op == "ping":
            return {"ok": True, "result": {"pid": os.getpid(), "netns_inode": self.own_netns,
                                           "userns_inode": self.own_userns}}
        if op == "create":
            return self.create(req, t0)
        if op == "destroy":
            return self.destroy(req, t0)
        return _error("request", _Request(f"unknown op {op!r}"), t0)

    def create(self, req: dict[str, Any], t0: float) -> dict[str, Any]:
        """Create the namespaces in a fresh helper, write the id maps, pin, verify."""
        try:
            netns = _opt_path(req, "netns_path")
            userns = _opt_path(req, "userns_path")
            uid_map = _opt_map(req, "uid_map")
            gid_map = _opt_map(req, "gid_map")
            if (uid_map is None or gid_map is None) != (userns is None):
                raise _Request("uid_map and gid_map are required iff userns_path is given")
            if netns is None and userns is None:
                raise _Request("nothing to create: neither netns_path nor userns_path")
            if netns == userns:
                raise _Request("netns_path and userns_path must differ")
        except _Request as exc:
            return _error("request", exc, t0)

        helper = _Helper()
        pinned: list[str] = []  # pin files this request created: the only ones undone
        step = "fork helper"
        try:
            # Two unshare calls, user first: the netns is then created inside, and owned by,
            # the new user namespace.
            flags = ([linux.CLONE_NEWUSER] if userns else []) + (
                [linux.CLONE_NEWNET] if netns else [])
            helper.fork(flags)
            step = "unshare"
            helper.wait_unshared()
            self._hooks("before-maps", helper)
            if uid_map is not None and gid_map is not None:
                # setgroups is deliberately left "allow" (containerd #10742).
                step = "write uid_map"
                _write_map(helper, "uid_map", uid_map)
                step = "write gid_map"
                _write_map(helper, "gid_map", gid_map)
            self._hooks("before-pin", helper)
            if userns is not None:
                step = "pin user namespace"
                _pin(helper.ns_path("user"), userns, USERNS_DIR_MODE, pinned)
            if netns is not None:
                step = "pin network namespace"
                _pin(helper.ns_path("net"), netns, NETNS_DIR_MODE, pinned)
            self._hooks("after-pin", helper)
            step = "check helper alive"
            helper.check_alive()
            step = "stop helper"
            helper.stop()
            step = "verify"
            result = self._verify(netns, userns)
        except Exception as exc:
            leftovers = _unpin_all(reversed(pinned))
            helper_pid = helper.pid
            try:
                helper.stop()
            except OSError as stop_exc:
                leftovers.append((f"helper pid {helper_pid}", str(stop_exc)))
            return _error(step, exc, t0, leftovers)
        return {"ok": True, "result": result, "ms": _ms(t0)}

    def destroy(self, req: dict[str, Any], t0: float) -> dict[str, Any]:
        """Unpin the netns, then the userns. Missing pins are not an error."""
        try:
            paths = [p for p in (_opt_path(req, "netns_path"), _opt_path(req, "userns_path"))
                     if p is not None]
        except _Request as exc:
            return _error("request", exc, t0)
        failed = _unpin_all(paths)
        if failed:
            text = "; ".join(f"{path}: {err}" for path, err in failed)
            return _error("unpin", RuntimeError(text), t0, failed)
        return {"ok": True, "result": {}, "ms": _ms(t0)}

    def _verify(self, netns: str | None, userns: str | None) -> dict[str, Any]:
        userns_ino = netns_ino = owner = None
        if userns is not None:
            userns_ino = linux.ns_inode(userns)
            if userns_ino == self.own_userns:
                raise RuntimeError(f"{userns} pins the host's user namespace, not a new one")
        if netns is not None:
            netns_ino = linux.ns_inode(netns)
            if netns_ino == self.own_netns:
                raise RuntimeError(f"{netns} pins the host's network namespace, not a new one")
            owner = linux.netns_owner_inode(netns)
            want = userns_ino if userns_ino is not None else self.own_userns
            if owner != want:
                raise RuntimeError(
                    f"{netns} is owned by user namespace inode {owner}, expected {want}"
                )
        return {"netns_path": netns, "userns_path": userns, "netns_inode": netns_ino,
                "userns_inode": userns_ino, "netns_owner_inode": owner}

    def _hooks(self, stage: str, helper: _Helper) -> None:
        for action in self.hooks.get(stage, ()):
            if action == "kill-child":
                helper.kill_and_wait_zombie()
            elif action == "die":
                if self.pidfile:
                    with open(self.pidfile, "w") as f:
                        f.write(f"{helper.pid}\n")
                os.kill(os.getpid(), signal.SIGKILL)
            elif action.startswith("sleep:"):
                time.sleep(float(action.removeprefix("sleep:")) / 1000)
            else:
                raise RuntimeError(f"unknown test hook action {action!r}")

    # -- loop -----------------------------------------------------------------------------

    def serve(self, inp: BinaryIO, out_fd: int) -> int:
        """Answer requests from `inp` until EOF (or until the client is gone)."""
        try:
            _send(out_fd, {"id": 0, "event": "ready", "pid": os.getpid()})
            for line in inp:
                try:
                    req = json.loads(line)
                except ValueError as exc:
                    _send(out_fd, {"id": None, **_error("request", exc, time.perf_counter())})
                    continue
                rid = req.get("id") if isinstance(req, dict) else None
                _send(out_fd, {"id": rid, "ack": True})
                _send(out_fd, {"id": rid, **self.handle(req)})
        except BrokenPipeError:
            pass  # the client went away: nothing left to answer
        return 0


def _opt_path(req: dict[str, Any], key: str) -> str | None:
    value = req.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not os.path.isabs(value) or "\0" in value:
        raise _Request(f"{key} must be an absolute path, got {value!r}")
    return os.path.normpath(value)


def _opt_map(req: dict[str, Any], key: str) -> tuple[int, int, int] | None:
    value = req.get(key)
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                       for v in value)):
        raise _Request(f"{key} must be [container_id, host_id, length], got {value!r}")
    return (value[0], value[1], value[2])


def _write_map(helper: _Helper, name: str, mapping: tuple[int, int, int]) -> None:
    path = f"/proc/{helper.pid}/{name}"
    line = "{} {} {}\n".format(*mapping)
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        # The kernel takes the whole map in a single write.
        os.write(fd, line.encode())
    except OSError as exc:
        raise OSError(exc.errno, f"writing {line.strip()!r}: {exc.strerror}", path) from None
    finally:
        os.close(fd)


def _pin(source: str, target: str, dir_mode: int, pinned: list[str]) -> None:
    os.makedirs(os.path.dirname(target), mode=dir_mode, exist_ok=True)
    try:
        fd = os.open(target, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     PIN_FILE_MODE)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "pin path already exists", target) from None
    pinned.append(target)
    os.close(fd)
    try:
        linux.mount(source, target, None, linux.MS_BIND)
    except OSError as exc:
        # linux names only the target; ENOENT here usually means the source is gone.
        raise OSError(exc.errno, f"bind-mounting {source}: {os.strerror(exc.errno or 0)}",
                      target) from None


def _unpin_all(paths: Iterable[str]) -> list[tuple[str, str]]:
    """Unpin each path; return (path, error) for those that could not be unpinned."""
    failed = []
    for path in paths:
        try:
            linux.unpin(path)
        except OSError as exc:
            failed.append((path, str(exc)))
    return failed


def _error(step: str, exc: BaseException, t0: float,
           leftovers: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    is_os = isinstance(exc, OSError)
    text = str(exc) if is_os or isinstance(exc, _Request) else f"{type(exc).__name__}: {exc}"
    return {
        "ok": False,
        "step": step,
        "error": text,
        "errno": exc.errno if isinstance(exc, OSError) else None,
        "path": exc.filename if isinstance(exc, OSError) else None,
        "exists": isinstance(exc, FileExistsError),
        # what could not be undone: "what: why" for people, and the pin paths among them
        "leftovers": [f"{what}: {why}" for what, why in leftovers or ()],
        "leftover_paths": [what for what, _ in leftovers or () if what.startswith("/")],
        "ms": _ms(t0),
    }


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 3)


def _send(fd: int, msg: dict[str, Any]) -> None:
    data = json.dumps(msg, separators=(",", ":")).encode() + b"\n"
    while data:
        data = data[os.write(fd, data):]


def main() -> int:
    """Entry point of `python -m podfsm.drivers.nsworker`."""
    # The embedding program decides when we stop (EOF on stdin); a terminal's Ctrl-C must not
    # kill us mid-request and leave a half-made pin behind.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Pin files and directories get exactly the modes asked for.
    os.umask(0o022)
    # Nothing but the protocol may reach fd 1: stray prints go to stderr.
    sys.stdout = sys.stderr
    worker = Worker(_parse_hooks(os.environ.get(HOOKS_ENV, "")),
                    os.environ.get(PIDFILE_ENV) or None)
    return worker.serve(sys.stdin.buffer, 1)


if __name__ == "__main__":
    sys.exit(main())
