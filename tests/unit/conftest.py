"""Fixtures shared by the unit tests of the faces: a fake-driver rig, and the real daemon
serving it on a unix socket."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes import Rig
from tests.unit.test_http import Served


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # pytest's tmp_path can be too long for a unix socket path (107 bytes)
    d = tempfile.mkdtemp(prefix="podfsm-test-")
    yield d
    leftovers = os.listdir(d)
    shutil.rmtree(d)
    assert leftovers == [], "the daemon left its socket behind"


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


@pytest.fixture
def served(rig: Rig, sock_dir: str) -> Iterator[Served]:
    s = Served(rig, sock_dir).start()
    try:
        yield s
    finally:
        s.stop()
    rig.nothing_left()
