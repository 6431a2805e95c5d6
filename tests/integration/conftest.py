"""Fixtures for the integration tests: real kernel namespaces, real runc AND crun, real CNI
plugins, real catatonit, as root. Every test gets its own state, run and netns directories and
its own CNI network, bridge and subnet, and everything is cleaned up even when the test fails."""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import random
import shlex
import shutil
import struct
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import pytest

from podfsm import Controller, ControllerConfig, State
from podfsm.drivers import linux
from podfsm.drivers.runtime import cgroup_parent_dirs, pause_pids, remove_new_dirs

pytestmark = pytest.mark.integration

CNI_STORE = "/var/lib/cni/networks"
# Test sessions may run side by side (several checkouts on one machine): each env takes a slot
# 1-249 (its bridge pfsmit<n> and subnet 10.240.<n>.0/24) under an flock held for the env's
# life, so two sessions never share a bridge or a subnet.
_SLOT_DIR = "/run/pfsm-it-slots"
_slots: dict[int, int] = {}


def _take_slot() -> int:
    os.makedirs(_SLOT_DIR, mode=0o700, exist_ok=True)
    for n in random.sample(range(1, 250), 249):
        fd = os.open(os.path.join(_SLOT_DIR, str(n)), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        if os.path.exists(f"/sys/class/net/pfsmit{n}"):  # left by a killed session
            subprocess.run(["ip", "link", "del", f"pfsmit{n}"], capture_output=True, check=False)
        _slots[n] = fd
        return n
    raise RuntimeError("no free integration-test slot in 1-249")


def _release_slot(n: int) -> None:
    fd = _slots.pop(n, None)
    if fd is not None:
        os.close(fd)  # the lock file stays: unlinking it would race with a taker


@dataclass
class Env:
    """One test's private world."""

    tmp: str
    cfg: ControllerConfig
    network: str
    bridge: str
    subnet: str
    slot: int = 0

    def controller(self, **kw: Any) -> Controller:
        return Controller(self.cfg.model_copy(update=kw) if kw else self.cfg)

    @property
    def runtime_root(self) -> str:
        return os.path.join(self.cfg.run_dir, "runtime", self.cfg.runtime)

    def reservations(self) -> list[str]:
        d = os.path.join(CNI_STORE, self.network)
        if not os.path.isdir(d):
            return []
        return [f for f in os.listdir(d) if f != "lock" and not f.startswith("last_reserved_ip")]

    def mounts(self) -> list[str]:
        with open("/proc/self/mountinfo") as f:
            return [line.split()[4] for line in f if self.tmp in line.split()[4]]

    def pause_processes(self) -> list[int]:
        """Live processes whose root is inside our pause rootfs."""
        return pause_pids(self.cfg.run_dir)

    def containers(self) -> list[str]:
        if not os.path.isdir(self.runtime_root):
            return []
        out = subprocess.run([self.cfg.runtime, "--root", self.runtime_root, "list", "-q"],
                             capture_output=True, text=True, check=False).stdout
        return out.split()

    def workload_containers(self) -> list[str]:
        """The containers (not pauses) under this env's container roots, every handler's."""
        out: list[str] = []
        for rt in ("runc", "crun"):
            root = os.path.join(self.cfg.run_dir, "containers", rt)
            if os.path.isdir(root):
                out += subprocess.run([rt, "--root", root, "list", "-q"], capture_output=True,
                                      text=True, check=False).stdout.split()
        return out

    def conmons(self) -> list[int]:
        """Live conmon processes monitoring a container of this env."""
        found = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"conmon") and any(
                    self.tmp.encode() in a for a in argv):
                found.append(int(name))
        return found

    def container_dirs(self) -> list[str]:
        d = os.path.join(self.cfg.state_dir, "containers")
        return os.listdir(d) if os.path.isdir(d) else []

    def leftovers(self) -> dict[str, list[Any]]:
        """Everything a finished sandbox must not leave; empty lists when clean."""
        pins = [os.path.join(self.cfg.netns_dir, n) for n in os.listdir(self.cfg.netns_dir)]
        sandboxes = os.path.join(self.cfg.run_dir, "sandboxes")
        userns = os.listdir(sandboxes) if os.path.isdir(sandboxes) else []
        bundles_dir = os.path.join(self.cfg.run_dir, "bundles")
        bundles = os.listdir(bundles_dir) if os.path.isdir(bundles_dir) else []
        records_dir = os.path.join(self.cfg.state_dir, "sandboxes")
        records = os.listdir(records_dir) if os.path.isdir(records_dir) else []
        found: dict[str, list[Any]] = {
            "netns pins": pins, "userns pin dirs": userns, "mounts": self.mounts(),
            "reservations": self.reservations(), "containers": self.containers(),
            "pause processes": self.pause_processes(), "bundles": bundles, "records": records,
            "workload containers": self.workload_containers(), "conmons": self.conmons(),
            "container dirs": self.container_dirs(),
        }
        return {k: v for k, v in found.items() if v}


