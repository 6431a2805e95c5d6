"""Host paths a pod config names, against a real `podfsm serve` over CRI and HTTP (issue 17,
items 2, 6, 7 and 8): a log directory inside podfsm's own directories or the kernel's, a path
with '.', '..' or empty segments, a cgroup parent inside another pod's cgroup are refused
naming the field, leave nothing, and the daemon restarts after them; a stray entry among the
records does not stop a start; removal never follows a parent swapped for a symlink and never
takes a log directory another pod uses.

Every test has its own directories, network and daemon (make_env, serving) and removes the
cgroups and directories it names even when it fails. (The pure rules and the drivers:
tests/unit/test_paths.py.)"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cri_api.v1 import api_pb2 as pb
from cri_api.v1 import api_pb2_grpc as pb_grpc

from tests.integration.conftest import Env, destroy_env, make_env
from tests.integration.test_cri import config, grpc_code
from tests.integration.test_faces import Daemon, check_error, serving, use_env_network

pytestmark = pytest.mark.integration

CGROUP_ROOT = "/podfsm"  # the daemon's default cgroup_root


def _probe(kind: str) -> str:
    """A name for this run's probes on the host (cgroups), found and removed by _cgroups_of."""
    return f"pfsm-{kind}-{os.getpid()}"


def _cgroups_of(name: str) -> list[str]:
    """Every cgroup directory, in any hierarchy, named `name` (at the top of a hierarchy or
    under podfsm's root), with every one below it."""
    tops = {d for pattern in (f"/sys/fs/cgroup/*/{name}", f"/sys/fs/cgroup/{name}",
                              f"/sys/fs/cgroup/*{CGROUP_ROOT}/{name}",
                              f"/sys/fs/cgroup{CGROUP_ROOT}/{name}")
            for d in glob.glob(pattern) if os.path.isdir(d)}
    return sorted(w[0] for top in tops for w in os.walk(top))


@contextlib.contextmanager
def _no_cgroups_left(*names: str) -> Iterator[None]:
    """Remove, however the test ends, the cgroups named `names` that a wrong daemon made."""
    try:
        yield
    finally:
        for name in names:
            for d in sorted(_cgroups_of(name), key=len, reverse=True):
                with contextlib.suppress(OSError):
                    os.rmdir(d)


@contextlib.contextmanager
def _daemon_env(runtime: str = "runc") -> Iterator[Env]:
    env = make_env(runtime)
    try:
        use_env_network(env)
        yield env
    finally:
        destroy_env(env)


def _pod(name: str, **extra: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "paths-test", "uid": f"uid-{name}"},
            "linux": {"security_context": {"namespace_options": {
                "userns_options": {"mode": "POD"}}}}, **extra}


def _cri_config(name: str, log_directory: str = "", cgroup_parent: str = "") -> pb.PodSandboxConfig:
    cfg = config(name, log_directory=log_directory)
    cfg.linux.cgroup_parent = cgroup_parent
    return cfg


def _refused_over_both(d: Daemon, rt: pb_grpc.RuntimeServiceStub, name: str, field: str,
                       value: str, words: str) -> None:
    """A pod with `field` (log_directory, or linux.cgroup_parent) `value` is refused over
    HTTP (422) and CRI (INVALID_ARGUMENT), each error naming the field and `words`."""
    body = (_pod(name, log_directory=value) if field == "log_directory"
            else _pod(name, linux={"cgroup_parent": value}))
    with d.client() as c:
        msg = check_error(c.post("/v1/sandboxes", json=body), 422, "InvalidPodConfig")
    assert field in msg and words in msg, (value, msg)
    cri = (_cri_config(name, log_directory=value) if field == "log_directory"
           else _cri_config(name, cgroup_parent=value))
    code, msg = grpc_code(rt.RunPodSandbox, pb.RunPodSandboxRequest(config=cri))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and field in msg and words in msg, (value,
                                                                                         msg)


def _recovery_problems(rt: pb_grpc.RuntimeServiceStub) -> list[str]:
    info = rt.Status(pb.StatusRequest(verbose=True), timeout=30).info
    return list(json.loads(info["recoveryProblems"]))


