"""CniNetwork against the real kernel and Debian's CNI plugins (needs root).

Every test uses its own conf dir, network name, bridge and /24 in 10.231-239.x, its own pinned
namespaces under tmp_path, and removes all of it (DEL, unpin, bridge, host-local store) even
when it fails. The module restores net.ipv4.ip_forward, which isGateway turns on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import random
import secrets
import shutil
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from podfsm.core import cniconf
from podfsm.core.errors import PrerequisiteMissing, StepFailed
from podfsm.core.requests import NetworkRequest
from podfsm.drivers import linux
from podfsm.drivers.base import NetworkDriver
from podfsm.drivers.cni import CniNetwork
from podfsm.drivers.reaperclient import ReaperClient

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

IP_FORWARD = "/proc/sys/net/ipv4/ip_forward"
STORE = "/var/lib/cni/networks"
ID_MAP = "0 100000 65536"


async def run(*argv: str) -> tuple[int, str]:
    """Run a command without a shell; (exit status, stdout+stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def make_netns(pin: Path, userns: bool) -> None:
    """Pin a new netns at `pin`; with `userns`, the netns is owned by a new user namespace
    mapped to 100000-165535 (the design's recipe: fork, unshare, map from the parent, bind)."""
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.close(ready_r)
            os.close(done_w)
            if userns:
                linux.unshare(linux.CLONE_NEWUSER)
            linux.unshare(linux.CLONE_NEWNET)
            os.write(ready_w, b"1")
            os.read(done_r, 1)  # hold the namespaces until the parent has pinned them
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(done_r)
    try:
        if os.read(ready_r, 1) != b"1":
            raise RuntimeError("namespace child failed to unshare")
        if userns:
            for name in ("uid_map", "gid_map"):
                with open(f"/proc/{pid}/{name}", "w") as f:
                    f.write(ID_MAP)
        os.close(os.open(pin, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444))
        linux.mount(f"/proc/{pid}/ns/net", str(pin), None, linux.MS_BIND)
    finally:
        os.close(done_w)
        os.close(ready_r)
        os.waitpid(pid, 0)


def _free_subnet() -> ipaddress.IPv4Network:
    """A random /24 in 10.231.0.0-10.239.255.0 that no host route overlaps."""
    used: list[ipaddress.IPv4Network] = []
    with open("/proc/net/route") as f:
        next(f)
        for line in f:
            parts = line.split()
            dst = ipaddress.IPv4Address(int(parts[1], 16).to_bytes(4, "little"))
            mask = ipaddress.IPv4Address(int(parts[7], 16).to_bytes(4, "little"))
            used.append(ipaddress.IPv4Network(f"{dst}/{mask}", strict=False))
    for _ in range(100):
        net = ipaddress.IPv4Network(
            f"10.{random.randint(231, 239)}.{random.randint(0, 255)}.0/24"
        )
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise RuntimeError("no free test subnet in 10.231-239")


@dataclass
class Net:
    """One test's private network: names, a conf dir, and everything to clean up."""

    tmp: Path
    name: str
    bridge: str
    subnet: ipaddress.IPv4Network
    conf_dir: Path
    #: plugins run by a reaper of this run dir (as the controller runs them), else directly
    reaper_run_dir: str | None = None
    pins: list[Path] = field(default_factory=list)
    attached: list[tuple[CniNetwork, NetworkRequest]] = field(default_factory=list)
    drivers: list[CniNetwork] = field(default_factory=list)

    def conflist(self) -> dict[str, Any]:
        return cniconf.default_conflist(self.name, self.bridge, str(self.subnet))

    def write_conf(self, conf: dict[str, Any], filename: str = "10-test.conflist") -> None:
        self.conf_dir.mkdir(exist_ok=True)
        (self.conf_dir / filename).write_text(json.dumps(conf))

    def driver(
        self,
        bin_dirs: tuple[str, ...] = ("/opt/cni/bin", "/usr/lib/cni"),
        plugin_timeout: float = 60.0,
    ) -> CniNetwork:
        # Default names are ours too, so a test reaching the shipped default stays private.
        drv = CniNetwork(
            conf_dir=str(self.conf_dir), bin_dirs=bin_dirs, default_name=self.name,
            default_bridge=self.bridge, default_subnet=str(self.subnet),
            plugin_timeout=plugin_timeout, reaper_run_dir=self.reaper_run_dir,
        )
        self.drivers.append(drv)
        return drv

    def script_plugin(self, name: str, text: str) -> tuple[str, ...]:
        """Install a shell-script plugin; the bin dirs to use, its dir first."""
        bin_dir = self.tmp / "bin"
        bin_dir.mkdir(exist_ok=True)
        plugin = bin_dir / name
        plugin.write_text(text)
        plugin.chmod(0o755)
        return (str(bin_dir), "/opt/cni/bin", "/usr/lib/cni")

    def pin(self, userns: bool = True) -> str:
        path = self.tmp / f"netns-{len(self.pins)}"
        self.pins.append(path)
        make_netns(path, userns)
        return str(path)

    def request(self, drv: CniNetwork, netns: str | None) -> NetworkRequest:
        req = NetworkRequest(
            sandbox_id=secrets.token_hex(32), netns_path=netns, pod_name="p",
            pod_namespace="default", pod_uid=secrets.token_hex(8),
        )
        self.attached.append((drv, req))
        return req


@pytest.fixture(scope="module", autouse=True)
def restore_host() -> Iterator[None]:
    """Put back ip_forward, and drop host-local's top directories if this module made them."""
    with open(IP_FORWARD) as f:
        forward = f.read()
    made = [d for d in ("/var/lib/cni", STORE) if not os.path.exists(d)]
    yield
    with open(IP_FORWARD, "w") as f:
        f.write(forward)
    for d in reversed(made):
        with contextlib.suppress(OSError):  # not empty: someone else uses it now
            os.rmdir(d)


@pytest.fixture(params=["direct", "reaper"])
async def net(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Net]:
    """A private network; its drivers run the plugins themselves ("direct") or, as the
    controller's do, through a reaper: each plugin chain is then one `chain` request."""
    suffix = secrets.token_hex(2)
    run_dir = tempfile.mkdtemp(prefix="pfsmt-") if request.param == "reaper" else None
    n = Net(
        tmp=tmp_path, name=f"pfsmt-{suffix}", bridge=f"pfsmt{suffix}",
        subnet=_free_subnet(), conf_dir=tmp_path / "net.d", reaper_run_dir=run_dir,
    )
    n.conf_dir.mkdir()
    try:
        yield n
    finally:
        for drv, req in n.attached:
            with contextlib.suppress(Exception):
                await drv.detach(req, None)
        for drv in n.drivers:
            await drv.close()
        if run_dir is not None:
            reaper = ReaperClient(run_dir)
            await reaper.connect()  # the drivers' one, still there (idle, for seconds)
            await reaper.shutdown()
            shutil.rmtree(run_dir, ignore_errors=True)
        for pin in n.pins:
            linux.unpin(str(pin))
        await run("ip", "link", "del", n.bridge)
        shutil.rmtree(os.path.join(STORE, n.name), ignore_errors=True)


async def started(drv: CniNetwork) -> CniNetwork:
    await drv.start()
    return drv


def reservation(net_name: str, ip: str, store: str = STORE) -> str | None:
    try:
        with open(os.path.join(store, net_name, ip)) as f:
            return f.read().splitlines()[0]
    except FileNotFoundError:
        return None


async def veths_on(bridge: str) -> list[str]:
    rc, out = await run("ip", "-j", "link", "show", "master", bridge)
    if rc != 0:  # no such bridge: nothing can be attached to it
        return []
    return [link["ifname"] for link in json.loads(out or "[]")]


# -- tests --------------------------------------------------------------------------------------


async def test_add_check_del_in_a_userns_owned_netns(net: Net) -> None:
    net.write_conf(net.conflist())
    drv = await started(net.driver())
    as_protocol: NetworkDriver = drv  # CniNetwork is a NetworkDriver
    assert as_protocol is drv and drv.network_name == net.name
    assert drv.conflist.source.endswith("10-test.conflist")
    assert not drv.separate_loopback

    pin = net.pin(userns=True)
    assert linux.netns_owner_inode(pin) != os.stat("/proc/self/ns/user").st_ino
    req = net.request(drv, pin)
    res = await drv.attach(req)

    assert ipaddress.IPv4Address(res.ip) in net.subnet
    assert res.network_name == net.name and res.ifname == "eth0"
    assert res.additional_ips == []
    assert any(i.name == "eth0" and i.sandbox == pin for i in res.interfaces)

    ifaces = {i.name: i for i in await drv.interfaces(pin)}
    assert f"{res.ip}/{net.subnet.prefixlen}" in ifaces["eth0"].addresses
    assert ifaces["eth0"].up
    assert ifaces["lo"].up
    assert "127.0.0.1/8" in ifaces["lo"].addresses

    rc, out = await run("ping", "-c1", "-W1", res.ip)
    assert rc == 0, out

    assert reservation(net.name, res.ip) == req.sandbox_id
    assert req.sandbox_id in await drv.reserved_container_ids()

    await drv.check(req, res)

    await drv.detach(req, res)
    assert reservation(net.name, res.ip) is None
    assert req.sandbox_id not in await drv.reserved_container_ids()
    assert "eth0" not in {i.name for i in await drv.interfaces(pin)}
    await drv.detach(req, res)  # idempotent
    await drv.detach(req, None)
    with pytest.raises(StepFailed, match="CHECK failed"):
        await drv.check(req, res)


async def test_plain_netns_with_the_shipped_default(net: Net) -> None:
    drv = await started(net.driver())  # empty conf dir: the default, with this test's names
    assert drv.conflist.source == "<default>"
    assert drv.conflist.plugin_types == ("bridge", "portmap", "loopback")
    pin = net.pin(userns=False)
    req = net.request(drv, pin)
    res = await drv.attach(req)
    assert ipaddress.IPv4Address(res.ip) in net.subnet
    rc, out = await run("ping", "-c1", "-W1", res.ip)
    assert rc == 0, out
    await drv.check(req, res)
    await drv.detach(req, res)
    assert reservation(net.name, res.ip) is None


async def test_del_after_the_netns_is_gone_still_releases(net: Net) -> None:
    net.write_conf(net.conflist())
    drv = await started(net.driver())
    pins = [net.pin(), net.pin()]
    reqs = [net.request(drv, p) for p in pins]
    results = [await drv.attach(r) for r in reqs]
    for r, res in zip(reqs, results, strict=True):
        assert reservation(net.name, res.ip) == r.sandbox_id

    linux.unpin(pins[0])  # the path is gone
    await drv.detach(reqs[0], results[0])
    assert reservation(net.name, results[0].ip) is None

    linux.unpin(pins[1])
    Path(pins[1]).touch()  # a stale, unmounted pin file left at the path
    await drv.detach(NetworkRequest(sandbox_id=reqs[1].sandbox_id, netns_path=pins[1]), None)
    assert reservation(net.name, results[1].ip) is None
    # and with no path at all
    await drv.detach(NetworkRequest(sandbox_id=reqs[1].sandbox_id, netns_path=None), None)
    # The kernel frees a dead netns (and the host ends of its veths) from a workqueue, a
    # little after the last reference went.
    for _ in range(100):
        if not await veths_on(net.bridge):
            break
        await asyncio.sleep(0.05)
    assert await veths_on(net.bridge) == []


async def test_missing_plugin_is_a_missing_prerequisite(net: Net) -> None:
    conf = net.conflist()
    conf["plugins"].append({"type": "pfsm-no-such-plugin"})
    net.write_conf(conf)
    with pytest.raises(PrerequisiteMissing, match="pfsm-no-such-plugin") as err:
        await net.driver().start()
    assert "/usr/lib/cni" in str(err.value) and "/opt/cni/bin" in str(err.value)

    nowhere = (str(net.tmp / "no-bin-a"), str(net.tmp / "no-bin-b"))
    with pytest.raises(PrerequisiteMissing, match="install containernetworking-plugins") as err:
        await net.driver(bin_dirs=nowhere).start()
    assert nowhere[0] in str(err.value)


async def test_broken_config_file_is_named(net: Net) -> None:
    net.write_conf({"cniVersion": "1.0.0", "name": net.name, "plugins": [{"bridge": "x"}]})
    with pytest.raises(ValueError, match=r"10-test\.conflist: field 'plugins\[0\]\.type'"):
        await net.driver().start()


FAILING_PLUGIN = """#!/bin/sh
cat >/dev/null
if [ "$CNI_COMMAND" = ADD ]; then
  printf '%s' '{"cniVersion":"1.0.0","code":7,"msg":"pfsm test failure","details":"by design"}'
  exit 1
fi
exit 0
"""


async def test_failing_plugin_rolls_back_everything(net: Net) -> None:
    bin_dirs = net.script_plugin("pfsmfail", FAILING_PLUGIN)
    conf = net.conflist()
    conf["plugins"].insert(1, {"type": "pfsmfail"})  # after bridge, before loopback
    net.write_conf(conf)
    drv = await started(net.driver(bin_dirs=bin_dirs))

    pin = net.pin()
    req = net.request(drv, pin)
    with pytest.raises(StepFailed) as err:
        await drv.attach(req)
    msg = str(err.value)
    assert "pfsmfail ADD failed" in msg
    assert "pfsm test failure" in msg and "by design" in msg and "code 7" in msg
    assert "undoing" not in msg
    assert err.value.step == "cni"

    assert req.sandbox_id not in await drv.reserved_container_ids()
    store = os.path.join(STORE, net.name)
    assert [f for f in os.listdir(store) if cniconf.is_host_local_reservation(f)] == []
    assert await veths_on(net.bridge) == []
    assert "eth0" not in {i.name for i in await drv.interfaces(pin)}


HANGING_PLUGIN = """#!/bin/sh
cat >/dev/null
if [ "$CNI_COMMAND" = ADD ]; then exec sleep 30; fi
exit 0
"""


async def test_hung_plugin_is_killed_and_rolled_back(net: Net) -> None:
    bin_dirs = net.script_plugin("pfsmhang", HANGING_PLUGIN)
    conf = net.conflist()
    conf["plugins"].insert(1, {"type": "pfsmhang"})
    net.write_conf(conf)
    drv = await started(net.driver(bin_dirs=bin_dirs, plugin_timeout=0.5))
    req = net.request(drv, net.pin())
    t0 = time.monotonic()
    with pytest.raises(StepFailed, match=r"pfsmhang ADD failed: no answer within 0\.5 s"):
        await drv.attach(req)
    assert time.monotonic() - t0 < 5
    assert req.sandbox_id not in await drv.reserved_container_ids()
    assert await veths_on(net.bridge) == []


async def test_interfaces_of_a_missing_netns_raises_and_creates_nothing(net: Net) -> None:
    drv = await started(net.driver())
    missing = net.tmp / "no-such-netns"
    with pytest.raises(StepFailed, match="does not exist"):
        await drv.interfaces(str(missing))
    assert not missing.exists()
    plain = net.tmp / "plain-file"
    plain.write_text("")
    with pytest.raises(StepFailed, match="not a network namespace"):
        await drv.interfaces(str(plain))


async def test_chain_without_loopback_gets_a_separate_loopback(net: Net) -> None:
    conf = net.conflist()
    conf["plugins"] = [p for p in conf["plugins"] if p["type"] != "loopback"]
    net.write_conf(conf)
    drv = await started(net.driver())
    assert drv.separate_loopback
    pin = net.pin()
    req = net.request(drv, pin)
    res = await drv.attach(req)
    ifaces = {i.name: i for i in await drv.interfaces(pin)}
    assert ifaces["lo"].up
    assert res.ip and ipaddress.IPv4Address(res.ip) in net.subnet  # not 127.0.0.1
    await drv.check(req, res)
    await drv.detach(req, res)
    assert reservation(net.name, res.ip) is None


async def test_ipam_data_dir_is_where_reservations_are_read(net: Net) -> None:
    data_dir = net.tmp / "ipam"
    conf = net.conflist()
    conf["plugins"][0]["ipam"]["dataDir"] = str(data_dir)
    net.write_conf(conf)
    drv = await started(net.driver())
    req = net.request(drv, net.pin())
    res = await drv.attach(req)
    assert reservation(net.name, res.ip, str(data_dir)) == req.sandbox_id
    assert not os.path.exists(os.path.join(STORE, net.name))
    assert await drv.reserved_container_ids() == {req.sandbox_id}
    await drv.detach(req, res)
    assert await drv.reserved_container_ids() == set()


async def test_concurrent_attaches_get_distinct_addresses(net: Net) -> None:
    net.write_conf(net.conflist())
    drv = await started(net.driver())
    reqs = [net.request(drv, net.pin(userns=i % 2 == 0)) for i in range(4)]
    results = await asyncio.gather(*(drv.attach(r) for r in reqs))
    assert len({r.ip for r in results}) == 4
    assert {r.sandbox_id for r in reqs} <= await drv.reserved_container_ids()
    await asyncio.gather(*(drv.detach(r, res) for r, res in zip(reqs, results, strict=True)))
    assert await drv.reserved_container_ids() == set()


async def test_timings(net: Net) -> None:
    net.write_conf(net.conflist())
    drv = await started(net.driver())
    pin = net.pin()
    adds: list[float] = []
    dels: list[float] = []
    checks: list[float] = []
    for _ in range(10):
        req = net.request(drv, pin)
        t0 = time.perf_counter()
        res = await drv.attach(req)
        t1 = time.perf_counter()
        await drv.check(req, res)
        t2 = time.perf_counter()
        await drv.detach(req, res)
        t3 = time.perf_counter()
        adds.append((t1 - t0) * 1000)
        checks.append((t2 - t1) * 1000)
        dels.append((t3 - t2) * 1000)
    print(
        f"\nCNI median of 10 (ms): ADD {statistics.median(adds):.1f}  "
        f"CHECK {statistics.median(checks):.1f}  DEL {statistics.median(dels):.1f}"
    )
