"""The namespace layer on the real kernel: WorkerPoolNamespaces and its nsworker processes.

Mirrors containerd's tests of its user-namespace helper: the pinned namespaces are new (inodes
differ from ours), the id maps read exactly as requested, setgroups stays "allow", the netns is
owned by the pinned user namespace (NS_GET_USERNS), killing the helper before pinning finishes
fails cleanly. Every pin lives under tmp_path and every test unpins whatever is left, pass or fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from podfsm.core.errors import StepFailed
from podfsm.core.requests import NamespaceRequest
from podfsm.core.spec import IDMapping
from podfsm.drivers import PACKAGE_DIR, linux
from podfsm.drivers.namespaces import _BOOTSTRAP, WorkerPoolNamespaces
from podfsm.drivers.nsworker import HOOKS_ENV, PIDFILE_ENV

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

UID = IDMapping(container_id=0, host_id=100000, length=65536)
GID = IDMapping(container_id=0, host_id=200000, length=65536)
OWN_NETNS = linux.ns_inode("/proc/self/ns/net")
OWN_USERNS = linux.ns_inode("/proc/self/ns/user")


# -- helpers ------------------------------------------------------------------------------

def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return field.encode().decode("unicode_escape")


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below `root`, as /proc/self/mountinfo lists them."""
    prefix = str(root)
    with open("/proc/self/mountinfo") as f:
        points = [_unescape(line.split()[4]) for line in f]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


def scrub(root: Path) -> None:
    """Unmount every mount under `root` (stacked ones too): the safety net of every test."""
    for _ in range(100):
        points = mounts_under(root)
        if not points:
            return
        for point in points:
            with contextlib.suppress(OSError):
                linux.umount2(point, linux.MNT_DETACH)
    raise AssertionError(f"cannot unmount {mounts_under(root)}")


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


def worker_pids() -> list[int]:
    """Our children that are nsworker processes."""
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        if linux.parent_pid(int(entry)) != me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if b"nsworker" in cmdline:
            pids.append(int(entry))
    return sorted(pids)


async def wait_gone(pid: int, timeout: float = 10.0) -> None:
    """Wait until `pid` no longer exists (an orphan is reaped by pid 1, which is slow here)."""
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}"):
        assert time.monotonic() < deadline, f"process {pid} is still there"
        await asyncio.sleep(0.05)