def _run_http(d: Daemon, body: dict[str, Any]) -> str:
    with d.client() as c:
        r = c.post("/v1/sandboxes", json=body)
        assert r.status_code == 201, r.text
        return str(r.json()["id"])


def _remove_http(d: Daemon, sid: str) -> None:
    with d.client() as c:
        assert c.post(f"/v1/sandboxes/{sid}/stop").status_code == 200
        assert c.delete(f"/v1/sandboxes/{sid}").status_code == 204


def _remove_cri(rt: pb_grpc.RuntimeServiceStub, sid: str) -> None:
    rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=60)
    rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)


# ---------------------------------------------------------------- item 2


def test_log_directories_in_podfsms_or_the_kernels_directories_are_refused_and_it_restarts(
) -> None:
    memcg = _probe("memlog")
    with _daemon_env() as env, _no_cgroups_left(memcg):
        c = env.cfg
        link = os.path.join(env.tmp, "innocent")
        os.symlink(c.state_dir, link)
        hostile = [
            (f"{c.state_dir}/sandboxes/evil.tmp", "inside podfsm's state_dir"),
            (f"{c.state_dir}/evil", "inside podfsm's state_dir"),
            (f"{c.run_dir}/evil", "inside podfsm's run_dir"),
            (f"{c.run_dir}/sandboxes/{'e' * 64}", "inside podfsm's run_dir"),  # an "orphan"
            (f"{c.netns_dir}/evil", "inside podfsm's netns_dir"),
            (f"{link}/sandboxes/evil.tmp", "inside podfsm's state_dir"),  # through a symlink
            ("/proc/pfsm-probe", "inside /proc"),
            (f"/sys/fs/cgroup/memory/{memcg}", "inside /sys"),
            ("/dev/pfsm-probe", "inside /dev"),
        ]
        with serving(env) as d, grpc.insecure_channel(f"unix:{d.cri_socket}") as ch:
            rt = pb_grpc.RuntimeServiceStub(ch)
            keeper = _run_http(d, _pod("keeper"))
            for i, (value, words) in enumerate(hostile):
                _refused_over_both(d, rt, f"hostile-{i}", "log_directory", value, words)
                assert d.alive()
            for value, _ in hostile:
                assert not os.path.lexists(value.replace(link, c.state_dir)), value
            assert _cgroups_of(memcg) == []
            assert sorted(os.listdir(os.path.join(c.state_dir, "sandboxes"))) == [
                f"{keeper}.0.rec", f"{keeper}.1.rec"]
            assert d.terminate() == 0
        # the next start finds nothing it cannot read, and the pod it left is still there
        with serving(env) as d, grpc.insecure_channel(f"unix:{d.cri_socket}") as ch:
            rt = pb_grpc.RuntimeServiceStub(ch)
            assert _recovery_problems(rt) == []
            st = rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=keeper),
                                     timeout=30).status
            assert st.state == pb.SANDBOX_READY
            _remove_cri(rt, keeper)
            assert d.terminate() == 0
        assert env.leftovers() == {}


def test_a_stray_entry_among_the_records_does_not_stop_the_start() -> None:
    with _daemon_env() as env:
        records = os.path.join(env.cfg.state_dir, "sandboxes")
        with serving(env) as d:
            keeper = _run_http(d, _pod("keeper"))
            assert d.terminate() == 0
        # what a log directory there made of it before, and other strays
        os.makedirs(os.path.join(records, "evil.tmp", "logs"))
        os.mkdir(os.path.join(records, "junk"))
        Path(records, "notes").write_text("x")
        os.mkfifo(os.path.join(records, "pipe.tmp"))
        with serving(env) as d, grpc.insecure_channel(f"unix:{d.cri_socket}") as ch:
            rt = pb_grpc.RuntimeServiceStub(ch)
            problems = " | ".join(_recovery_problems(rt))
            for name in ("evil.tmp", "junk", "notes"):
                assert f"unexpected entry {name} set aside" in problems, problems
            assert "pipe.tmp" not in problems  # a temporary file: removed as ever
            assert sorted(os.listdir(records)) == [f"{keeper}.0.rec", f"{keeper}.1.rec"]
            assert sorted(os.listdir(os.path.join(env.cfg.state_dir, "corrupt"))) == [
                "evil.tmp", "junk", "notes"]
            st = rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=keeper),
                                     timeout=30).status
            assert st.state == pb.SANDBOX_READY  # supervised again, not collected
            _remove_cri(rt, keeper)
            assert d.terminate() == 0
        assert env.leftovers() == {}


