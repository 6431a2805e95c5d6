"""A smoke run of `podfsm bench`: it runs both runtimes end to end, prints its figures as JSON
and leaves the host as it found it. No timing is asserted: figures are for reading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def test_pull_bench_smoke_run_prints_sane_figures_and_leaves_nothing(tmp_path: Path) -> None:
    """`podfsm bench --pull` with a small image: a real registry on 127.0.0.1, real pulls into
    real stores, the layer store and GNU tar on the same layers."""
    out = subprocess.run(
        [sys.executable, "-m", "podfsm", "bench", "--pull", "--pull-runs", "3",
         "--pull-small", "300", "--pull-big", "1", "--pull-big-mb", "2",
         "--unpack-dir", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout)
    assert r["runs"] == 3
    assert 2 < r["image_mb"] < r["tar_mb"] < 10  # busybox + 300 small files + 2 MiB
    cold, warm = r["cold_pull"], r["warm_pull"]
    for t in (cold, warm):
        assert 0 < t["min_s"] <= t["p50_s"] <= t["max_s"] < 60
        assert 0 < t["cpu_p50_s"] < 60
    assert warm["p50_s"] < cold["p50_s"]  # nothing downloaded nor unpacked again
    assert r["cold_pull_mbps"] == pytest.approx(r["image_mb"] / cold["p50_s"])
    assert [la["layer"] for la in r["layers"]] == ["busybox", "small", "big"]
    assert [la["entries"] for la in r["layers"]][1:] == [303, 1]  # files + dirs; the big one
    for la in r["layers"]:
        assert la["podfsm_mbps"] > 0 and la["tar_mbps"] > 0
    unpack = r["unpack"]
    assert unpack["ratio"] == pytest.approx(
        sum(la["podfsm_s"] for la in r["layers"]) / sum(la["tar_s"] for la in r["layers"]))
    assert 0 < unpack["ratio"] < 10  # sane; docs/performance.md has the figures at full size
    assert os.listdir(tmp_path) == []  # the stores, the registry's blobs: all removed