async def run(*argv: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, f"{argv}: {err.decode()}"
    return out.decode()


def pod_request(root: Path, name: str, netns: bool = True, userns: bool = True,
                ) -> NamespaceRequest:
    return NamespaceRequest(
        sandbox_id=name,
        netns_path=str(root / "netns" / name) if netns else None,
        userns_path=str(root / "sandboxes" / name / "pinned-namespaces" / "user")
        if userns else None,
        uid_mapping=UID if userns else None,
        gid_mapping=GID if userns else None,
    )


def assert_clean(root: Path) -> None:
    assert mounts_under(root) == []
    assert files_under(root) == []


@contextlib.asynccontextmanager
async def make_pool(root: Path, workers: int = 2,
                    idle_exit: float | None = None) -> AsyncIterator[WorkerPoolNamespaces]:
    pool = WorkerPoolNamespaces(workers=workers, idle_exit=idle_exit)
    try:
        await pool.start()
        yield pool
    finally:
        try:
            await pool.close()
        finally:
            scrub(root)
    assert worker_pids() == [], "workers left running after close()"


@pytest.fixture
async def pool(tmp_path: Path) -> AsyncIterator[WorkerPoolNamespaces]:
    async with make_pool(tmp_path) as p:
        yield p


# -- the namespaces themselves ------------------------------------------------------------

async def test_pod_user_and_network_namespaces(pool: WorkerPoolNamespaces,
                                               tmp_path: Path) -> None:
    req = pod_request(tmp_path, "pod")
    assert req.netns_path is not None and req.userns_path is not None
    pinned = await pool.create(req)

    assert pinned.netns_path == req.netns_path
    assert pinned.userns_path == req.userns_path
    # New namespaces: not the test process's own.
    assert pinned.netns_inode not in (None, OWN_NETNS)
    assert pinned.userns_inode not in (None, OWN_USERNS)
    assert linux.ns_inode(req.netns_path) == pinned.netns_inode
    assert linux.ns_inode(req.userns_path) == pinned.userns_inode
    # The netns is owned by the pinned user namespace (NS_GET_USERNS), as reported.
    assert linux.netns_owner_inode(req.netns_path) == pinned.userns_inode
    assert pinned.netns_owner_inode == pinned.userns_inode
    assert linux.is_mountpoint_pin(req.netns_path)
    assert linux.is_mountpoint_pin(req.userns_path)

    # A process inside the pinned user namespace sees exactly the requested maps, and
    # setgroups was left "allow" (containerd #10742).
    enter = ["nsenter", f"--user={req.userns_path}"]
    assert (await run(*enter, "cat", "/proc/self/uid_map")).split() == ["0", "100000", "65536"]
    assert (await run(*enter, "cat", "/proc/self/gid_map")).split() == ["0", "200000", "65536"]
    assert (await run(*enter, "cat", "/proc/self/setgroups")).strip() == "allow"
    # Inside: root, and the new netns holds only a loopback interface.
    assert (await run(*enter, "id", "-u")).strip() == "0"
    dev = await run("nsenter", f"--net={req.netns_path}", "cat", "/proc/self/net/dev")
    assert [ln.split(":")[0].strip() for ln in dev.splitlines()[2:]] == ["lo"]

    # Directories made for the pins: the netns dir world-readable, the userns dir private.
    assert (tmp_path / "netns").stat().st_mode & 0o777 == 0o755
    assert Path(req.userns_path).parent.stat().st_mode & 0o777 == 0o700

    await pool.destroy(req.netns_path, req.userns_path)
    assert_clean(tmp_path)
    # Idempotent, also for paths that never existed and for nothing at all.
    await pool.destroy(req.netns_path, req.userns_path)
    await pool.destroy(str(tmp_path / "never"), None)
    await pool.destroy(None, None)
    assert_clean(tmp_path)


async def test_userns_mode_node_netns_owned_by_host(pool: WorkerPoolNamespaces,
                                                    tmp_path: Path) -> None:
    req = pod_request(tmp_path, "hostuser", userns=False)
    assert req.netns_path is not None
    pinned = await pool.create(req)
    assert pinned.userns_path is None and pinned.userns_inode is None
    assert pinned.netns_inode not in (None, OWN_NETNS)
    # Without a pod user namespace the netns belongs to the host's.
    assert linux.netns_owner_inode(req.netns_path) == OWN_USERNS
    assert pinned.netns_owner_inode == OWN_USERNS
    assert files_under(tmp_path) == ["netns/hostuser"]
    await pool.destroy(pinned.netns_path, pinned.userns_path)
    assert_clean(tmp_path)


async def test_network_node_pins_only_the_userns(pool: WorkerPoolNamespaces,
                                                 tmp_path: Path) -> None:
    req = pod_request(tmp_path, "hostnet", netns=False)
    assert req.userns_path is not None
    pinned = await pool.create(req)
    assert pinned.netns_path is None and pinned.netns_inode is None
    assert pinned.netns_owner_inode is None
    assert pinned.userns_inode not in (None, OWN_USERNS)
    assert files_under(tmp_path) == ["sandboxes/hostnet/pinned-namespaces/user"]
    assert len(mounts_under(tmp_path)) == 1
    uid_map = await run("nsenter", f"--user={req.userns_path}", "cat", "/proc/self/uid_map")
    assert uid_map.split() == ["0", "100000", "65536"]
    await pool.destroy(None, req.userns_path)
    assert_clean(tmp_path)


async def test_nothing_requested_creates_nothing(pool: WorkerPoolNamespaces,
                                                 tmp_path: Path) -> None:
    pinned = await pool.create(NamespaceRequest("none", None, None))
    assert pinned.netns_path is None and pinned.userns_path is None
    assert_clean(tmp_path)


# -- refusals -----------------------------------------------------------------------------

async def test_existing_pin_path_is_refused_and_left_alone(pool: WorkerPoolNamespaces,
                                                           tmp_path: Path) -> None:
    req = pod_request(tmp_path, "taken")
    assert req.netns_path is not None and req.userns_path is not None
    Path(req.netns_path).parent.mkdir(parents=True)
    Path(req.netns_path).write_text("keep me")
    with pytest.raises(StepFailed) as info:
        await pool.create(req)
    assert info.value.step == "namespaces"
    assert req.netns_path in str(info.value)
    assert "already exists" in str(info.value)
    assert isinstance(info.value.__cause__, FileExistsError)
    assert Path(req.netns_path).read_text() == "keep me"
    assert not os.path.lexists(req.userns_path)
    assert mounts_under(tmp_path) == []


async def test_same_path_twice_at_once(pool: WorkerPoolNamespaces, tmp_path: Path) -> None:
    req = pod_request(tmp_path, "twice")
    results = await asyncio.gather(pool.create(req), pool.create(req), return_exceptions=True)
    ok = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, StepFailed)]
    assert len(ok) == 1 and len(refused) == 1, results
    assert "already exists" in str(refused[0])
    # The loser's refusal left the winner's pins alone.
    assert req.netns_path is not None
    assert linux.ns_inode(req.netns_path) == ok[0].netns_inode
    assert len(mounts_under(tmp_path)) == 2
    await pool.destroy(req.netns_path, req.userns_path)
    assert_clean(tmp_path)


