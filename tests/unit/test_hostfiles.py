"""The host driver's sandbox run directories: made 0711 whatever the umask, listed, removed
without following a symlink. (The sandbox's files and its /dev/shm tmpfs are proved on the real
kernel by the integration tests.)"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from podfsm.drivers.hostfiles import HostFiles


def test_a_sandbox_dir_is_made_0711_whatever_the_umask_and_twice_is_fine(tmp_path: Path) -> None:
    host = HostFiles(mount_shm=False)
    path = tmp_path / "run" / "sandboxes" / "a"
    old = os.umask(0o077)
    try:
        host.create_sandbox_dir(str(path))
        host.create_sandbox_dir(str(path))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o711


def test_sandbox_dirs_lists_the_parent_and_nothing_when_it_is_missing(tmp_path: Path) -> None:
    host = HostFiles(mount_shm=False)
    parent = tmp_path / "sandboxes"
    assert host.sandbox_dirs(str(parent)) == []
    for name in ("a", "b"):
        host.create_sandbox_dir(str(parent / name))
    assert sorted(host.sandbox_dirs(str(parent))) == ["a", "b"]
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert host.sandbox_dirs(str(blocker)) == []


def test_removing_a_sandbox_dir_takes_what_is_in_it_and_never_follows_a_symlink(
        tmp_path: Path) -> None:
    host = HostFiles(mount_shm=False)
    path = tmp_path / "sandboxes" / "a"
    host.create_sandbox_dir(str(path))
    (path / "hostname").write_text("pod\n")
    (path / "shm").mkdir()  # a mount point left empty by release_shm
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("")
    (path / "link").symlink_to(outside)
    host.remove_sandbox_dir(str(path))
    assert not path.exists()
    assert (outside / "keep").exists()
    host.remove_sandbox_dir(str(path))  # gone already: fine
    # a symlink in the directory's place is refused, and what it points at stays
    path.symlink_to(outside)
    with pytest.raises(OSError):
        host.remove_sandbox_dir(str(path))
    assert (outside / "keep").exists()