PORTMAP_CHAINS = ("CNI-HOSTPORT-DNAT", "CNI-HOSTPORT-MASQ", "CNI-HOSTPORT-SETMARK")


def nat_rules() -> str:
    return subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True,
                          check=True).stdout


@contextlib.contextmanager
def portmap_chains_removed_if_new() -> Iterator[None]:
    """portmap leaves its top-level chains and their jumps; remove them if this test made
    them (another session's pods may use them otherwise: then they stay)."""
    before = nat_rules()
    try:
        yield
    finally:
        # not while another session's pod has a port mapping (its per-pod CNI-DN- chain)
        if not any(f":{c} " in before for c in PORTMAP_CHAINS) and "CNI-DN-" not in nat_rules():
            for rule in nat_rules().splitlines():
                if rule.startswith("-A ") and any(f"-j {c}" in rule for c in PORTMAP_CHAINS):
                    subprocess.run(["iptables", "-t", "nat", "-D", *shlex.split(rule)[1:]],
                                   capture_output=True, check=False)
            for c in PORTMAP_CHAINS:
                subprocess.run(["iptables", "-t", "nat", "-F", c], capture_output=True,
                               check=False)
                subprocess.run(["iptables", "-t", "nat", "-X", c], capture_output=True,
                               check=False)


@pytest.fixture(scope="session", autouse=True)
def _leave_host_as_found() -> Iterator[None]:
    """Put back what the runs change on the host: ip_forward (the bridge plugin's isGateway
    turns it on), the CNI store directories and the runtime's cgroup parent directories."""
    path = "/proc/sys/net/ipv4/ip_forward"
    with open(path) as f:
        before = f.read()
    made = [d for d in ("/var/lib/cni", CNI_STORE) if not os.path.exists(d)]
    cgroups = cgroup_parent_dirs()
    # every pod with a port mapping (pod-config tests, schemathesis' generated pods) runs portmap
    with portmap_chains_removed_if_new():
        yield
    remove_new_dirs(cgroups)
    with open(path, "w") as f:
        f.write(before)
    for d in reversed(made):  # only if empty: another user may have come meanwhile
        with contextlib.suppress(OSError):
            os.rmdir(d)


def make_env(runtime: str, **overrides: Any) -> Env:
    n = _take_slot()
    tmp = tempfile.mkdtemp(prefix="pfsm-")  # short: the reaper's socket path must fit
    os.chmod(tmp, 0o711)  # the pod's root (a high host uid) must walk down to the rootfs
    network = f"pfsm-it-{os.getpid()}-{n}"
    bridge = f"pfsmit{n}"
    subnet = f"10.240.{n}.0/24"
    conf = os.path.join(tmp, "net.d")
    os.makedirs(conf)
    cfg = ControllerConfig(
        state_dir=os.path.join(tmp, "state"), run_dir=os.path.join(tmp, "run"),
        netns_dir=os.path.join(tmp, "netns"), runtime=runtime, cni_conf_dir=conf,
        default_network_name=network, default_bridge=bridge, default_subnet=subnet,
        **overrides,
    )
    return Env(tmp, cfg, network, bridge, subnet, n)