# ---------------------------------------------------------------- item 6


def test_paths_with_dot_or_empty_segments_are_refused_and_leave_nothing() -> None:
    memcg, parent = _probe("memdot"), _probe("dot")
    with _daemon_env() as env, _no_cgroups_left(memcg, parent):
        t = env.tmp
        logs = [(f"{t}/probe/.", "'.' or '..'"), (f"{t}/x/./y", "'.' or '..'"),
                (f"{t}/x//y", "empty segment"), (f"{t}/x/y/", "end with '/'"),
                (f"/sys/fs/cgroup/memory/{memcg}/.", "'.' or '..'")]
        parents = [(f"{CGROUP_ROOT}/{parent}/.", "'.' or '..'"),
                   (f"{CGROUP_ROOT}/./{parent}", "'.' or '..'"),
                   (f"{CGROUP_ROOT}//{parent}", "empty segment"),
                   (f"{CGROUP_ROOT}/{parent}/", "end with '/'")]
        with serving(env) as d, grpc.insecure_channel(f"unix:{d.cri_socket}") as ch:
            rt = pb_grpc.RuntimeServiceStub(ch)
            for i, (value, words) in enumerate(logs):
                _refused_over_both(d, rt, f"dot-log-{i}", "log_directory", value, words)
            for i, (value, words) in enumerate(parents):
                _refused_over_both(d, rt, f"dot-cg-{i}", "linux.cgroup_parent", value, words)
            # spelled one way, the same paths run and leave nothing
            sid = _run_http(d, _pod("plain", log_directory=f"{t}/x/y",
                                    linux={"cgroup_parent": f"{CGROUP_ROOT}/{parent}"}))
            assert os.path.isdir(f"{t}/x/y") and _cgroups_of(parent)
            _remove_http(d, sid)
            assert d.terminate() == 0
        assert not os.path.lexists(f"{t}/probe") and not os.path.lexists(f"{t}/x")
        assert _cgroups_of(memcg) == [] and _cgroups_of(parent) == []
        with serving(env) as d, grpc.insecure_channel(f"unix:{d.cri_socket}") as ch:
            assert _recovery_problems(pb_grpc.RuntimeServiceStub(ch)) == []
            assert d.terminate() == 0
        assert env.leftovers() == {}


# ---------------------------------------------------------------- item 7


def test_removal_never_follows_a_parent_swapped_for_a_symlink() -> None:
    with _daemon_env() as env:
        outside = os.path.join(env.tmp, "outside")  # stands for any directory of the host
        with serving(env) as d, grpc.insecure_channel(f"unix:{d.cri_socket}") as ch:
            rt = pb_grpc.RuntimeServiceStub(ch)
            made = {}
            for face in ("http", "cri"):
                base = os.path.join(env.tmp, f"logs-{face}")
                os.mkdir(base)
                log_dir = f"{base}/p/q"
                if face == "http":
                    made[face] = _run_http(d, _pod("swap-http", log_directory=log_dir))
                else:
                    made[face] = rt.RunPodSandbox(pb.RunPodSandboxRequest(
                        config=_cri_config("swap-cri", log_directory=log_dir)),
                        timeout=60).pod_sandbox_id
                assert os.path.isdir(log_dir)
                # after the run, p (which podfsm made) moves away and a symlink takes its
                # place: removal must not reach through it to the q that now lives elsewhere
                target = os.path.join(outside, face)
                os.makedirs(outside, exist_ok=True)
                os.rename(f"{base}/p", target)
                os.symlink(target, f"{base}/p")
            _remove_http(d, made["http"])
            _remove_cri(rt, made["cri"])
            for face in ("http", "cri"):
                assert os.path.isdir(os.path.join(outside, face, "q")), \
                    f"removal ({face}) followed the symlink and removed what it points at"
                assert os.path.islink(os.path.join(env.tmp, f"logs-{face}", "p"))
            assert "not reached without a symlink" in d.log_text()
            assert d.terminate() == 0
        assert env.leftovers() == {}