NX = "/nonexistent-podfsm"  # validation refuses before anything touches these


@pytest.mark.parametrize("bad", [
    NamespaceRequest("a", f"{NX}/netns", None, UID, GID),  # maps without a userns
    NamespaceRequest("b", f"{NX}/netns", f"{NX}/user", None, None),  # userns without maps
    NamespaceRequest("c", f"{NX}/netns", f"{NX}/user", UID, None),  # only one of the maps
    NamespaceRequest("d", f"{NX}/same", f"{NX}/same", UID, GID),  # one path for both
    NamespaceRequest("e", "relative/netns", None),  # not absolute
    NamespaceRequest("f", None, f"{NX}/user", UID.model_copy(update={"length": 0}), GID),
])
async def test_invalid_requests_are_refused(pool: WorkerPoolNamespaces,
                                            bad: NamespaceRequest) -> None:
    with pytest.raises(StepFailed) as info:
        await pool.create(bad)
    assert info.value.step == "namespaces"
    assert not os.path.lexists(NX)


async def test_create_needs_a_started_pool(tmp_path: Path) -> None:
    p = WorkerPoolNamespaces(workers=1)
    with pytest.raises(StepFailed, match="not started"):
        await p.create(pod_request(tmp_path, "early"))
    await p.close()
    with pytest.raises(StepFailed, match="closed"):
        await p.create(pod_request(tmp_path, "late"))
    assert_clean(tmp_path)


# -- failure paths ------------------------------------------------------------------------

@pytest.mark.parametrize(("hook", "step"), [
    ("kill-child@before-maps", "pin network namespace"),
    ("kill-child@before-pin", "pin network namespace"),
    ("kill-child@after-pin", "check helper alive"),
])
async def test_helper_killed_before_pinning_finishes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hook: str, step: str
) -> None:
    monkeypatch.setenv(HOOKS_ENV, hook)
    async with make_pool(tmp_path, workers=1) as p:
        with pytest.raises(StepFailed) as info:
            await p.create(pod_request(tmp_path, "victim"))
        assert f"step {step!r}" in str(info.value)
        # A dead helper's user namespace can still be pinned (a zombie keeps its creds), so
        # only the pidfd check stands between it and a "successful" create: prove it does.
        with pytest.raises(StepFailed, match="died before pinning finished"):
            await p.create(pod_request(tmp_path, "victim2", netns=False))
        assert_clean(tmp_path)


