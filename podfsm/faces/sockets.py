"""Unix socket files of the faces (HTTP and CRI): one way to take over a stale one and to remove
one's own."""

from __future__ import annotations

import contextlib
import os
import socket
import stat


def stale_socket_problem(path: str) -> str | None:
    """Make `path` free for a new socket: remove a socket file nobody answers on (a daemon that
    died left it). Returns why it cannot be taken (another file, or a live server), else None."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(st.st_mode):
        return f"{path} exists and is not a socket: refusing to replace it"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
            return None
    return f"another server already answers on {path}"


def unlink_if_ours(path: str, inode: int) -> None:
    """Remove the socket file if it is still the one we bound (a successor may have replaced it)."""
    with contextlib.suppress(OSError):
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
