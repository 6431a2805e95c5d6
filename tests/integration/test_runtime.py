"""The OCI runtime driver and its reaper on the real kernel, with runc AND crun, as root.

Each test pins its own user namespace (0 -> 100000, 65536 ids) and a network namespace owned by
it, the way the namespace driver does, and runs the pause container in them. Everything is torn
down in `finally`, and every reaper a test started must be gone a few seconds later.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from podfsm.core.errors import PrerequisiteMissing, StepFailed
from podfsm.core.requests import PauseRequest
from podfsm.core.spec import IDMapping
from podfsm.drivers import linux
from podfsm.drivers.reaper import exit_file
from podfsm.drivers.reaperclient import ReaperClient
from podfsm.drivers.runtime import OciRuntime, pause_pids

pytestmark = pytest.mark.integration

MAPPING = IDMapping(host_id=100000, container_id=0, length=65536)
RUNTIMES = ["runc", "crun"]


@dataclass(frozen=True)
class Pins:
    userns: str
    netns: str


def _pin_namespaces(directory: str) -> Pins:
    """A child unshares user then net; we write its id maps, pin both, and reap it."""
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            linux.unshare(linux.CLONE_NEWUSER)
            linux.unshare(linux.CLONE_NEWNET)
            os.write(ready_w, b"1")
            os.read(done_r, 1)
        finally:
            os._exit(0)
    pins = Pins(os.path.join(directory, "user"), os.path.join(directory, "net"))
    try:
        os.close(ready_w)
        os.close(done_r)
        assert os.read(ready_r, 1) == b"1"
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(MAPPING.line())
        for kind, path in (("user", pins.userns), ("net", pins.netns)):
            with open(path, "x"):
                pass
            linux.mount(f"/proc/{pid}/ns/{kind}", path, None, linux.MS_BIND)
    except BaseException:
        for path in (pins.userns, pins.netns):
            linux.unpin(path)
        raise
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_r)
        os.close(done_w)
    return pins


def _pin_host_owned_netns(path: str) -> None:
    """A netns created in the host user namespace (so owned by it), pinned at `path`."""
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            linux.unshare(linux.CLONE_NEWNET)
            os.write(ready_w, b"1")
            os.read(done_r, 1)
        finally:
            os._exit(0)
    try:
        os.close(ready_w)
        os.close(done_r)
        assert os.read(ready_r, 1) == b"1"
        with open(path, "x"):
            pass
        linux.mount(f"/proc/{pid}/ns/net", path, None, linux.MS_BIND)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_r)
        os.close(done_w)


@pytest.fixture
def pins(tmp_path: os.PathLike[str]) -> Iterator[Pins]:
    p = _pin_namespaces(str(tmp_path))
    try:
        yield p
    finally:
        linux.unpin(p.netns)
        linux.unpin(p.userns)


@pytest.fixture(scope="module", autouse=True)
def every_reaper() -> Iterator[set[int]]:
    """The pid of every reaper the tests of this module talked to: all must have left /proc,
    zombies included, shortly after the last test. (Checked once here, not after each test:
    an exited reaper is adopted by pid 1, which on this VM takes up to ~1.5 s to collect it.)"""
    pids: set[int] = set()
    yield pids
    _assert_gone(pids)


@pytest.fixture
def run_dirs(
    monkeypatch: pytest.MonkeyPatch, every_reaper: set[int]
) -> Iterator[list[str]]:
    """Short run_dirs under /tmp (the reaper socket path must fit in 108 bytes). After the test
    no reaper and no pause process of ours may be running."""
    made: list[str] = []
    reapers = every_reaper
    connect = ReaperClient.connect

    async def connect_and_note(self: ReaperClient) -> None:
        await connect(self)
        if self.reaper_pid is not None:
            reapers.add(self.reaper_pid)

    monkeypatch.setattr(ReaperClient, "connect", connect_and_note)
    try:
        yield made
    finally:
        for d in made:
            _kill_pause_processes(d)
        for d in made:
            _assert_reaper_gone(d)
            shutil.rmtree(d, ignore_errors=True)


def _new_run_dir(run_dirs: list[str]) -> str:
    d = tempfile.mkdtemp(prefix="pfsm-rt-")
    run_dirs.append(d)
    return d


def _reaper_pids(run_dir: str) -> list[int]:
    """Running reapers serving `run_dir` (a zombie has no cmdline)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            if b"podfsm.drivers.reaper" in b" ".join(cmd) and run_dir.encode() in cmd:
                found.append(int(pid))
    return found