async def test_worker_dies_mid_request(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pidfile = tmp_path / "helper.pid"
    monkeypatch.setenv(HOOKS_ENV, "die@after-pin")
    monkeypatch.setenv(PIDFILE_ENV, str(pidfile))
    async with make_pool(tmp_path / "pins", workers=1) as p:
        (old,) = worker_pids()
        monkeypatch.delenv(HOOKS_ENV)  # the replacement worker starts without the hook
        with pytest.raises(StepFailed) as info:
            await p.create(pod_request(tmp_path / "pins", "dying"))
        msg = str(info.value)
        assert f"namespace worker pid {old} was killed by SIGKILL" in msg
        assert "nothing of it is left pinned" in msg
        assert_clean(tmp_path / "pins")
        # The orphaned helper exits by itself (EOF on its pipe).
        await wait_gone(int(pidfile.read_text()))
        # Replaced: the next request works, on a new worker.
        (new,) = worker_pids()
        assert new != old
        req = pod_request(tmp_path / "pins", "after")
        pinned = await p.create(req)
        assert pinned.netns_owner_inode == pinned.userns_inode
        await p.destroy(req.netns_path, req.userns_path)
        assert_clean(tmp_path / "pins")


async def test_idle_worker_killed_is_replaced(pool: WorkerPoolNamespaces,
                                              tmp_path: Path) -> None:
    old = worker_pids()
    assert len(old) == 2
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    reqs = [pod_request(tmp_path, f"p{i}") for i in range(4)]
    results = await asyncio.gather(*(pool.create(r) for r in reqs))
    assert len({r.netns_inode for r in results}) == 4
    new = worker_pids()
    assert len(new) == 2 and not set(new) & set(old)
    await asyncio.gather(*(pool.destroy(r.netns_path, r.userns_path) for r in reqs))
    assert_clean(tmp_path)


async def test_idle_workers_retire_and_come_back_on_demand(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with make_pool(tmp_path, idle_exit=0.3) as pool:
        first = worker_pids()
        assert len(first) == 2
        busy = pod_request(tmp_path, "busy")
        await pool.create(busy)
        # once idle for idle_exit, every worker exits
        for _ in range(100):  # 5 s at most
            if not worker_pids():
                break
            await asyncio.sleep(0.05)
        assert worker_pids() == []
        # the next requests start workers again, one per concurrent request at most
        reqs = [pod_request(tmp_path, f"p{i}") for i in range(3)]
        results = await asyncio.gather(*(pool.create(r) for r in reqs))
        assert len({r.netns_inode for r in results}) == 3
        again = worker_pids()
        assert 1 <= len(again) <= 2 and not set(again) & set(first)
        assert "replacing" not in caplog.text  # a retirement is not a death
        for r in (busy, *reqs):
            await pool.destroy(r.netns_path, r.userns_path)
        assert_clean(tmp_path)
    # close() with retired and live workers alike leaves no worker running (make_pool checks)


async def test_cancelled_create_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(HOOKS_ENV, "sleep:300@after-pin")
    async with make_pool(tmp_path, workers=1) as p:
        req = pod_request(tmp_path, "cancelled")
        task = asyncio.create_task(p.create(req))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # close() waits until the abandoned request has been finished and undone.
        await p.close()
        assert_clean(tmp_path)


# -- concurrency and speed ----------------------------------------------------------------

async def test_requests_run_in_parallel_on_different_workers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(HOOKS_ENV, "sleep:1000@before-pin")
    async with make_pool(tmp_path, workers=2) as p:
        reqs = [pod_request(tmp_path, f"par{i}") for i in range(2)]
        t0 = time.monotonic()
        await asyncio.gather(*(p.create(r) for r in reqs))
        elapsed = time.monotonic() - t0
        # One after the other would take at least 2 s; the margin absorbs a loaded machine.
        assert 1.0 <= elapsed < 1.9, f"two 1 s requests took {elapsed:.3f} s on 2 workers"
        await asyncio.gather(*(p.destroy(r.netns_path, r.userns_path) for r in reqs))
        assert_clean(tmp_path)


async def test_twenty_concurrent_creates(pool: WorkerPoolNamespaces, tmp_path: Path) -> None:
    reqs = [pod_request(tmp_path, f"c{i:02d}") for i in range(20)]
    try:
        results = await asyncio.gather(*(pool.create(r) for r in reqs))
        assert len({r.netns_inode for r in results}) == 20
        assert len({r.userns_inode for r in results}) == 20
        for req, pinned in zip(reqs, results, strict=True):
            assert req.netns_path is not None
            assert pinned.netns_path == req.netns_path
            assert linux.netns_owner_inode(req.netns_path) == pinned.userns_inode
        assert len(mounts_under(tmp_path)) == 40
    finally:
        await asyncio.gather(*(pool.destroy(r.netns_path, r.userns_path) for r in reqs))
    assert_clean(tmp_path)
    # The workers themselves never unshared.
    for pid in worker_pids():
        assert linux.ns_inode(f"/proc/{pid}/ns/net") == OWN_NETNS
        assert linux.ns_inode(f"/proc/{pid}/ns/user") == OWN_USERNS


async def test_create_timing(pool: WorkerPoolNamespaces, tmp_path: Path) -> None:
    times = []
    reqs = [pod_request(tmp_path, f"t{i:02d}") for i in range(20)]
    try:
        for req in reqs:
            t0 = time.perf_counter()
            await pool.create(req)
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        for req in reqs:
            await pool.destroy(req.netns_path, req.userns_path)
    print(f"\nuser+net namespaces created and pinned: median {statistics.median(times):.2f} ms "
          f"over {len(times)} (min {min(times):.2f}, max {max(times):.2f})")
    assert_clean(tmp_path)


# -- the worker protocol, spoken directly -------------------------------------------------

async def test_worker_protocol(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-I", "-c", _BOOTSTRAP, PACKAGE_DIR,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout

    async def ask(req: dict[str, object]) -> dict[str, object]:
        stdin.write(json.dumps(req).encode() + b"\n")
        await stdin.drain()
        ack = json.loads(await stdout.readline())
        assert ack == {"id": req.get("id"), "ack": True}
        resp: dict[str, object] = json.loads(await stdout.readline())
        assert resp["id"] == req.get("id")
        return resp

    try:
        hello = json.loads(await stdout.readline())
        assert hello == {"id": 0, "event": "ready", "pid": proc.pid}
        ping = await ask({"id": 1, "op": "ping"})
        assert ping["result"] == {"pid": proc.pid, "netns_inode": OWN_NETNS,
                                  "userns_inode": OWN_USERNS}

        # The worker's own O_EXCL refusal: the userns pin made first is undone, the existing
        # netns file is left as it was.
        netns, userns = tmp_path / "netns", tmp_path / "user"
        netns.write_text("keep me")
        resp = await ask({"id": 2, "op": "create", "netns_path": str(netns),
                          "userns_path": str(userns), "uid_map": [0, 100000, 65536],
                          "gid_map": [0, 200000, 65536]})
        assert resp["ok"] is False and resp["exists"] is True
        assert resp["step"] == "pin network namespace" and resp["path"] == str(netns)
        assert resp["leftovers"] == []
        assert netns.read_text() == "keep me" and not userns.exists()
        assert mounts_under(tmp_path) == []

        bad = await ask({"id": 3, "op": "create", "netns_path": str(tmp_path / "n2"),
                         "uid_map": [0, 1, 1], "gid_map": [0, 1, 1]})
        assert bad["ok"] is False and bad["step"] == "request"
        assert (await ask({"id": 4, "op": "nope"}))["step"] == "request"

        ok = await ask({"id": 5, "op": "create", "netns_path": str(tmp_path / "n3")})
        assert ok["ok"] is True
        assert ok["result"]["netns_owner_inode"] == OWN_USERNS  # type: ignore[index]
        for rid in (6, 7):  # destroy is idempotent
            gone = await ask({"id": rid, "op": "destroy", "netns_path": str(tmp_path / "n3"),
                              "userns_path": None})
            assert gone["ok"] is True
        assert mounts_under(tmp_path) == []
        # Still in our namespaces after all that: the worker never unshares.
        assert (await ask({"id": 8, "op": "ping"}))["result"] == ping["result"]
    finally:
        stdin.close()
        try:
            async with asyncio.timeout(5):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
        scrub(tmp_path)
    assert proc.returncode == 0
