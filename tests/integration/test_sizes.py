"""What a client can send that is too large, or that names what it should not, against a real
`podfsm serve` (issue 17, items 3, 4, 5, 9, 10 and 12): an accepted pod is one the store keeps
and a client can list; a record unreadable at start-up does not destroy its pod; a seccomp path
never hands the daemon a terminal nor releases a FIFO's writer, and its errors tell nothing of
the file; an id of any length gets a short answer; reserved names do not collide."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cri_api.v1 import api_pb2 as pb
from cri_api.v1 import api_pb2_grpc as pb_grpc
from google.protobuf.json_format import ParseDict

from podfsm.core import sizes
from podfsm.core.spec import parse_pod_config
from tests.integration.conftest import Env, destroy_env, make_env
from tests.integration.test_cri import Crictl, handler_containers
from tests.integration.test_faces import Daemon, podfsm, serving, use_env_network
from tests.worst import worst_listed

pytestmark = pytest.mark.integration

#: what crictl and the kubelet receive at most (gRPC's default, which they keep)
CLIENT_OPTIONS = [("grpc.max_receive_message_length", sizes.GRPC_MAX_MESSAGE),
                  ("grpc.max_send_message_length", 64 << 20)]


@pytest.fixture
def runc_env() -> Iterator[Env]:
    """One runtime where the runtime does not matter (both are installed in every daemon)."""
    e = make_env("runc")
    use_env_network(e)
    try:
        yield e
    finally:
        destroy_env(e)


def stub(d: Daemon) -> tuple[grpc.Channel, pb_grpc.RuntimeServiceStub]:
    ch = grpc.insecure_channel(f"unix:{d.cri_socket}", options=CLIENT_OPTIONS)
    return ch, pb_grpc.RuntimeServiceStub(ch)


def cri_config(data: dict[str, Any]) -> pb.PodSandboxConfig:
    return ParseDict(data, pb.PodSandboxConfig())


def run(rt: pb_grpc.RuntimeServiceStub, data: dict[str, Any]) -> str:
    resp = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=cri_config(data)), timeout=120)
    return str(resp.pod_sandbox_id)


def refused(fn: Any, request: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn(request, timeout=120)
    return info.value.code(), info.value.details()


def record_sizes(env: Env, sid: str) -> list[int]:
    d = os.path.join(env.cfg.state_dir, "sandboxes")
    return [os.path.getsize(os.path.join(d, n)) for n in os.listdir(d) if n.startswith(sid)]


def remove_all(rt: pb_grpc.RuntimeServiceStub) -> None:
    for item in rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=60).items:
        rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=item.id), timeout=120)


def longest_log_line(d: Daemon) -> int:
    return max((len(line) for line in d.log_text().splitlines()), default=0)


# ------------------------------------------------------------------ item 3: the record


def test_what_admission_accepts_the_store_keeps_across_a_restart(runc_env: Env) -> None:
    env = runc_env
    # the issue's pod: 40 annotations of 65536 backslashes, a 5.2 MB record
    issue = {"metadata": {"name": "issue", "namespace": "t", "uid": "u"},
             "annotations": {f"a{i}": "\\" * 65536 for i in range(40)}}
    largest = dict(worst_listed("largest"), linux={"security_context": {
        "namespace_options": {"network": "NODE"}}})
    with serving(env) as d:
        ch, rt = stub(d)
        with ch:
            code, said = refused(rt.RunPodSandbox,
                                 pb.RunPodSandboxRequest(config=cri_config(issue)))
            assert code is grpc.StatusCode.INVALID_ARGUMENT
            assert "annotations: 2621550 bytes of keys and values in all, more than 262144" \
                in said
            # 40 refused values of 64 KiB: the answer names a few, quoting little of each
            bad = dict(issue, annotations={f"a{i}": "\x01" * 65536 for i in range(40)})
            code, said = refused(rt.RunPodSandbox,
                                 pb.RunPodSandboxRequest(config=cri_config(bad)))
            assert code is grpc.StatusCode.INVALID_ARGUMENT and len(said) < 2500
            assert said.endswith("and 32 more")
            with d.client() as c:
                # five of them (the HTTP face takes bodies of 1 MiB at most)
                some = dict(issue, annotations=dict(list(issue["annotations"].items())[:5]))
                r = c.post("/v1/sandboxes", json=some)
                assert r.status_code == 422, r.text
                assert "annotations: 327690 bytes of keys and values" in r.json()["error"]
            sid = run(rt, largest)
            st = rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid,
                                                                verbose=True), timeout=60)
            pid = json.loads(st.info["info"])["pid"]
            # labels and annotations doubled by JSON's escaping, and the rest
            assert 1 << 20 < max(record_sizes(env, sid)) < sizes.ADMITTED_RECORD_BYTES
        assert d.terminate() == 0
    assert os.path.exists(f"/proc/{pid}")
    with serving(env) as d:
        ch, rt = stub(d)
        with ch:
            st = rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=60)
            assert st.status.state == pb.SANDBOX_READY
            assert dict(st.status.annotations) == largest["annotations"]
            assert "corrupt" not in d.log_text()
            remove_all(rt)
        assert not os.path.exists(f"/proc/{pid}")
        assert d.terminate() == 0
    assert env.leftovers() == {}


@pytest.mark.parametrize("runtime", ["runc", "crun"])
def test_a_pod_whose_record_cannot_be_read_at_start_is_kept_until_removed(
        runtime: str) -> None:
    env = make_env(runtime)
    try:
        use_env_network(env)
        with serving(env) as d:
            ch, rt = stub(d)
            with ch:
                sid = run(rt, {"metadata": {"name": "kept", "namespace": "t", "uid": "u"}})
                other = run(rt, {"metadata": {"name": "other", "namespace": "t", "uid": "u"}})
                st = rt.PodSandboxStatus(pb.PodSandboxStatusRequest(
                    pod_sandbox_id=sid, verbose=True), timeout=60)
                info = json.loads(st.info["info"])
                pid, netns, ip = info["pid"], info["netnsPath"], st.status.network.ip
            assert d.terminate() == 0
        records = os.path.join(env.cfg.state_dir, "sandboxes")
        for name in os.listdir(records):
            if name.startswith(sid):
                with open(os.path.join(records, name), "r+b") as f:
                    f.seek(40)
                    f.write(b"garbage")  # both slots: nothing of the record can be read
        for _start in range(2):  # the stand-in is written: the next start keeps it too
            with serving(env) as d:
                ch, rt = stub(d)
                with ch:
                    items = {p.id: p for p in rt.ListPodSandbox(pb.ListPodSandboxRequest(),
                                                                timeout=60).items}
                    assert set(items) == {sid, other}
                    kept = items[sid]
                    assert kept.state == pb.SANDBOX_NOTREADY
                    assert (kept.metadata.name, kept.metadata.namespace) == (
                        f"set-aside-{sid[:12]}", "podfsm")
                    assert kept.labels["podfsm.io/set-aside"] == "true"
                    assert items[other].state == pb.SANDBOX_READY
                    status = rt.Status(pb.StatusRequest(verbose=True), timeout=60)
                    assert any(sid in p and "remove the sandbox" in p
                               for p in json.loads(status.info["recoveryProblems"]))
                    with d.client() as c:
                        err = c.get(f"/v1/sandboxes/{sid}").json()["last_error"]
                    assert "set aside at start-up" in err and "torn record" in err
                    # nothing of it was touched: its pause, its netns, its address
                    assert os.path.exists(f"/proc/{pid}") and os.path.exists(netns)
                    assert sid in handler_containers(env, runtime)
                    assert ip in env.reservations() and len(env.reservations()) == 2
                    assert d.terminate() == 0
        with serving(env) as d:
            labelled = Crictl(d).ok("pods", "-q", "--label", "podfsm.io/set-aside=true")
            assert labelled.split() == [sid]
            ch, rt = stub(d)
            with ch:
                remove_all(rt)
            assert not os.path.exists(f"/proc/{pid}") and not os.path.exists(netns)
            assert d.terminate() == 0
        assert handler_containers(env, runtime) == []
        assert env.leftovers() == {}
    finally:
        destroy_env(env)


# ------------------------------------------------------------------ item 5: the list


def test_a_full_node_lists_within_what_grpc_clients_receive(runc_env: Env) -> None:
    env = runc_env

    def largest(i: int, fill: str = "\\") -> dict[str, Any]:
        return dict(worst_listed(f"p{i}-", fill), linux={"security_context": {
            "namespace_options": {"network": "NODE"}}})

    fits = sizes.LIST_BUDGET_BYTES // sizes.list_entry_bytes(parse_pod_config(largest(10)))
    with serving(env) as d:
        ch, rt = stub(d)
        with ch:
            for i in range(fits):
                run(rt, largest(i))
            code, said = refused(rt.RunPodSandbox,
                                 pb.RunPodSandboxRequest(config=cri_config(largest(fits))))
            assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"{fits} sandboxes take" in said and "remove sandboxes first" in said
            with d.client() as c:
                # as large a list entry, in a body the HTTP face takes (1 MiB at most)
                r = c.post("/v1/sandboxes", json=largest(fits, fill="a"))
                assert r.status_code == 409 and r.json()["kind"] == "NodeFull"
            # a client with gRPC's default limit receives the whole list and its stats
            listed = rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=120)
            assert len(listed.items) == fits
            assert sizes.LIST_BUDGET_BYTES - (1 << 20) < listed.ByteSize() \
                < sizes.GRPC_MAX_MESSAGE
            stats = rt.ListPodSandboxStats(pb.ListPodSandboxStatsRequest(), timeout=120)
            assert len(stats.stats) == fits and stats.ByteSize() < sizes.GRPC_MAX_MESSAGE
            assert len(Crictl(d).ok("pods", "-q").split()) == fits
            remove_all(rt)
        assert d.terminate() == 0
    assert env.leftovers() == {}


# ------------------------------------------------------------------ items 4 and 9: seccomp


def tty_nr(pid: int) -> int:
    """The controlling terminal of `pid` (/proc/<pid>/stat field 7; 0: none)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[4])