def exiting_static_binary(path: str, status: int = 3) -> str:
    """Write a tiny statically linked ELF executable that calls exit(`status`) at once (for a
    pause process that dies at once). Made here, byte by byte, so the tests need no program
    that .ci/setup does not install (Debian's only static binary among them is catatonit)."""
    machine = platform.machine()
    if machine == "x86_64":
        e_machine = 62  # mov edi, status; mov eax, 60 (exit); syscall
        code = b"\xbf" + struct.pack("<I", status) + b"\xb8\x3c\x00\x00\x00\x0f\x05"
    elif machine == "aarch64":
        e_machine = 183  # mov x0, #status; mov x8, #93 (exit); svc #0
        code = struct.pack("<III", 0xD2800000 | (status << 5), 0xD2800BA8, 0xD4000001)
    else:
        raise RuntimeError(f"no exiting binary for {machine}")
    base, ehsize, phsize = 0x400000, 64, 56
    entry = base + ehsize + phsize
    size = ehsize + phsize + len(code)
    header = (b"\x7fELF\x02\x01\x01" + b"\x00" * 9
              + struct.pack("<HHIQQQIHHHHHH", 2, e_machine, 1, entry, ehsize, 0, 0,
                            ehsize, phsize, 1, 0, 0, 0))
    # one PT_LOAD, read + execute, mapping the whole file at `base`
    program = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)
    with open(path, "wb") as f:
        f.write(header + program + code)
    os.chmod(path, 0o755)
    return path


def destroy_env(env: Env) -> None:
    """Remove whatever a failed test may have left, then the env itself."""
    for cid in env.containers():
        subprocess.run([env.cfg.runtime, "--root", env.runtime_root, "delete", "-f", cid],
                       capture_output=True, check=False)
    for rt in ("runc", "crun"):
        root = os.path.join(env.cfg.run_dir, "containers", rt)
        for cid in env.workload_containers():
            subprocess.run([rt, "--root", root, "delete", "-f", cid], capture_output=True,
                           check=False)
    for pid in env.pause_processes() + env.conmons():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    # the network is this test's own: its whole IPAM store goes
    shutil.rmtree(os.path.join(CNI_STORE, env.network), ignore_errors=True)
    for m in sorted(env.mounts(), key=len, reverse=True):
        linux.unpin(m)
    subprocess.run(["ip", "link", "del", env.bridge], capture_output=True, check=False)
    shutil.rmtree(env.tmp, ignore_errors=True)
    _release_slot(env.slot)


@pytest.fixture(params=["runc", "crun"])
def runtime(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def env(runtime: str) -> Iterator[Env]:
    e = make_env(runtime)
    try:
        yield e
    finally:
        destroy_env(e)


@contextlib.asynccontextmanager
async def running(env: Env, **kw: Any) -> AsyncIterator[Controller]:
    """A controller on the env that removes whatever sandboxes a failing test left.

    (Not a fixture: the Controller's task group must be entered and left in one task, and
    pytest-asyncio runs a fixture's setup and teardown in different tasks.)"""
    async with env.controller(**kw) as c:
        try:
            yield c
        finally:
            for st in await c.list_sandboxes():
                with contextlib.suppress(Exception):
                    await c.remove_sandbox(st.id)


def pod(name: str = "pod", userns: dict[str, Any] | None = None,
        network: str = "POD") -> dict[str, Any]:
    """A crictl pod config; userns None means mode POD with allocated ids."""
    return {
        "metadata": {"name": name, "namespace": "podfsm-test", "uid": f"uid-{name}"},
        "linux": {"security_context": {"namespace_options": {
            "network": network,
            "userns_options": userns if userns is not None else {"mode": "POD"},
        }}},
    }


async def wait_for_state(ctl: Controller, sandbox_id: str, state: State, within: float) -> float:
    """Wait until the sandbox is in `state`; the seconds it took (5 ms resolution)."""
    t0 = anyio.current_time()
    with anyio.fail_after(within):
        while (await ctl.sandbox_status(sandbox_id)).state is not state:  # noqa: ASYNC110
            await anyio.sleep(0.005)
    return anyio.current_time() - t0
