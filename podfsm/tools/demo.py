"""`podfsm demo`: run one real pod with a pod-level user namespace, prove what matters, tear it
down, prove nothing is left. Exit status 0 only when every proof holds."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile

from podfsm.config import ControllerConfig
from podfsm.controller import Controller
from podfsm.core.errors import PodfsmError
from podfsm.drivers import linux
from podfsm.tools.hostcare import host_left_as_found

DEMO_NETWORK = "podfsm-demo"
DEMO_BRIDGE = "podfsm-demo0"
DEMO_SUBNET = "10.209.254.0/24"

POD = {
    "metadata": {"name": "demo", "namespace": "default", "uid": "podfsm-demo", "attempt": 0},
    "hostname": "demo",
    "linux": {"security_context": {"namespace_options": {
        "network": "POD", "userns_options": {"mode": "POD"}}}},
}


class Proofs:
    def __init__(self) -> None:
        self.failed = 0

    def check(self, ok: bool, what: str, detail: str) -> None:
        mark = "ok  " if ok else "FAIL"
        if not ok:
            self.failed += 1
        print(f"  [{mark}] {what}: {detail}", flush=True)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


async def _ping(ip: str) -> bool:
    proc = await asyncio.create_subprocess_exec(
        "ping", "-c", "1", "-W", "1", ip,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    return await proc.wait() == 0


async def run_demo(cfg: ControllerConfig) -> int:
    p = Proofs()
    print(f"podfsm demo: runtime {cfg.runtime}, state {cfg.state_dir}, run {cfg.run_dir}")
    async with Controller(cfg) as ctl:
        print("running a pod sandbox with its own user namespace ...", flush=True)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        st = await ctl.run_sandbox(POD)
        print(f"sandbox {st.id[:12]} is {st.state} in {(loop.time() - t0) * 1000:.0f} ms, "
              f"pid {st.pid}, ip {st.ip}")
        assert st.pid is not None and st.netns_path and st.userns_path
        try:
            pid = st.pid
            want = st.uid_mappings[0].line()
            uid_map = " ".join(_read(f"/proc/{pid}/uid_map").split())
            gid_map = " ".join(_read(f"/proc/{pid}/gid_map").split())
            p.check(uid_map == want, "uid_map inside the pod", f"{uid_map!r} (allocated {want!r})")
            p.check(gid_map == st.gid_mappings[0].line(), "gid_map inside the pod", repr(gid_map))
            p.check(_read(f"/proc/{pid}/setgroups") == "allow", "setgroups", "allow")
            owner = linux.netns_owner_inode(st.netns_path)
            userns = linux.ns_inode(st.userns_path)
            pause_user = linux.ns_inode(f"/proc/{pid}/ns/user")
            host_user = linux.ns_inode("/proc/self/ns/user")
            p.check(owner == userns == pause_user != host_user,
                    "netns owned by the pod's user namespace",
                    f"NS_GET_USERNS(netns) = {owner}, pinned userns = {userns}, "
                    f"pause userns = {pause_user}, host userns = {host_user}")
            p.check(linux.ns_inode(f"/proc/{pid}/ns/net") == linux.ns_inode(st.netns_path),
                    "pause joined the pinned netns", st.netns_path)
            inside = sorted(os.listdir(f"/proc/{pid}/root/sys/class/net"))
            pod_ifaces = sorted(i.name for i in await ctl.sandbox_interfaces(st.id))
            host_ifaces = sorted(os.listdir("/sys/class/net"))
            p.check(inside == pod_ifaces and inside != host_ifaces,
                    "/sys/class/net inside lists only the pod's interfaces",
                    f"{inside} (host has {host_ifaces})")
            p.check(await _ping(st.ip), "the pod's IP answers a ping from the host", st.ip)
        finally:
            print("tearing down ...", flush=True)
            t0 = loop.time()
            await ctl.stop_sandbox(st.id)
            await ctl.remove_sandbox(st.id)
            print(f"stopped and removed in {(loop.time() - t0) * 1000:.0f} ms")
        left = []
        for path in (st.netns_path, st.userns_path):
            if os.path.lexists(path) or _mounted(path):
                left.append(path)
        p.check(not left, "no pinned namespace or mount left", str(left or "none"))
        containers = await ctl.runtime_containers()
        p.check(not containers, f"no {cfg.runtime} container left", str(containers or "none"))
        reserved = st.id in await ctl.reserved_container_ids()
        p.check(not reserved, "the pod's IP is released", st.ip)
        p.check(not os.path.exists(f"/proc/{st.pid}"), "the pause process is gone",
                f"pid {st.pid}")
        p.check(await ctl.list_sandboxes() == [], "no sandbox listed", "none")
    print("all proofs hold" if not p.failed else f"{p.failed} proof(s) FAILED")
    return 0 if not p.failed else 1


def main(args: argparse.Namespace) -> int:
    """Entry point of `podfsm demo`. Uses its own directories and CNI network unless told."""
    tmp = tempfile.mkdtemp(prefix="podfsm-demo-")
    os.chmod(tmp, 0o711)  # the pod's mapped root must reach the pause rootfs below it
    try:
        conf_dir = args.cni_conf_dir or os.path.join(tmp, "net.d")
        os.makedirs(conf_dir, exist_ok=True)
        cfg = ControllerConfig(
            state_dir=args.state_dir or os.path.join(tmp, "state"),
            run_dir=args.run_dir or os.path.join(tmp, "run"),
            netns_dir=args.netns_dir or os.path.join(tmp, "netns"),
            runtime=args.runtime or "runc",
            cni_conf_dir=conf_dir,
            default_network_name=DEMO_NETWORK,
            default_bridge=DEMO_BRIDGE,
            default_subnet=DEMO_SUBNET,
        )
        with host_left_as_found(DEMO_NETWORK, DEMO_BRIDGE):
            return asyncio.run(run_demo(cfg))
    except PodfsmError as exc:
        print(f"podfsm demo: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