def test_a_seccomp_path_hands_the_daemon_no_terminal_and_no_fifo_and_tells_nothing(
        runc_env: Env) -> None:
    env = runc_env
    tmp = Path(env.tmp)
    fifo = tmp / "fifo"
    os.mkfifo(fifo)
    secret = tmp / "secret.json"
    secret.write_text('{"defaultAction": "hunter2-secret"}')
    secret.chmod(0o600)
    binary = tmp / "binary"
    binary.write_bytes(b"\xfe\xedsecret")
    master, terminal = os.openpty()
    pts = os.ttyname(terminal)
    os.close(terminal)
    # a writer blocked in open(2) until a reader comes: a refusal must not release it
    writer = subprocess.Popen(["sh", "-c", f"echo written > {fifo}"])
    answers: dict[str, str] = {}
    try:
        with serving(env, new_session=True) as d:
            pid = d.proc.pid
            assert os.getsid(pid) == pid and tty_nr(pid) == 0
            ch, rt = stub(d)
            with ch:
                for what, path in {"pty": pts, "fifo": str(fifo), "missing": str(tmp / "none"),
                                   "directory": str(tmp), "dev": "/dev/null",
                                   "secret": str(secret), "binary": str(binary)}.items():
                    data = {"metadata": {"name": what, "namespace": "t"}, "linux": {
                        "security_context": {"seccomp": {"profile_type": "Localhost",
                                                         "localhost_ref": path}}}}
                    code, said = refused(rt.RunPodSandbox,
                                         pb.RunPodSandboxRequest(config=cri_config(data)))
                    assert code is grpc.StatusCode.INVALID_ARGUMENT, (what, said)
                    with d.client() as c:
                        r = c.post("/v1/sandboxes", json=data)
                    assert r.status_code == 422 and r.json()["error"] == said, what
                    answers[what] = said.replace(repr(path), "<path>")
                assert tty_nr(pid) == 0  # the terminal did not become the daemon's
                time.sleep(0.3)
                assert writer.poll() is None, "the FIFO's writer was released"
                os.close(master)
                master = -1
                time.sleep(0.5)  # a controlling process would get SIGHUP now, and die
                assert d.alive()
                assert rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=60).items == []
            assert d.terminate() == 0
    finally:
        if master >= 0:
            os.close(master)
        if writer.poll() is None:
            with open(fifo, "rb") as f:  # release the writer
                f.read()
        writer.wait(10)
    head = "linux.security_context.seccomp.localhost_ref: the seccomp profile <path> cannot be used"
    unreadable = head + ": it is not a readable regular file"
    assert {answers[w] for w in ("pty", "fifo", "missing", "directory", "dev")} == {unreadable}
    assert answers["secret"].startswith(head + ": its defaultAction is missing or not one of")
    assert "hunter2" not in answers["secret"]
    assert answers["binary"] == head + ": it is not JSON in UTF-8"
    assert env.leftovers() == {}


