"""route_localnet of the pods' bridge: on while a pod that needs it is attached, then put back.

portmap (with ``snat``, its default) sets ``net.ipv4.conf.<bridge>.route_localnet=1`` at every
ADD of a pod with an IPv4 host port, so that a connection from the host to 127.0.0.1:host_port
can be routed to the pod, and never puts it back. While it is 1, the bridge also takes packets
for 127.0.0.0/8 from the pods, which can then reach the host's loopback-only services
(Kubernetes' CVE-2020-8558 was this setting). podfsm keeps it for as long as a pod that may be
reached through 127.0.0.1 is attached, and then writes back the value the bridge had before
podfsm's first such pod.

The holders are files under ``run_dir/route_localnet/<bridge>/`` (one per sandbox, and
``.before`` with the value to put back), so a restart of the daemon keeps count. Every call is
a few file operations, synchronous: a holder is written before the ADD whose portmap sets the
value, and the count is read and the value written back with nothing awaited in between, so
no ADD of this daemon can slip between them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Iterable

from podfsm.core.spec import PortMapping

_BEFORE = ".before"


def _sysctl(bridge: str) -> str:
    return f"/proc/sys/net/ipv4/conf/{bridge}/route_localnet"


def needs_localnet(port_mappings: Iterable[PortMapping]) -> bool:
    """Whether portmap sets route_localnet for these mappings: an IPv4 (or any-family) host
    port."""
    return any(pm.host_port > 0 and (not pm.host_ip
                                     or ipaddress.ip_address(pm.host_ip).version == 4)
               for pm in port_mappings)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


class LocalnetHolds:
    """The pods that hold route_localnet on each bridge, and what to put back after them."""

    def __init__(self, run_dir: str) -> None:
        self.dir = os.path.join(run_dir, "route_localnet")

    def hold(self, bridge: str, sandbox_id: str) -> None:
        """Count `sandbox_id` as needing route_localnet on `bridge` (before its ADD). The first
        holder notes the value to put back: the bridge's, or the default an interface made now
        gets."""
        d = os.path.join(self.dir, bridge)
        os.makedirs(d, mode=0o700, exist_ok=True)
        before = os.path.join(d, _BEFORE)
        if not os.path.exists(before):
            value = _read(_sysctl(bridge)) or _read(_sysctl("default")) or "0"
            with open(before + ".tmp", "w") as f:
                f.write(value)
            os.replace(before + ".tmp", before)
        with open(os.path.join(d, sandbox_id), "w"):
            pass

    def release(self, bridge: str, sandbox_id: str) -> None:
        """`sandbox_id` no longer needs it (after its DEL); when no holder is left, put the
        value back. Idempotent."""
        d = os.path.join(self.dir, bridge)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(d, sandbox_id))
        try:
            left = [n for n in os.listdir(d) if not n.startswith(_BEFORE)]
        except FileNotFoundError:
            return
        if left:
            return
        before = _read(os.path.join(d, _BEFORE))
        if before is not None:
            try:
                with open(_sysctl(bridge), "w") as f:
                    f.write(before)
            except FileNotFoundError:
                pass  # the bridge is gone, and its setting with it
        for name in (_BEFORE, _BEFORE + ".tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(d, name))
        for empty in (d, self.dir):
            with contextlib.suppress(OSError):
                os.rmdir(empty)
