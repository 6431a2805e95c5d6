"""Host paths a pod config names (issue 17, items 2, 6, 7 and 8): spelled one way only, never
inside podfsm's own directories or the kernel's, log directories made and removed without
following a symlink and never under another pod, no cgroup parent inside another pod's cgroup,
and no stray entry among the records that stops a start. (The same against a real daemon, over
CRI and HTTP: tests/integration/test_paths.py.)"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from podfsm import ControllerConfig, InvalidPodConfig
from podfsm.core import paths
from podfsm.core.errors import SandboxRunError
from podfsm.core.records import SandboxFiles
from podfsm.core.spec import parse_pod_config
from podfsm.drivers.hostfiles import HostFiles, make_log_dirs, remove_dirs
from podfsm.drivers.store import FileStore
from tests.fakes import Rig


def pod(name: str = "web", **extra: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "default", "uid": f"u-{name}"}, **extra}


# ---------------------------------------------------------------- the pure rules


@pytest.mark.parametrize(("path", "problem"), [
    ("x/y", "absolute"), ("", "absolute"), ("/", "/ itself"), ("/x/", "end with '/'"),
    ("/x//y", "empty segment"), ("//x", "empty segment"), ("/x/.", "'.' or '..'"),
    ("/x/./y", "'.' or '..'"), ("/x/..", "'.' or '..'"), ("/./x", "'.' or '..'"),
])
def test_a_path_spelled_more_than_one_way_is_named(path: str, problem: str) -> None:
    assert problem in (paths.normalised_problem(path) or "")


@pytest.mark.parametrize("path", ["/x", "/x/y", "/x/...", "/x/.y", "/x/..y", "/x/y."])
def test_a_normalised_path_has_no_problem(path: str) -> None:
    assert paths.normalised_problem(path) is None


def test_within_ancestors_and_what_is_in_use() -> None:
    assert paths.within("/a/b", "/a") and paths.within("/a", "/a") and paths.within("/a", "/")
    assert not paths.within("/ab", "/a") and not paths.within("/a", "/a/b")
    assert list(paths.ancestors("/a/b/c")) == ["/a/b/c", "/a/b", "/a"]
    assert paths.in_use(["/a", "/a/b", "/a/b/c", "/x", "/y"], ["/a/b", "/x/"]) == {
        "/a/b", "/a", "/x"}
    assert paths.clean("/var/lib/podfsm/") == "/var/lib/podfsm"
    assert paths.legacy_chain("/a/b/c", "/a/b") == ["/a/b", "/a/b/c"]
    assert paths.legacy_chain("/a/b/c", "/x") == [] and paths.legacy_chain("/a", "") == []


# ---------------------------------------------------------------- the spec


@pytest.mark.parametrize(("value", "words"), [
    ("/logs/.", "'.' or '..'"), ("/logs/./pod", "'.' or '..'"), ("/logs/../etc", "'.' or '..'"),
    ("/logs//pod", "empty segment"), ("/logs/pod/", "end with '/'"), ("//logs", "empty"),
    ("/", "/ itself"), ("logs", "absolute"),
    ("/proc/1/x", "inside /proc"), ("/sys/fs/cgroup/memory/evil", "inside /sys"),
    ("/sys", "inside /sys"), ("/dev/shm/x", "inside /dev"),
    ("/sys/fs/cgroup/memory/evil/.", "'.' or '..'"),
])
def test_a_log_directory_spelled_otherwise_or_in_the_kernels_places_is_refused(
        value: str, words: str) -> None:
    with pytest.raises(InvalidPodConfig) as info:
        parse_pod_config(pod(log_directory=value))
    assert "log_directory" in str(info.value) and words in str(info.value)


@pytest.mark.parametrize("value", ["/var/log/pods/ns_web_1", "/devices/x", "/system/x",
                                   "/procs", "/x/..y", ""])
def test_a_plain_log_directory_is_taken_as_given(value: str) -> None:
    assert parse_pod_config(pod(log_directory=value)).log_directory == value


@pytest.mark.parametrize(("value", "words"), [
    ("/podfsm/x/.", "'.' or '..'"), ("/podfsm/./x", "'.' or '..'"), ("/podfsm//x", "empty"),
    ("/podfsm/x/", "end with '/'"), ("/", "/ itself"), ("podfsm/x", "absolute"),
])
def test_a_cgroup_parent_spelled_otherwise_is_refused(value: str, words: str) -> None:
    with pytest.raises(InvalidPodConfig) as info:
        parse_pod_config(pod(linux={"cgroup_parent": value}))
    assert "linux.cgroup_parent" in str(info.value) and words in str(info.value)


@pytest.mark.parametrize("root", ["/podfsm/.", "/podfsm/..", "/./podfsm"])
def test_a_cgroup_root_with_dot_segments_is_refused(root: str) -> None:
    with pytest.raises(ValidationError, match="cgroup_root"):
        ControllerConfig(cgroup_root=root)


# ---------------------------------------------------------------- the host driver


def test_log_directories_are_made_and_removed_through_descriptors(tmp_path: Path) -> None:
    real, made = make_log_dirs(f"{tmp_path}/a/b/c")
    assert real == f"{tmp_path}/a/b/c" and made == [f"{tmp_path}/a", f"{tmp_path}/a/b", real]
    assert os.path.isdir(real)
    # what exists is used, not made; a symlink in the part that exists is followed
    (tmp_path / "link").symlink_to(tmp_path / "a")
    assert make_log_dirs(f"{tmp_path}/link/b/d") == (f"{tmp_path}/a/b/d", [f"{tmp_path}/a/b/d"])
    assert remove_dirs(made, set()) == []  # /a/b holds d: it stays, with /a
    assert sorted(os.listdir(tmp_path / "a" / "b")) == ["d"]
    assert remove_dirs([f"{tmp_path}/a", f"{tmp_path}/a/b", f"{tmp_path}/a/b/d"], set()) == []
    assert not (tmp_path / "a").exists()


def test_a_file_where_a_directory_is_to_be_made_fails_and_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_text("")
    with pytest.raises(NotADirectoryError):
        make_log_dirs(f"{tmp_path}/a/f/x")
    assert os.listdir(tmp_path / "a") == ["f"]


def test_removal_never_follows_a_parent_swapped_for_a_symlink(tmp_path: Path) -> None:
    _, made = make_log_dirs(f"{tmp_path}/base/p/q")
    target = tmp_path / "target"
    os.rename(tmp_path / "base" / "p", target)  # p, with q, now lives elsewhere
    (tmp_path / "base" / "p").symlink_to(target)
    left = remove_dirs(made, set())
    assert (target / "q").is_dir(), "removal followed the symlink"
    assert (tmp_path / "base" / "p").is_symlink()
    assert any("not reached without a symlink" in why for why in left), left


def test_a_directory_another_sandbox_uses_is_left(tmp_path: Path) -> None:
    _, made = make_log_dirs(f"{tmp_path}/x/logs/sub")
    assert remove_dirs(made, paths.in_use(made, [f"{tmp_path}/x/logs"])) == []
    assert (tmp_path / "x" / "logs").is_dir() and not (tmp_path / "x" / "logs" / "sub").exists()


def test_a_record_of_an_older_podfsm_removes_its_chain(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    files = SandboxFiles(hostname_path=f"{tmp_path}/h", hosts_path=f"{tmp_path}/hs",
                         resolv_conf_path=f"{tmp_path}/r", shm_path=f"{tmp_path}/shm",
                         log_directory=f"{tmp_path}/a/b", log_directory_created=f"{tmp_path}/a")
    HostFiles(mount_shm=False)._remove(files, ())
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------- the controller


async def test_log_directories_in_podfsms_own_directories_are_refused(
        rig: Rig, tmp_path: Path) -> None:
    link = tmp_path / "innocent"
    async with rig.controller() as ctl:
        link.symlink_to(rig.cfg.state_dir)
        for where, value in (("state_dir", f"{rig.cfg.state_dir}/sandboxes/evil.tmp"),
                             ("run_dir", f"{rig.cfg.run_dir}/x"),
                             ("netns_dir", rig.cfg.netns_dir),
                             ("state_dir", f"{link}/evil")):
            with pytest.raises(InvalidPodConfig) as info:
                await ctl.run_sandbox(pod(log_directory=value))
            assert f"log_directory {value!r}" in str(info.value), info.value
            assert f"inside podfsm's {where}" in str(info.value), info.value
        (tmp_path / "tosys").symlink_to("/sys/fs/cgroup")
        with pytest.raises(InvalidPodConfig, match="/sys, a kernel pseudo-filesystem"):
            await ctl.run_sandbox(pod(log_directory=f"{tmp_path}/tosys/memory/evil"))
        assert await ctl.list_sandboxes() == []
    assert not os.path.lexists(f"{rig.cfg.state_dir}/sandboxes/evil.tmp")
    assert not os.path.lexists(f"{rig.cfg.run_dir}/x")
    rig.nothing_left()


async def test_a_symlink_swapped_in_after_admission_fails_the_run(
        rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # admission saw a plain directory; by the time the files are made it is a symlink into
    # the run dir: the run fails and leaves nothing there
    (tmp_path / "logs").mkdir()
    async with rig.controller() as ctl:
        host = ctl._host
        real_path = host.real_path

        def swap(path: str) -> str:
            seen = real_path(path)
            if path.endswith("/logs/pod"):  # right after admission looked
                (tmp_path / "logs").rmdir()
                (tmp_path / "logs").symlink_to(rig.cfg.run_dir)
            return seen

        monkeypatch.setattr(host, "real_path", swap)
        with pytest.raises(SandboxRunError, match="inside podfsm's run_dir"):
            await ctl.run_sandbox(pod(log_directory=f"{tmp_path}/logs/pod"))
        monkeypatch.undo()
        assert not os.path.lexists(f"{rig.cfg.run_dir}/pod")
        assert await ctl.list_sandboxes() == []
    rig.nothing_left()


@pytest.mark.parametrize("order", ["first made first removed", "last made first removed"])
async def test_a_log_directory_two_pods_use_goes_with_the_last(
        rig: Rig, tmp_path: Path, order: str) -> None:
    logs = tmp_path / "shared" / "logs"
    async with rig.controller() as ctl:
        a = await ctl.run_sandbox(pod("a", log_directory=str(logs)))
        b = await ctl.run_sandbox(pod("b", log_directory=str(logs)))
        c = await ctl.run_sandbox(pod("c", log_directory=str(logs / "deeper")))
        assert b.files is not None and b.files.log_directory_created == ""
        assert b.files.log_directories_made == [str(tmp_path / "shared"), str(logs)]
        first, second = (a, b) if order.startswith("first") else (b, a)
        await ctl.remove_sandbox(c.id)
        assert logs.is_dir() and not (logs / "deeper").exists()
        await ctl.remove_sandbox(first.id)
        assert logs.is_dir(), "removing one pod deleted the log directory under the other"
        await ctl.remove_sandbox(second.id)
    assert not (tmp_path / "shared").exists()
    rig.nothing_left()


async def test_a_cgroup_parent_inside_another_sandboxs_cgroup_is_refused(rig: Rig) -> None:
    async with rig.controller() as ctl:
        a = await ctl.run_sandbox(pod("a", linux={"cgroup_parent": "/podfsm/t-nest"}))
        for parent in (f"/podfsm/t-nest/{a.id}", f"/podfsm/t-nest/{a.id}/deeper"):
            with pytest.raises(InvalidPodConfig) as info:
                await ctl.run_sandbox(pod("b", linux={"cgroup_parent": parent}))
            assert "linux.cgroup_parent" in str(info.value)
            assert f"inside the cgroup of sandbox {a.id}" in str(info.value)
        # a sibling of its cgroup, under the same parent, and one above it are fine
        b = await ctl.run_sandbox(pod("b", linux={"cgroup_parent": "/podfsm/t-nest/b"}))
        c = await ctl.run_sandbox(pod("c", linux={"cgroup_parent": "/podfsm"}))
        for st in (a, b, c):
            await ctl.remove_sandbox(st.id)
    rig.nothing_left()


# ---------------------------------------------------------------- the store


async def test_stray_entries_among_the_records_are_set_aside(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = FileStore(str(tmp_path / "state"))
    s.open()
    try:
        strays = {"evil.tmp": "dir", "other": "dir", "notes": "file", "pipe.tmp": "fifo",
                  "gone.tmp": "symlink", "x\x1b[2J.tmp": "dir"}
        for name, kind in strays.items():
            path = os.path.join(s.dir, name)
            {"dir": os.mkdir, "fifo": os.mkfifo, "file": lambda p: Path(p).write_text("x"),
             "symlink": lambda p: os.symlink("/etc/hostname", p)}[kind](path)
        (tmp_path / "state" / "corrupt").mkdir()
        (tmp_path / "state" / "corrupt" / "evil.tmp").mkdir()  # set aside by an earlier start
        with caplog.at_level(logging.ERROR):
            records, aside = await s.load_all()
        assert records == [] and os.listdir(s.dir) == []
        assert os.path.exists("/etc/hostname")  # the link went, never what it names
        shown = {a.sandbox_id for a in aside}
        assert shown == {"evil.tmp", "other", "notes", "x\\x1b[2J.tmp"}
        quarantine = sorted(os.listdir(tmp_path / "state" / "corrupt"))
        assert quarantine == sorted(["evil.tmp", "evil.tmp.1", "other", "notes", "x\x1b[2J.tmp"])
        problems = " ".join(a.problem for a in aside)
        assert "a temporary name that is a directory" in problems
        assert "not a record's slot file" in problems and "\x1b" not in caplog.text
    finally:
        s.close()


async def test_a_record_whose_made_directories_lie_elsewhere_is_set_aside(
        rig: Rig, tmp_path: Path) -> None:
    # removal takes the directories a record says podfsm made: only the log directory and
    # those above it may be among them
    async with rig.controller() as ctl:
        st = await ctl.run_sandbox(pod(log_directory=str(tmp_path / "logs" / "pod")))
        await ctl.stop_sandbox(st.id)
    empty = tmp_path / "someone-elses"
    empty.mkdir()
    rec = rig.store.records[st.id]
    assert rec.files is not None
    made = [*rec.files.log_directories_made, str(empty)]
    rig.store.records[st.id] = rec.evolve(
        pending="remove", files=rec.files.model_copy(update={"log_directories_made": made}))
    async with rig.controller() as ctl:
        assert await ctl.list_sandboxes() == []
        (problem,) = ctl.recovery_problems
        assert st.id in problem and "log directories made" in problem
    assert empty.is_dir()
    rig.nothing_left()