# ------------------------------------------------------------------ item 10: ids


def test_an_id_of_any_length_gets_a_short_answer_everywhere(runc_env: Env) -> None:
    env = runc_env
    huge = "a" * 100_000 + "!"
    long_hex = "a" * 100_000
    with serving(env) as d:
        ch, rt = stub(d)
        with ch:
            sid = run(rt, {"metadata": {"name": "one", "namespace": "t"}})
            for bad in (huge, long_hex, "\x1b[2J"):
                for fn, req in ((rt.PodSandboxStatus, pb.PodSandboxStatusRequest),
                                (rt.PodSandboxStats, pb.PodSandboxStatsRequest)):
                    code, said = refused(fn, req(pod_sandbox_id=bad))
                    assert code is grpc.StatusCode.NOT_FOUND
                    assert len(said) < 200 and "\x1b" not in said and "aaaaaaaaaa" not in said
                    assert "not a sandbox id" in said
                # stop and remove are idempotent: an id that names nothing is done already
                rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=bad), timeout=60)
                rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=bad), timeout=60)
                flt = pb.PodSandboxFilter(id=bad)
                assert rt.ListPodSandbox(pb.ListPodSandboxRequest(filter=flt),
                                         timeout=60).items == []
            with d.client() as c:
                for path in (f"/v1/sandboxes/{'a' * 12_000}", f"/v1/sandboxes/{'g' * 64}/stop",
                             f"/v1/sandboxes/{'a' * 12_000}/graph"):
                    r = c.get(path) if "stop" not in path else c.post(path)
                    assert r.status_code == 400, (path[:40], r.status_code)
                    assert len(r.text) < 300 and "aaaaaaaaaa" not in r.text
            cli = podfsm(d.socket, "inspectp", huge)
            assert cli.returncode == 1 and len(cli.stderr) < 300, cli.stderr[:300]
            assert "not a sandbox id (100001 characters" in cli.stderr
            cli = podfsm(d.socket, "rmp", "\x1b[2J")
            assert cli.returncode == 1 and "\x1b" not in cli.stderr + cli.stdout
            rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)
        assert longest_log_line(d) < 1000
        assert d.terminate() == 0
    assert env.leftovers() == {}


# ------------------------------------------------------------------ item 12: names


def test_names_that_join_alike_are_different_pods(runc_env: Env) -> None:
    env = runc_env
    first = {"metadata": {"name": "x_y", "namespace": "z"}}
    second = {"metadata": {"name": "x", "namespace": "y_z"}}
    with serving(env) as d:
        ch, rt = stub(d)
        with ch:
            a, b = run(rt, first), run(rt, second)
            code, said = refused(rt.RunPodSandbox,
                                 pb.RunPodSandboxRequest(config=cri_config(second)))
            assert code is grpc.StatusCode.ALREADY_EXISTS
            assert said == (f"pod sandbox name 'x' in namespace 'y_z' (uid '', attempt 0) is "
                            f"reserved for sandbox {b}")
            with d.client() as c:
                r = c.post("/v1/sandboxes", json=first)
                assert r.status_code == 409 and a in r.json()["error"]
            states = {p.id: p.state for p in rt.ListPodSandbox(pb.ListPodSandboxRequest(),
                                                                timeout=60).items}
            assert states == {a: pb.SANDBOX_READY, b: pb.SANDBOX_READY}
            remove_all(rt)
        assert d.terminate() == 0
    assert env.leftovers() == {}
