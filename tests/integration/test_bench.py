"""A smoke run of `podfsm bench`: it runs both runtimes end to end, prints its figures as JSON
and leaves the host as it found it. No timing is asserted: figures are for reading."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from podfsm.tools.bench import BENCH_BRIDGE, BENCH_NETWORK

pytestmark = pytest.mark.integration


def test_bench_smoke_run_prints_every_figure_and_leaves_nothing() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "podfsm", "bench", "-n", "3", "--concurrency", "1,2",
         "--runtime", "runc,crun", "--exit-samples", "2", "--ready", "3", "--soak", "3",
         "--cri", "--json"],
        capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads(out.stdout)["results"]
    assert [r["runtime"] for r in results] == ["runc", "crun"]
    for r in results:
        assert [lv["podfsm"]["concurrency"] for lv in r["levels"]] == [1, 2]
        for lv in r["levels"]:
            for mode in ("raw", "podfsm", "cri"):  # cri: through the CRI socket (--cri)
                s = lv[mode]
                assert s["count"] == 3
                assert 0 < s["run_ms"]["p50"] <= s["run_ms"]["p99"]
                assert s["cycles_per_s"] > 0 and s["cpu_ms_per_cycle"] > 0
                by = s["cpu_ms_per_cycle_by_process"]  # the same CPU, split by process
                assert set(by) == {"controller", "reaper", "workers"}
                assert sum(by.values()) == pytest.approx(s["cpu_ms_per_cycle"])
        assert len(r["exit_ms"]) == 2 and all(ms > 0 for ms in r["exit_ms"])
        assert r["ready"]["ready_after_restart"] == 3
        assert r["soak"]["lifecycles"] == 3 and r["soak"]["left"] is False
        assert r["peak_rss_mb"] > 0
    assert "podfsm c=2" in out.stderr and "cri    c=2" in out.stderr  # progress was shown
    assert not os.path.exists(f"/sys/class/net/{BENCH_BRIDGE}")
    assert not os.path.exists(f"/var/lib/cni/networks/{BENCH_NETWORK}")
