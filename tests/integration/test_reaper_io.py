"""The reaper runs many commands at once (CNI plugins, runtime calls): each must get exactly its
own standard input and output, however fds are reused between them."""

from __future__ import annotations

import shutil
import tempfile

import anyio
import pytest

from podfsm.drivers.reaperclient import ReaperClient

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