def _kill_pause_processes(run_dir: str) -> None:
    for name in RUNTIMES:
        root = os.path.join(run_dir, "runtime", name)
        if os.path.isdir(root):
            for cid in os.listdir(root):
                subprocess.run([name, "--root", root, "delete", "--force", cid],
                               capture_output=True, check=False)
    for pid in pause_pids(run_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _assert_gone(pids: set[int], within: float = 5.0) -> None:
    """Every pid in `pids` has left /proc (zombies too); pid reuse in seconds is unlikely."""
    deadline = time.monotonic() + within
    while left := [p for p in pids if os.path.exists(f"/proc/{p}")]:
        if time.monotonic() > deadline:
            pytest.fail(f"reaper processes still present: {left}")
        time.sleep(0.1)


def _assert_reaper_gone(run_dir: str, within: float = 8.0) -> None:
    # The reaper is adopted by pid 1 once its launcher exits; this VM's pid 1 takes up to ~1.5 s
    # to collect an exited orphan.
    deadline = time.monotonic() + within
    while _reaper_pids(run_dir) or pause_pids(run_dir):
        if time.monotonic() > deadline:
            pytest.fail(f"left running for {run_dir}: reapers {_reaper_pids(run_dir)}, "
                        f"pause processes {pause_pids(run_dir)}")
        time.sleep(0.1)


@pytest.fixture(params=RUNTIMES)
def runtime_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def oci(runtime_name: str, run_dirs: list[str]) -> AsyncIterator[OciRuntime]:
    rt = OciRuntime(runtime_name, _new_run_dir(run_dirs))  # type: ignore[arg-type]
    await rt.start()
    try:
        yield rt
    finally:
        await _teardown(rt)


async def _teardown(rt: OciRuntime) -> None:
    for cid in await rt.list_containers():
        with contextlib.suppress(Exception):
            await rt.delete(cid)
    await rt.reaper.shutdown()


def pause_request(pins: Pins | None, cid: str = "pause0", *, netns: bool = True,
                  userns: bool = True) -> PauseRequest:
    return PauseRequest(
        container_id=cid,
        hostname="pod",
        netns_path=pins.netns if pins and netns else None,
        userns_path=pins.userns if pins and userns else None,
        uid_mapping=MAPPING if userns else None,
        gid_mapping=MAPPING if userns else None,
    )


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _runtime_list(name: str, root: str | None = None) -> list[str]:
    """`<runtime> list -q` (crun's list, unlike its create, works on hybrid cgroups)."""
    argv = [name, *(["--root", root] if root else []), "list", "-q"]
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    return sorted(out.stdout.split())


def _catches(pid: int, sig: int) -> bool:
    """Whether process `pid` takes `sig` in: a handler for it, or (as catatonit, which reads
    its signals from a signalfd) blocks it (SigCgt, SigBlk of /proc/<pid>/status)."""
    return any(line.startswith(("SigCgt:", "SigBlk:"))
               and int(line.split()[1], 16) >> (sig - 1) & 1
               for line in _read(f"/proc/{pid}/status").splitlines())


def _sys_mount_options(pid: int) -> list[str]:
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == "/sys":
                return fields[5].split(",")
    raise AssertionError("no /sys mount in the pause container")


async def test_pause_joins_the_pinned_namespaces_and_sees_only_its_own_sysfs(
    oci: OciRuntime, pins: Pins
) -> None:
    t0 = time.perf_counter()
    task = await oci.create(pause_request(pins))
    t1 = time.perf_counter()
    assert (await oci.states()).get("pause0") == "created"
    await oci.start_task("pause0")
    t2 = time.perf_counter()
    assert (await oci.states()).get("pause0") == "running"
    assert task.start_time == linux.proc_start_time(task.pid)
    assert linux.ns_inode(f"/proc/{task.pid}/ns/user") == linux.ns_inode(pins.userns)
    assert linux.ns_inode(f"/proc/{task.pid}/ns/net") == linux.ns_inode(pins.netns)
    assert _read(f"/proc/{task.pid}/uid_map").split() == ["0", "100000", "65536"]
    assert _read(f"/proc/{task.pid}/gid_map").split() == ["0", "100000", "65536"]
    # Seen through the pause process's own mount namespace: a sysfs of the pod's netns, which
    # has only lo; the host's /sys would list the host's interfaces.
    assert sorted(os.listdir(f"/proc/{task.pid}/root/sys/class/net")) == ["lo"]
    assert "ro" in _sys_mount_options(task.pid)
    assert _read(f"/proc/{task.pid}/cmdline").split("\0")[0] == "/catatonit"
    print(f"\n{oci.name}: create {(t1 - t0) * 1e3:.1f} ms, start {(t2 - t1) * 1e3:.1f} ms")


async def test_sigkill_of_the_pause_process_is_seen_at_once_with_status_137(
    oci: OciRuntime, pins: Pins
) -> None:
    task = await oci.create(pause_request(pins))
    await oci.start_task("pause0")
    t0 = time.perf_counter()
    os.kill(task.pid, signal.SIGKILL)
    status = await oci.wait_exit_status(task, timeout=5.0)
    latency = time.perf_counter() - t0
    print(f"\n{oci.name}: kill -9 to exit status seen: {latency * 1e3:.2f} ms")
    assert status == 137
    assert latency < 0.5
    assert (await oci.states()).get("pause0") == "stopped"
    # Asking again still answers, from the reaper's record.
    assert await oci.wait_exit_status(task, timeout=0.1) == 137


async def test_kill_task_with_a_grace_ends_the_pause_process_by_sigterm(
    oci: OciRuntime, pins: Pins
) -> None:
    task = await oci.create(pause_request(pins))
    await oci.start_task("pause0")
    # The pause is its pid namespace's init: a SIGTERM sent before it takes the signal in is
    # dropped (the teardown then ends it by SIGKILL after the grace). Wait until it does.
    deadline = time.perf_counter() + 5
    while not _catches(task.pid, signal.SIGTERM):
        assert time.perf_counter() < deadline, "the pause never handled SIGTERM"
        await asyncio.sleep(0.002)
    t0 = time.perf_counter()
    # catatonit -P exits 0 on SIGTERM, well before the grace runs out (no SIGKILL: not 137)
    assert await oci.kill_task(task, 5.0) == 0
    assert time.perf_counter() - t0 < 2.0
    assert await oci.kill_task(task, 5.0) in (0, None)  # already gone: no error


async def test_wait_exit_status_times_out_with_none_while_running(
    oci: OciRuntime, pins: Pins
) -> None:
    task = await oci.create(pause_request(pins))
    await oci.start_task("pause0")
    t0 = time.perf_counter()
    assert await oci.wait_exit_status(task, timeout=0.2) is None
    assert 0.15 < time.perf_counter() - t0 < 1.0
    assert (await oci.states()).get("pause0") == "running"


async def test_delete_removes_container_bundle_and_exit_record_and_is_idempotent(
    oci: OciRuntime, pins: Pins
) -> None:
    task = await oci.create(pause_request(pins))
    await oci.start_task("pause0")
    bundle = oci.bundle_path("pause0")
    assert os.path.isfile(os.path.join(bundle, "config.json"))
    assert await oci.list_containers() == ["pause0"]
    t0 = time.perf_counter()
    await oci.delete("pause0")
    print(f"\n{oci.name}: delete of a running pause {(time.perf_counter() - t0) * 1e3:.1f} ms")
    assert await oci.list_containers() == []
    assert _runtime_list(oci.name, oci.root) == []
    assert not os.path.exists(bundle)
    assert linux.proc_start_time(task.pid) != task.start_time  # the pause process is gone
    assert not os.path.exists(exit_file(oci.run_dir, task.pid, task.start_time))
    await oci.delete("pause0")
    await oci.delete("never-created")


async def test_create_refuses_an_existing_id_and_keeps_that_container(
    oci: OciRuntime, pins: Pins
) -> None:
    task = await oci.create(pause_request(pins))
    with pytest.raises(StepFailed, match="already exists"):
        await oci.create(pause_request(pins))
    assert (await oci.states()).get("pause0") == "created"
    assert linux.proc_start_time(task.pid) == task.start_time


async def test_states_reports_every_container_in_one_call(oci: OciRuntime, pins: Pins) -> None:
    assert await oci.states() == {}
    await oci.create(pause_request(pins))
    assert await oci.states() == {"pause0": "created"}
    await oci.start_task("pause0")
    assert await oci.states() == {"pause0": "running"}
    await oci.delete("pause0")
    assert await oci.states() == {}


async def test_unknown_container(oci: OciRuntime) -> None:
    assert (await oci.states()).get("nope") is None
    await oci.delete("nope")
    with pytest.raises(StepFailed, match=oci.name):
        await oci.start_task("nope")


async def test_failed_create_names_the_runtime_and_leaves_nothing(
    oci: OciRuntime, pins: Pins, tmp_path: os.PathLike[str]
) -> None:
    req = PauseRequest(container_id="bad0", hostname="pod",
                       netns_path=os.path.join(str(tmp_path), "no-such-netns"),
                       userns_path=pins.userns, uid_mapping=MAPPING, gid_mapping=MAPPING)
    with pytest.raises(StepFailed, match=f"{oci.name} create failed") as err:
        await oci.create(req)
    assert err.value.step == "runtime"
    assert await oci.list_containers() == []
    assert not os.path.exists(oci.bundle_path("bad0"))
    assert pause_pids(oci.run_dir) == []


async def test_a_netns_not_owned_by_the_pods_userns_is_refused_before_the_runtime_runs(
    oci: OciRuntime, pins: Pins, tmp_path: os.PathLike[str]
) -> None:
    # crun would quietly give such a pod the host's /sys: the driver must not let it try.
    foreign = os.path.join(str(tmp_path), "host-owned-net")
    _pin_host_owned_netns(foreign)
    try:
        req = PauseRequest(container_id="foreign0", hostname="pod", netns_path=foreign,
                           userns_path=pins.userns, uid_mapping=MAPPING, gid_mapping=MAPPING)
        with pytest.raises(StepFailed, match="not owned by the pod's user namespace"):
            await oci.create(req)
        assert await oci.list_containers() == []
        assert not os.path.exists(oci.bundle_path("foreign0"))
    finally:
        linux.unpin(foreign)


async def test_userns_with_host_network_gets_the_host_sys_read_only(
    oci: OciRuntime, pins: Pins
) -> None:
    task = await oci.create(pause_request(pins, netns=False))
    await oci.start_task("pause0")
    assert linux.ns_inode(f"/proc/{task.pid}/ns/user") == linux.ns_inode(pins.userns)
    assert linux.ns_inode(f"/proc/{task.pid}/ns/net") == linux.ns_inode("/proc/self/ns/net")
    inside = sorted(os.listdir(f"/proc/{task.pid}/root/sys/class/net"))
    assert inside == sorted(os.listdir("/sys/class/net"))
    assert "ro" in _sys_mount_options(task.pid)


async def test_host_namespaces_without_userns(oci: OciRuntime, pins: Pins) -> None:
    task = await oci.create(pause_request(pins, userns=False))
    await oci.start_task("pause0")
    assert linux.ns_inode(f"/proc/{task.pid}/ns/user") == linux.ns_inode("/proc/self/ns/user")
    assert linux.ns_inode(f"/proc/{task.pid}/ns/net") == linux.ns_inode(pins.netns)
    assert sorted(os.listdir(f"/proc/{task.pid}/root/sys/class/net")) == ["lo"]


async def test_concurrent_pods_share_one_reaper(oci: OciRuntime, pins: Pins) -> None:
    ids = [f"pause{i}" for i in range(4)]
    tasks = await asyncio.gather(*(oci.create(pause_request(pins, cid)) for cid in ids))
    await asyncio.gather(*(oci.start_task(cid) for cid in ids))
    assert await oci.list_containers() == ids
    assert len({t.pid for t in tasks}) == 4
    for t in tasks:
        os.kill(t.pid, signal.SIGKILL)
    statuses = await asyncio.gather(*(oci.wait_exit_status(t, timeout=5.0) for t in tasks))
    assert statuses == [137] * 4
    await asyncio.gather(*(oci.delete(cid) for cid in ids))
    assert await oci.list_containers() == []


async def test_controllers_on_different_run_dirs_do_not_see_each_other(
    runtime_name: str, pins: Pins, run_dirs: list[str]
) -> None:
    a = OciRuntime(runtime_name, _new_run_dir(run_dirs))  # type: ignore[arg-type]
    b = OciRuntime(runtime_name, _new_run_dir(run_dirs))  # type: ignore[arg-type]
    await a.start()
    await b.start()
    try:
        await a.create(pause_request(pins, "only-in-a"))
        assert await a.list_containers() == ["only-in-a"]
        assert await b.list_containers() == []
        assert (await b.states()).get("only-in-a") is None
        await b.delete("only-in-a")  # not b's: must not touch a's container
        assert (await a.states()).get("only-in-a") == "created"
        assert _runtime_list(runtime_name, a.root) == ["only-in-a"]
        assert _runtime_list(runtime_name, b.root) == []
        assert "only-in-a" not in _runtime_list(runtime_name)  # the default root
        assert a.reaper.reaper_pid != b.reaper.reaper_pid
    finally:
        await _teardown(a)
        await _teardown(b)


async def test_exit_status_survives_a_controller_restart_and_a_reaper_restart(
    runtime_name: str, pins: Pins, run_dirs: list[str]
) -> None:
    run_dir = _new_run_dir(run_dirs)
    first = OciRuntime(runtime_name, run_dir)  # type: ignore[arg-type]
    await first.start()
    task = await first.create(pause_request(pins))
    await first.start_task("pause0")
    first_reaper = first.reaper.reaper_pid
    await first.close()  # the controller goes away; the pod keeps running

    os.kill(task.pid, signal.SIGKILL)
    second = OciRuntime(runtime_name, run_dir)  # type: ignore[arg-type]
    await second.start()
    try:
        assert second.reaper.reaper_pid == first_reaper  # it stayed for its child
        assert await second.wait_exit_status(task, timeout=5.0) == 137
        assert os.path.isfile(exit_file(run_dir, task.pid, task.start_time))
        # The reaper exits once it has nothing left; a new one answers from the exit file.
        await second.reaper.shutdown()
        _assert_reaper_gone(run_dir)
        await second.reaper.connect()
        assert second.reaper.reaper_pid != first_reaper
        assert await second.wait_exit_status(task, timeout=1.0) == 137
    finally:
        await _teardown(second)
    assert not os.path.exists(exit_file(run_dir, task.pid, task.start_time))


async def test_after_a_reaper_crash_an_exit_is_still_noticed_but_its_status_is_unknown(
    oci: OciRuntime, pins: Pins
) -> None:
    task = await oci.create(pause_request(pins))
    await oci.start_task("pause0")
    crashed = oci.reaper.reaper_pid
    assert crashed is not None
    os.kill(crashed, signal.SIGKILL)  # the pause process is adopted by pid 1 now
    await asyncio.sleep(0.05)
    # The next request reconnects, starting a new reaper, which is not the pause's parent.
    assert await oci.wait_exit_status(task, timeout=0.1) is None
    assert oci.reaper.reaper_pid != crashed
    os.kill(task.pid, signal.SIGKILL)
    t0 = time.perf_counter()
    assert await oci.wait_exit_status(task, timeout=5.0) is None
    assert time.perf_counter() - t0 < 1.0  # noticed through its pidfd, not at the timeout
    await oci.delete("pause0")
    assert await oci.list_containers() == []


async def test_missing_runtime_binary_is_a_missing_prerequisite(
    runtime_name: str, run_dirs: list[str]
) -> None:
    missing = f"/nonexistent/{runtime_name}"
    rt = OciRuntime(runtime_name, _new_run_dir(run_dirs), binary=missing)  # type: ignore[arg-type]
    with pytest.raises(PrerequisiteMissing) as err:
        await rt.start()
    assert missing in str(err.value)
    assert f"'{runtime_name}'" in str(err.value)  # the Debian package to install


async def test_unusable_pause_binary_is_a_missing_prerequisite(run_dirs: list[str]) -> None:
    rt = OciRuntime("runc", _new_run_dir(run_dirs), pause_binary="/nonexistent/catatonit")
    with pytest.raises(PrerequisiteMissing, match="catatonit"):
        await rt.start()
    dynamic = shutil.which("true") or "/bin/true"  # needs a loader the pause rootfs lacks
    rt = OciRuntime("runc", _new_run_dir(run_dirs), pause_binary=dynamic)
    with pytest.raises(PrerequisiteMissing, match="statically linked"):
        await rt.start()


async def test_reaper_stays_while_an_adopted_orphan_lives_then_exits_by_itself(
    run_dirs: list[str],
) -> None:
    run_dir = _new_run_dir(run_dirs)
    client = ReaperClient(run_dir, idle_exit=0.3)
    await client.connect()
    reaper = client.reaper_pid
    # The shell exits at once; its background sleep is adopted by the reaper (a subreaper).
    rc, out, _ = (await client.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"]))[:3]
    assert rc == 0
    orphan = int(out)
    watched = await client.watch(orphan)
    assert watched.child
    await client.close()
    await asyncio.sleep(1.5)  # well past idle_exit
    await client.connect()
    assert client.reaper_pid == reaper
    os.kill(orphan, signal.SIGTERM)
    assert await client.wait_exit(orphan, watched.start_time, timeout=5.0) == 128 + 15
    await client.forget(orphan, watched.start_time)
    assert not os.path.exists(exit_file(run_dir, orphan, watched.start_time))
    await client.close()
    # Nothing left to look after: it leaves by itself (checked by the run_dirs fixture too).
    _assert_reaper_gone(run_dir)


async def test_clients_starting_at_once_share_one_reaper(run_dirs: list[str]) -> None:
    run_dir = _new_run_dir(run_dirs)
    clients = [ReaperClient(run_dir, idle_exit=0.3) for _ in range(4)]
    try:
        await asyncio.gather(*(c.connect() for c in clients))
        assert len({c.reaper_pid for c in clients}) == 1
        assert len(_reaper_pids(run_dir)) == 1
    finally:
        for c in clients:
            await c.close()


async def test_reaper_runs_commands_concurrently_and_reports_failures(
    run_dirs: list[str],
) -> None:
    client = ReaperClient(_new_run_dir(run_dirs), idle_exit=0.3)
    try:
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(client.run(["sh", "-c", f"sleep 0.3; echo out{i}; echo err{i} >&2; exit {i}"])
              for i in range(5))
        )
        assert time.perf_counter() - t0 < 1.5  # concurrent, not 5 x 0.3 s in a row
        assert [(r.rc, r.stdout, r.stderr) for r in results] == [
            (i, f"out{i}\n", f"err{i}\n") for i in range(5)
        ]
        rc = (await client.run(["sh", "-c", "kill -9 $$"])).rc
        assert rc == 137
        with pytest.raises(Exception, match="timeout"):
            await client.run(["sleep", "10"], timeout=0.2)
        with pytest.raises(Exception, match="No such file"):
            await client.run(["/nonexistent/binary"])
    finally:
        await client.shutdown()
