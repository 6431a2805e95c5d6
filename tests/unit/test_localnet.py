"""The holders of a bridge's route_localnet (podfsm.drivers.localnet): counted on disk, and the
value put back only when the last one is gone. A bridge that does not exist here is used, so
no sysctl of this machine is written; tests/integration/test_ports_sysctls.py checks a real
bridge's value."""

from __future__ import annotations

import os
from pathlib import Path

from podfsm.core.spec import PortMapping
from podfsm.drivers.localnet import LocalnetHolds, needs_localnet

BRIDGE = "pfsm-no-such-br"


def test_holders_are_counted_across_instances_and_the_last_one_clears(tmp_path: Path) -> None:
    holds = LocalnetHolds(str(tmp_path))
    holds.hold(BRIDGE, "a")
    holds.hold(BRIDGE, "b")
    d = tmp_path / "route_localnet" / BRIDGE
    # the value to put back: the bridge's, or (no such bridge) the one new interfaces get
    default = Path("/proc/sys/net/ipv4/conf/default/route_localnet").read_text().strip()
    assert (d / ".before").read_text() == default
    holds.release(BRIDGE, "a")
    assert sorted(os.listdir(d)) == [".before", "b"]
    # a restarted daemon finds the holders on disk
    again = LocalnetHolds(str(tmp_path))
    again.release(BRIDGE, "a")  # idempotent
    assert sorted(os.listdir(d)) == [".before", "b"]
    again.release(BRIDGE, "b")
    assert not (tmp_path / "route_localnet").exists()
    again.release(BRIDGE, "b")


def test_which_mappings_need_route_localnet() -> None:
    def pm(**kw: object) -> PortMapping:
        return PortMapping.model_validate({"container_port": 80, **kw})

    assert needs_localnet([pm(host_port=8080)])
    assert needs_localnet([pm(host_port=8080, host_ip="127.0.0.1")])
    assert not needs_localnet([pm(host_port=8080, host_ip="::1")])
    assert not needs_localnet([pm()])  # no host port publishes nothing
    assert not needs_localnet([])
