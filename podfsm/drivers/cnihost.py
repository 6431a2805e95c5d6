"""What the CNI driver (:mod:`podfsm.drivers.cni`) reads and handles beside running the plugins'
chains: a plugin's failure and its JSON result, the config directory, the IPAM reservations on
disk, the pod's network namespace (opened by path, checked live) and a netlink socket made inside
it, and a link's counters.

Everything here is importable from :mod:`podfsm.drivers.cni` as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import socket
import threading
from collections.abc import Sequence
from typing import Any

from podfsm.core import cniconf
from podfsm.core.errors import StepFailed
from podfsm.drivers import linux

STEP = "cni"
_NETLINK_ROUTE = 0


class _PluginFailed(Exception):
    """One plugin run failed; `message` is the plugin's own words."""

    def __init__(self, plugin: str, command: str, message: str) -> None:
        super().__init__(f"{plugin} {command} failed: {message}")
        self.plugin = plugin
        self.command = command
        self.message = message


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the plugin's process group (not reaped yet: its id cannot have been reused)."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


def _json_object(out: bytes, plugin: str) -> dict[str, Any]:
    try:
        obj = json.loads(out)
    except (ValueError, UnicodeDecodeError):
        obj = None
    if not isinstance(obj, dict):
        text = out.decode("utf-8", "replace").strip()[:200]
        raise _PluginFailed(plugin, "ADD", f"succeeded but printed no JSON result: {text!r}")
    return obj


def _read_conf_dir(conf_dir: str) -> dict[str, str | bytes]:
    """File name -> content of the CNI config candidates in `conf_dir` ({} if it does not
    exist). Directories are skipped, as libcni does. Bytes, so that a bad encoding is reported
    by the parser with the file's name."""
    out: dict[str, str | bytes] = {}
    try:
        entries = list(os.scandir(conf_dir))
    except FileNotFoundError:
        return out
    for entry in entries:
        if not entry.name.endswith(cniconf.CONF_EXTENSIONS) or entry.is_dir():
            continue
        with open(entry.path, "rb") as f:
            out[entry.name] = f.read()
    return out


def _read_reservations(dirs: Sequence[str]) -> set[str]:
    ids: set[str] = set()
    for d in dirs:
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            continue
        for name in names:
            if not cniconf.is_host_local_reservation(name):
                continue
            try:
                with open(os.path.join(d, name), encoding="utf-8", errors="replace") as f:
                    owner = cniconf.reservation_owner(f.read(4096))
            except FileNotFoundError:
                continue  # released while we were listing
            if owner:
                ids.add(owner)
    return ids


def _open_netns(path: str) -> int:
    """An O_RDONLY fd of the network namespace at `path`; StepFailed if it is not one.

    Never O_CREAT: a missing pin must stay missing (pyroute2's default would create a netns).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise StepFailed(STEP, f"network namespace {path} does not exist") from None
    except OSError as exc:
        raise StepFailed(STEP, f"cannot open network namespace {path}: {exc}") from None
    try:
        nstype = fcntl.ioctl(fd, linux.NS_GET_NSTYPE)
    except OSError:
        nstype = -1
    if nstype != linux.CLONE_NEWNET:
        os.close(fd)
        # A pin file whose mount is gone is an ordinary empty file: the namespace is gone.
        raise StepFailed(STEP, f"{path} is not a network namespace (not pinned any more?)")
    return fd


def _live_netns(path: str | None) -> str:
    """`path` if it is a network namespace now, else "" (what CNI DEL takes for 'gone').

    An unmounted pin file would make bridge's DEL fail on "unknown FS magic"; an empty
    CNI_NETNS makes every plugin skip the namespace and still release its resources.
    """
    if not path:
        return ""
    try:
        os.close(_open_netns(path))
    except StepFailed:
        return ""
    return path


async def _netlink_socket_in(netns_path: str) -> socket.socket:
    """A NETLINK_ROUTE socket created inside the netns at `netns_path`.

    A socket belongs to the netns it was created in, and setns(CLONE_NEWNET) moves only the
    calling thread, so a fresh thread enters the netns, creates the socket and ends: no fork
    (unlike pyroute2's netns=, which forks a helper), and no pool thread is left inside a pod's
    netns. Raises StepFailed if the path is not a network namespace.
    """
    fd = _open_netns(netns_path)
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[socket.socket] = loop.create_future()

    def deliver(sock: socket.socket | None, exc: BaseException | None) -> None:
        if fut.cancelled():
            if sock is not None:
                sock.close()
        elif exc is not None:
            fut.set_exception(exc)
        else:
            assert sock is not None
            fut.set_result(sock)

    def work() -> None:
        sock: socket.socket | None = None
        error: BaseException | None = None
        try:
            linux.setns(fd, linux.CLONE_NEWNET)
            sock = socket.socket(
                socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, _NETLINK_ROUTE
            )
        except OSError as exc:
            error = StepFailed(STEP, f"cannot enter network namespace {netns_path}: {exc}")
        except Exception as exc:
            error = exc
        finally:
            os.close(fd)
        try:
            loop.call_soon_threadsafe(deliver, sock, error)
        except RuntimeError:  # the loop closed meanwhile
            if sock is not None:
                sock.close()

    thread = threading.Thread(target=work, name="podfsm-netns-socket", daemon=True)
    try:
        thread.start()
    except BaseException:
        os.close(fd)
        raise
    return await fut


def _counters(stats: Any) -> dict[str, int]:
    """rx/tx bytes and errors from a link's IFLA_STATS64 (or IFLA_STATS)."""
    if not stats:
        return {}
    return {k: int(stats.get(k) or 0) for k in ("rx_bytes", "rx_errors", "tx_bytes", "tx_errors")}
