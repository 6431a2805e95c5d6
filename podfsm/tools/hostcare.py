"""Leaving the host as it was found, for the tools that run real pods on their own network
(`podfsm demo`, `podfsm bench`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator

from podfsm.drivers.runtime import cgroup_parent_dirs, remove_new_dirs

CNI_STORE = "/var/lib/cni/networks"
_FORWARD = "/proc/sys/net/ipv4/ip_forward"


@contextlib.contextmanager
def host_left_as_found(network: str, bridge: str) -> Iterator[None]:
    """Afterwards: the tool's own bridge is gone, ip_forward (which the bridge plugin's
    isGateway turns on) has its old value, the network's host-local store is gone, and the CNI
    store and cgroup parent directories the run created are removed again."""
    bridge_existed = os.path.exists(f"/sys/class/net/{bridge}")
    made = [d for d in (os.path.dirname(CNI_STORE), CNI_STORE) if not os.path.exists(d)]
    cgroups = cgroup_parent_dirs()
    with open(_FORWARD) as f:
        forward = f.read()
    try:
        yield
    finally:
        remove_new_dirs(cgroups)
        if not bridge_existed and os.path.exists(f"/sys/class/net/{bridge}"):
            subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False)
        with open(_FORWARD, "w") as f:
            f.write(forward)
        shutil.rmtree(os.path.join(CNI_STORE, network), ignore_errors=True)
        for d in reversed(made):
            with contextlib.suppress(OSError):
                os.rmdir(d)
