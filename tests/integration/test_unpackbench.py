"""`podfsm bench --unpack` end to end, on a smaller synthetic layer: both layers unpacked by
the store and by GNU tar, the figures printed."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest

from podfsm.faces.cli import build_parser, main
from podfsm.tools import unpackbench

pytestmark = pytest.mark.integration


def test_bench_unpack_prints_podfsm_and_tar_figures_for_both_layers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert shutil.which("tar") and Path(unpackbench.BUSYBOX).exists()
    args = build_parser().parse_args(["bench", "--unpack", "--unpack-dir", str(tmp_path)])
    assert (args.unpack, args.unpack_dir) == (True, str(tmp_path))
    monkeypatch.setattr(unpackbench, "synthetic_tar",
                        functools.partial(unpackbench.synthetic_tar, small=300, big=1, big_mb=2))
    assert main(["bench", "--unpack", "--unpack-dir", str(tmp_path), "--json"]) == 0
    results = {r["layer"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(results) == {"busybox", "synthetic"}
    assert results["synthetic"]["entries"] == 300 + 3 + 1  # files, 3 dirs, the big file
    assert results["busybox"]["entries"] > 200  # busybox and a hard link per applet
    for r in results.values():
        assert r["podfsm_mbps"] > 0 and r["tar_mbps"] > 0 and r["podfsm_cpu_s"] > 0
    assert list(tmp_path.iterdir()) == []  # its temporary directory is gone