def test_a_log_directory_two_pods_share_stays_until_the_last_is_removed() -> None:
    with _daemon_env() as env:
        shared = os.path.join(env.tmp, "shared")
        log_dir = f"{shared}/logs"
        with serving(env) as d, grpc.insecure_channel(f"unix:{d.cri_socket}") as ch:
            rt = pb_grpc.RuntimeServiceStub(ch)
            a = _run_http(d, _pod("share-a", log_directory=log_dir))
            b = rt.RunPodSandbox(pb.RunPodSandboxRequest(
                config=_cri_config("share-b", log_directory=log_dir)), timeout=60).pod_sandbox_id
            c = _run_http(d, _pod("share-c", log_directory=f"{log_dir}/deeper"))
            _remove_cri(rt, a)  # the pod that made it goes first
            assert os.path.isdir(log_dir), "removing one pod deleted the other's log directory"
            assert os.path.isdir(f"{log_dir}/deeper")
            _remove_http(d, c)
            assert os.path.isdir(log_dir) and not os.path.lexists(f"{log_dir}/deeper")
            assert d.terminate() == 0
        # across a restart, the last one still knows the directories are its to remove
        with serving(env) as d, grpc.insecure_channel(f"unix:{d.cri_socket}") as ch:
            _remove_cri(pb_grpc.RuntimeServiceStub(ch), b)
            assert d.terminate() == 0
        assert not os.path.lexists(shared)
        assert env.leftovers() == {}


# ---------------------------------------------------------------- item 8


def test_a_cgroup_parent_inside_another_pods_cgroup_is_refused(runtime: str) -> None:
    name = _probe(f"nest-{runtime}")
    parent = f"{CGROUP_ROOT}/{name}"
    with _daemon_env(runtime) as env, _no_cgroups_left(name):
        with serving(env) as d, grpc.insecure_channel(f"unix:{d.cri_socket}") as ch:
            rt = pb_grpc.RuntimeServiceStub(ch)
            a = rt.RunPodSandbox(pb.RunPodSandboxRequest(
                config=_cri_config("nest-a", cgroup_parent=parent)), timeout=60).pod_sandbox_id
            for i, inside in enumerate((f"{parent}/{a}", f"{parent}/{a}/deeper")):
                _refused_over_both(d, rt, f"nest-b{i}", "linux.cgroup_parent", inside,
                                   f"inside the cgroup of sandbox {a}")
            # nothing was made inside A's cgroups
            cgroups_of_a = [p for p in _cgroups_of(name) if p.endswith(a)]
            assert cgroups_of_a and not [e for p in cgroups_of_a for e in os.listdir(p)
                                         if os.path.isdir(os.path.join(p, e))]
            # beside its cgroup, under the same parent: fine; removing A then leaves the
            # parent to the other, and removing the other takes it
            c = _run_http(d, _pod("nest-c", linux={"cgroup_parent": f"{parent}/inner"}))
            _remove_cri(rt, a)
            left = _cgroups_of(name)
            assert left and all(p.endswith((name, "inner", c)) for p in left), left
            _remove_http(d, c)
            assert _cgroups_of(name) == []
            assert d.terminate() == 0
        with serving(env) as d, grpc.insecure_channel(f"unix:{d.cri_socket}") as ch:
            assert _recovery_problems(pb_grpc.RuntimeServiceStub(ch)) == []
            assert d.terminate() == 0
        assert env.leftovers() == {}
