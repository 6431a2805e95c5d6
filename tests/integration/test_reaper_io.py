"""The reaper runs many commands at once (CNI plugins, runtime calls): each must get exactly its
own standard input and output, however fds are reused between them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile

import anyio
import pytest

from podfsm.drivers.reaper import ReaperError, exit_file
from podfsm.drivers.reaperclient import ChainStep, ReaperClient, RunResult

pytestmark = pytest.mark.integration


async def test_concurrent_runs_keep_their_own_input_and_output() -> None:
    run_dir = tempfile.mkdtemp(prefix="pfsm-reaper-")
    client = ReaperClient(run_dir, idle_exit=0.5)
    try:
        await client.connect()
        results: dict[int, tuple[int, str, str]] = {}

        async def one(i: int) -> None:
            # output after exit-racing sleeps of different lengths, plus stderr
            res = await client.run(
                ["/bin/sh", "-c", f"sleep 0.00{i % 7}; cat; echo err{i} >&2"],
                input=f"input-{i}\n" * (1 + i % 50), cwd="/")
            results[i] = (res.rc, res.stdout, res.stderr)

        for _ in range(3):
            results.clear()
            async with anyio.create_task_group() as tg:
                for i in range(64):
                    tg.start_soon(one, i)
            for i, (rc, out, err) in results.items():
                assert rc == 0
                assert out == f"input-{i}\n" * (1 + i % 50)
                assert err.strip() == f"err{i}"
    finally:
        await client.shutdown()
        await client.close()
        shutil.rmtree(run_dir, ignore_errors=True)


async def test_the_reaper_stays_small() -> None:
    """A bare podfsm package (no pydantic, no pyroute2, no anyio) and no OpenSSL: it lives as
    long as any pause process does."""
    run_dir = tempfile.mkdtemp(prefix="pfsm-reaper-")
    client = ReaperClient(run_dir, idle_exit=0.5)
    try:
        await client.connect()
        pid = int((await client.ping())["pid"])
        maps = await anyio.Path(f"/proc/{pid}/maps").read_text()
        libraries = {line.split()[-1] for line in maps.splitlines() if ".so" in line}
        assert not [lib for lib in libraries if "libssl" in lib or "libcrypto" in lib]
        assert not [lib for lib in libraries if "pydantic" in lib]
        res = await client.run(["/bin/true"], cwd="/")  # and it still works
        assert res.rc == 0
    finally:
        await client.shutdown()
        await client.close()
        shutil.rmtree(run_dir, ignore_errors=True)


async def test_a_chain_passes_each_output_on_and_stops_at_a_failure() -> None:
    """One `chain` request runs a CNI-like chain: a step with prev_result gets the previous
    step's output as `prevResult`; with stop_on_failure nothing runs after a failed step."""
    run_dir = tempfile.mkdtemp(prefix="pfsm-reaper-")
    client = ReaperClient(run_dir, idle_exit=0.5)
    marker = os.path.join(run_dir, "ran")
    emit = ChainStep(["/bin/sh", "-c", "cat >/dev/null; echo '{\"ips\": [1]}'"], input="{}")
    echo = ChainStep(["/bin/cat"], input='{"name": "n"}', prev_result=True)
    fail = ChainStep(["/bin/sh", "-c", "echo broken >&2; exit 3"])
    late = ChainStep(["/bin/sh", "-c", f"touch {marker}"])
    try:
        got = await client.chain([emit, echo, fail, late])
        assert [r.rc for r in got if isinstance(r, RunResult)] == [0, 0, 3]
        assert isinstance(got[1], RunResult)
        assert json.loads(got[1].stdout) == {"name": "n", "prevResult": {"ips": [1]}}
        assert isinstance(got[2], RunResult) and got[2].stderr == "broken\n"
        assert not os.path.exists(marker)
        # DEL runs every step whatever failed
        got = await client.chain([fail, late], stop_on_failure=False)
        assert [r.rc for r in got if isinstance(r, RunResult)] == [3, 0]
        assert os.path.exists(marker)
        # a step that cannot start is an error of its own, in its place
        got = await client.chain([ChainStep(["/nonexistent/plugin"]), late],
                                 stop_on_failure=False)
        assert isinstance(got[0], ReaperError) and "No such file" in str(got[0])
        assert isinstance(got[1], RunResult) and got[1].rc == 0
    finally:
        await client.shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)


async def test_create_and_watch_then_delete_and_forget_are_one_request_each() -> None:
    run_dir = tempfile.mkdtemp(prefix="pfsm-reaper-")
    client = ReaperClient(run_dir, idle_exit=0.5)
    pid_file = os.path.join(run_dir, "pid")
    task_file = os.path.join(run_dir, "task.json")
    try:
        # a "create": leaves a process behind and its pid in a file
        res = await client.run(
            ["/bin/sh", "-c", f"sleep 60 >/dev/null 2>&1 & echo $! > {pid_file}"],
            then={"watch_pid_file": pid_file, "task_file": task_file})
        assert res.rc == 0 and res.watched is not None and res.then_error is None
        assert res.watched.pid == int(await anyio.Path(pid_file).read_text())
        assert res.watched.child  # adopted: the reaper will learn its status
        assert json.loads(await anyio.Path(task_file).read_text()) == {
            "pid": res.watched.pid, "start_time": res.watched.start_time}
        os.kill(res.watched.pid, signal.SIGKILL)
        key = (res.watched.pid, res.watched.start_time)
        assert await client.wait_exit(*key, timeout=5.0) == 137
        assert os.path.exists(exit_file(run_dir, *key))  # persisted: it was watched
        # a failed command does not do its `then`
        bad = await client.run(["/bin/false"], then={"forget": dict(zip(("pid", "start_time"),
                                                                         key, strict=True))})
        assert bad.rc == 1 and os.path.exists(exit_file(run_dir, *key))
        # a "delete": then the status is forgotten
        ok = await client.run(["/bin/true"], then={"forget": {"pid": key[0],
                                                              "start_time": key[1]}})
        assert ok.rc == 0 and ok.then_error is None
        assert not os.path.exists(exit_file(run_dir, *key))
        # a pid file that is not there is named, beside the command's own result
        missing = await client.run(["/bin/true"], then={"watch_pid_file": pid_file + ".no"})
        assert missing.rc == 0 and missing.watched is None
        assert missing.then_error is not None and "No such file" in missing.then_error
    finally:
        await client.shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)


async def test_a_command_flooding_its_output_is_killed() -> None:
    """Output is held in memory until a command ends: one that writes without end is killed
    (with its group) once it passes the limit, rather than filling the host's memory."""
    run_dir = tempfile.mkdtemp(prefix="pfsm-reaper-")
    client = ReaperClient(run_dir, idle_exit=0.5)
    try:
        with pytest.raises(ReaperError, match="more than 16777216 bytes"):
            await client.run(["/bin/sh", "-c", "echo starting >&2; exec cat /dev/zero"],
                             timeout=20.0)
        ok = await client.run(["/bin/echo", "still serving"])  # and the reaper goes on
        assert ok.stdout == "still serving\n"
    finally:
        await client.shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)
