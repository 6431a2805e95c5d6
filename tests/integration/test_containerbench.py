"""`podfsm bench --containers` end to end, small: pod + container cycles on both handlers,
every figure printed, nothing left (no bench directory, no conmon)."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import pytest

from podfsm.faces.cli import main

pytestmark = pytest.mark.integration


def _conmons() -> list[str]:
    """Command lines of live conmons of a bench's directories."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if argv.startswith("/usr/bin/conmon") and "podfsm-bench-" in argv:
            found.append(argv)
    return found


def test_bench_containers_prints_every_figure(capsys: pytest.CaptureFixture[str]) -> None:
    before = set(glob.glob("/tmp/podfsm-bench-*"))
    assert main(["bench", "--containers", "-n", "2", "--concurrency", "1,2", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [r["runtime"] for r in results] == ["runc", "crun"]
    for r in results:
        assert [lv["pod_and_container"]["concurrency"] for lv in r["levels"]] == [1, 2]
        for lv in r["levels"]:
            mine, raw = lv["pod_and_container"], lv["raw_pod"]
            assert mine["count"] == 2 and mine["cycles_per_s"] > 0
            assert mine["run_ms"]["p50"] > lv["container_create_start_ms_p50"] > 0
            assert mine["cpu_ms_per_cycle_by_process"]["controller"] > 0
            assert raw["cycles_per_s"] > 0
    assert set(glob.glob("/tmp/podfsm-bench-*")) == before and _conmons() == []
