"""The container faces over the fake drivers (tests/fakecontainers.py): every /v1/containers
route and its errors on a real uvicorn daemon, and every container verb of the CLI with
crictl's output shapes. No root needed; the real thing is tests/integration/test_faces.py's
container test."""

from __future__ import annotations

import html
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from podfsm import Controller
from podfsm.core.containerrecords import ContainerStatus
from podfsm.faces import containercli, podgraph
from podfsm.faces.cli import main
from podfsm.faces.wire import ContainerList, ContainerStatsBody, ExecResponse
from tests.fakecontainers import FakeContainers
from tests.fakes import Rig
from tests.unit.test_http import Served, error_of

IMAGE = "registry.test/box:v1"
Cli = Callable[..., tuple[int, str, str]]


class ContainerRig(Rig):
    """The fake rig with the fake container driver, and an image to make containers of."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.tmp = tmp
        self.ctrs = FakeContainers(tmp / "containers")
        self.images.publish("registry.test/box", "v1", [b"base"])

    def controller(self, failpoints: str = "") -> Controller:
        return Controller(self.cfg, namespaces=self.ns, network=self.net, runtime=self.rt,
                          store=self.store, images=self.images, containers=self.ctrs,
                          failpoints=failpoints)

    def nothing_left(self) -> None:
        super().nothing_left()
        assert self.ctrs.records == {} and self.ctrs.runtime == {}
        assert self.ctrs.dir_ids() == []


@pytest.fixture
def rig(tmp_path: Path) -> ContainerRig:
    return ContainerRig(tmp_path)


@pytest.fixture
def client(served: Served) -> Iterator[httpx.Client]:
    with served.client() as c:
        assert c.post("/v1/images", json={"image": IMAGE}).status_code == 201
        yield c


def pod(rig: ContainerRig, name: str = "web") -> dict[str, Any]:
    """A pod without a user namespace (containers in one are refused so far)."""
    return {"metadata": {"name": name, "namespace": "default", "uid": f"uid-{name}"},
            "log_directory": str(rig.tmp / "logs" / name)}


def ctr(name: str = "app", **extra: Any) -> dict[str, Any]:
    return {"metadata": {"name": name}, "image": {"image": IMAGE},
            "command": ["sleep", "1000"], "log_path": f"{name}.log", **extra}


def run_pod(c: httpx.Client, rig: ContainerRig, name: str = "web") -> str:
    resp = c.post("/v1/sandboxes", json=pod(rig, name))
    assert resp.status_code == 201, resp.text
    sandbox_id: str = resp.json()["id"]
    return sandbox_id


def create(c: httpx.Client, sandbox_id: str, **kw: Any) -> ContainerStatus:
    resp = c.post("/v1/containers", json={"sandbox_id": sandbox_id, "config": ctr(**kw)})
    assert resp.status_code == 201, resp.text
    st = ContainerStatus.model_validate_json(resp.content)
    assert resp.headers["location"] == f"/v1/containers/{st.id}"
    return st


# ---------------------------------------------------------------------- HTTP

def test_create_start_status_stop_remove(client: httpx.Client, rig: ContainerRig) -> None:
    sid = run_pod(client, rig)
    st = create(client, sid, labels={"tier": "web"})
    assert (st.state, st.sandbox_id, st.name, st.image) == ("Created", sid, "app", IMAGE)
    assert st.labels == {"tier": "web"}
    assert st.log_path == str(rig.tmp / "logs" / "web" / "app.log")

    resp = client.post(f"/v1/containers/{st.id}/start")
    assert resp.status_code == 200
    running = ContainerStatus.model_validate_json(resp.content)
    assert running.state == "Running" and running.pid is not None
    assert client.get(f"/v1/containers/{st.id}").json()["state"] == "Running"

    info = client.get(f"/v1/containers/{st.id}/info").json()
    assert info["sandboxID"] == sid and info["pid"] == running.pid
    assert info["runtimeSpec"]["process"]["args"] == ["sleep", "1000"]

    resp = client.post(f"/v1/containers/{st.id}/stop", params={"timeout": "2"})
    assert resp.status_code == 200
    stopped = ContainerStatus.model_validate_json(resp.content)
    assert (stopped.state, stopped.exit_code, stopped.reason) == ("Exited", 143, "Error")
    # stopping again is idempotent; starting an Exited one is a precondition failure
    assert client.post(f"/v1/containers/{st.id}/stop").status_code == 200
    resp = client.post(f"/v1/containers/{st.id}/start")
    assert resp.status_code == 409 and error_of(resp).kind == "ContainerPrecondition"
    assert "only a Created container can be started" in error_of(resp).error

    assert client.delete(f"/v1/containers/{st.id}").status_code == 204
    assert client.delete(f"/v1/containers/{st.id}").status_code == 204  # idempotent
    resp = client.get(f"/v1/containers/{st.id}")
    assert resp.status_code == 404 and error_of(resp).kind == "ContainerNotFound"
    assert rig.ctrs.records == {}


def test_list_filters(client: httpx.Client, rig: ContainerRig) -> None:
    a, b = run_pod(client, rig, "a"), run_pod(client, rig, "b")
    a1 = create(client, a, name="one", labels={"k": "v", "x": "1"})
    a2 = create(client, a, name="two", labels={"k": "w"})
    b1 = create(client, b, name="one")
    client.post(f"/v1/containers/{a2.id}/start")

    def ids(**params: str) -> list[str]:
        resp = client.get("/v1/containers", params=params)
        assert resp.status_code == 200, resp.text
        return [s.id for s in ContainerList.model_validate_json(resp.content).items]

    assert ids() == [a1.id, a2.id, b1.id]  # oldest first
    assert ids(sandbox_id=a) == [a1.id, a2.id]
    assert ids(sandbox_id=b[:6]) == [b1.id]
    assert ids(state="Running") == [a2.id]
    assert ids(state="Created") == [a1.id, b1.id]
    assert ids(label="k=v") == [a1.id]
    assert ids(label="k=v,x=1") == [a1.id]
    assert ids(label="k=v,x=2") == []
    assert ids(id=b1.id[:10]) == [b1.id]
    for bad in ({"state": "Sleeping"}, {"label": "novalue"}, {"id": "XYZ"}):
        resp = client.get("/v1/containers", params=bad)
        assert resp.status_code == 400, bad
        assert error_of(resp).kind == "BadRequest"


def test_exec_logs_and_stats(client: httpx.Client, rig: ContainerRig) -> None:
    sid = run_pod(client, rig)
    st = create(client, sid)
    resp = client.post(f"/v1/containers/{st.id}/exec", json={"cmd": ["true"]})
    assert resp.status_code == 409  # not running yet
    client.post(f"/v1/containers/{st.id}/start")

    resp = client.post(f"/v1/containers/{st.id}/exec",
                       json={"cmd": ["sh", "-c", "echo out; echo err >&2; exit 7"]})
    assert resp.status_code == 200
    assert ExecResponse.model_validate_json(resp.content) == ExecResponse(
        exit_code=7, stdout="out\n", stderr="err\n")
    t0 = time.monotonic()
    resp = client.post(f"/v1/containers/{st.id}/exec", json={"cmd": ["sleep", "30"],
                                                             "timeout": 1})
    assert resp.status_code == 504 and error_of(resp).kind == "ExecTimeout"
    assert time.monotonic() - t0 < 10
    bad: dict[str, Any]
    for bad in ({"cmd": []}, {"cmd": "ls"}, {"cmd": ["ls"], "timeout": -1},
                {"cmd": ["ls"], "extra": 1}):
        resp = client.post(f"/v1/containers/{st.id}/exec", json=bad)
        assert resp.status_code == 400, bad
    resp = client.post(f"/v1/containers/{st.id}/exec", content=b"{",
                       headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "not JSON" in error_of(resp).error

    rig.ctrs.write_log(st.id, "stderr", "oops")
    rig.ctrs.write_log(st.id, "stdout", "part", full=False)
    resp = client.get(f"/v1/containers/{st.id}/logs")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    lines = resp.text.splitlines()
    assert [ln.split(" ", 1)[1] for ln in lines] == ["stdout F sleep 1000", "stderr F oops",
                                                      "stdout P part"]
    tail = client.get(f"/v1/containers/{st.id}/logs", params={"tail": "1"}).text
    assert tail.splitlines() == lines[-1:]

    resp = client.get(f"/v1/containers/{st.id}/stats")
    stats = ContainerStatsBody.model_validate_json(resp.content)
    assert (stats.id, stats.name, stats.writable_bytes, stats.writable_inodes) == (
        st.id, "app", 8192, 3)


def test_logs_follow_streams_until_the_container_exits(client: httpx.Client, served: Served,
                                                       rig: ContainerRig) -> None:
    sid = run_pod(client, rig)
    st = create(client, sid)
    client.post(f"/v1/containers/{st.id}/start")
    got: list[str] = []

    def later() -> None:
        time.sleep(0.5)
        rig.ctrs.write_log(st.id, "stdout", "later")
        time.sleep(0.5)
        rig.ctrs.exit(st.id, 3)

    writer = threading.Thread(target=later)
    writer.start()
    t0 = time.monotonic()
    with client.stream("GET", f"/v1/containers/{st.id}/logs",
                       params={"follow": "true", "tail": "0"}) as resp:
        assert resp.status_code == 200
        got = [ln.split(" ", 3)[3] for ln in resp.iter_lines() if ln]
    writer.join()
    assert got == ["later"]  # tail=0: none of what was there, then what came
    assert time.monotonic() - t0 < 10
    st2 = ContainerStatus.model_validate_json(client.get(f"/v1/containers/{st.id}").content)
    assert (st2.state, st2.exit_code, st2.reason) == ("Exited", 3, "Error")


def test_create_errors_leave_nothing(client: httpx.Client, rig: ContainerRig) -> None:
    sid = run_pod(client, rig)
    cases: list[tuple[Any, int, str, str]] = [
        ({"sandbox_id": sid, "config": {**ctr(), "bogus": 1}}, 422, "InvalidContainerConfig",
         "bogus"),
        ({"sandbox_id": sid, "config": ctr(), "more": 1}, 422, "InvalidContainerConfig",
         "more: unknown field"),
        ({"config": ctr()}, 422, "InvalidContainerConfig", "sandbox_id: missing"),
        ({"sandbox_id": "nope", "config": ctr()}, 422, "InvalidContainerConfig",
         "sandbox_id: not a sandbox id"),
        ({"sandbox_id": "0" * 64, "config": ctr()}, 404, "SandboxNotFound", "0000"),
        ({"sandbox_id": sid, "config": {**ctr(), "image": {"image": "no/such:1"}}}, 404,
         "ImageNotFound", "no/such"),
        ([1], 422, "InvalidContainerConfig", "JSON object"),
    ]
    for body, status, kind, text in cases:
        resp = client.post("/v1/containers", json=body)
        assert resp.status_code == status, (body, resp.text)
        assert error_of(resp).kind == kind and text in error_of(resp).error, resp.text
    create(client, sid)
    resp = client.post("/v1/containers", json={"sandbox_id": sid, "config": ctr()})
    assert resp.status_code == 409 and error_of(resp).kind == "ContainerNameReserved"
    assert len(rig.ctrs.records) == 1


def test_malformed_and_unknown_container_ids(client: httpx.Client) -> None:
    unknown = "f" * 64
    for method, path in (("GET", ""), ("GET", "/info"), ("POST", "/start"), ("POST", "/stop"),
                         ("GET", "/logs"), ("GET", "/stats")):
        resp = client.request(method, f"/v1/containers/{unknown}{path}")
        assert resp.status_code == 404, (method, path, resp.text)
        assert error_of(resp).kind == "ContainerNotFound"
        resp = client.request(method, f"/v1/containers/ABC{path}")
        assert resp.status_code == 400 and "not a container id" in error_of(resp).error
    resp = client.post(f"/v1/containers/{unknown}/exec", json={"cmd": ["ls"]})
    assert resp.status_code == 404
    assert client.get("/v1/containers/a/b/c").status_code == 400
    resp = client.put(f"/v1/containers/{unknown}")
    assert resp.status_code == 405
    assert resp.headers["allow"] == "DELETE, GET, HEAD"


def test_sandbox_removal_takes_its_containers(client: httpx.Client, rig: ContainerRig) -> None:
    sid = run_pod(client, rig)
    st = create(client, sid)
    client.post(f"/v1/containers/{st.id}/start")
    assert client.delete(f"/v1/sandboxes/{sid}").status_code == 204
    assert client.get("/v1/containers").json()["items"] == []
    assert rig.ctrs.records == {}


# ---------------------------------------------------------------------- the CLI

@pytest.fixture
def cli(served: Served, client: httpx.Client, capsys: pytest.CaptureFixture[str]) -> Cli:
    def run(*args: str) -> tuple[int, str, str]:
        code = main(["--socket", served.socket, *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def files(rig: ContainerRig, name: str = "app", **extra: Any) -> tuple[str, str]:
    cpath, ppath = rig.tmp / f"{name}.json", rig.tmp / "pod.json"
    cpath.write_text(json.dumps(ctr(name, **extra)))
    ppath.write_text(json.dumps(pod(rig)))
    return str(cpath), str(ppath)


def cli_create(cli: Cli, rig: ContainerRig, sid: str, name: str = "app", **extra: Any) -> str:
    code, out, err = cli("create", sid[:8], *files(rig, name, **extra))
    assert code == 0, err
    cid = out.strip()
    assert re.fullmatch(r"[0-9a-f]{64}", cid)
    return cid


def test_cli_create_start_ps_inspect_stop_rm(cli: Cli, client: httpx.Client,
                                             rig: ContainerRig) -> None:
    sid = run_pod(client, rig)
    cid = cli_create(cli, rig, sid, labels={"io.kubernetes.pod.name": "frontend"})
    other = cli_create(cli, rig, sid, "side")

    # ps: only running ones by default (none yet), the header alone
    code, out, _ = cli("ps")
    assert (code, out.splitlines()) == (0, ["CONTAINER   IMAGE   CREATED   STATE   NAME   "
                                            "ATTEMPT   POD ID   POD"])
    assert cli("start", cid[:10]) == (0, f"{cid}\n", "")
    code, out, _ = cli("ps")
    header, row = out.splitlines()
    assert header.split() == ["CONTAINER", "IMAGE", "CREATED", "STATE", "NAME", "ATTEMPT",
                              "POD", "ID", "POD"]
    created = re.search(r"   ((Less than a second|1 second|\d+ seconds) ago)   ", row)
    assert created, row  # go-units' words, as crictl's
    assert row.replace(created[1], "AGE").split() == [cid[:13], IMAGE, "AGE", "Running",
                                                      "app", "0", sid[:13], "frontend"]
    assert header.index("IMAGE") == row.index(IMAGE)  # columns aligned
    code, out, _ = cli("ps", "-a")
    assert [ln.split()[0] for ln in out.splitlines()[1:]] == [cid[:13], other[:13]]
    assert out.splitlines()[2].split()[-1] == "web"  # no pod-name label: the sandbox's name
    assert cli("ps", "-q", "--state", "created") == (0, f"{other}\n", "")
    assert cli("ps", "-aq", "--label", "io.kubernetes.pod.name=frontend") == (0, f"{cid}\n", "")
    assert cli("ps", "-aq", "--pod", sid[:6]) == (0, f"{cid}\n{other}\n", "")
    assert cli("ps", "-aq", "--pod", "0" * 8)[1] == ""
    code, out, _ = cli("ps", "-a", "-o", "json")
    listed = json.loads(out)["containers"]
    assert [c["id"] for c in listed] == [cid, other]
    assert set(listed[0]) == {"id", "podSandboxId", "metadata", "image", "imageRef", "state",
                              "createdAt", "labels", "annotations"}
    assert listed[0]["state"] == "CONTAINER_RUNNING" and listed[1]["state"] == \
        "CONTAINER_CREATED"
    assert listed[0]["metadata"] == {"name": "app", "attempt": 0}
    assert re.fullmatch(r"[0-9]{19}", listed[0]["createdAt"])

    code, out, _ = cli("inspect", cid[:8])
    doc = json.loads(out)
    assert doc["status"]["id"] == cid and doc["status"]["state"] == "CONTAINER_RUNNING"
    assert doc["status"]["logPath"].endswith("/app.log")
    assert doc["info"]["sandboxID"] == sid and doc["info"]["pid"] > 0
    code, out, _ = cli("inspect", "-o", "table", cid)
    assert re.search(r"^State: +CONTAINER_RUNNING$", out, re.M)

    # rm of a running one needs -f; stop then rm; an unknown id fails naming it
    code, out, err = cli("rm", cid)
    assert code == 1 and "is running, please stop it first" in err
    assert cli("stop", "-t", "1", cid[:9]) == (0, f"{cid}\n", "")
    code, out, _ = cli("inspect", cid)
    assert json.loads(out)["status"]["exitCode"] == 143
    assert json.loads(out)["status"]["reason"] == "Error"
    assert cli("rm", cid, "-f") == (0, f"{cid}\n", "")
    code, out, err = cli("rm", "-f", other, "abcdef")
    assert code == 1 and out == f"{other}\n" and "'abcdef' not found" in err
    assert cli("ps", "-aq") == (0, "", "")


def test_cli_logs_exec_and_stats(cli: Cli, client: httpx.Client, rig: ContainerRig) -> None:
    sid = run_pod(client, rig)
    cid = cli_create(cli, rig, sid)
    cli("start", cid)
    rig.ctrs.write_log(cid, "stderr", "warning")
    rig.ctrs.write_log(cid, "stdout", "no newline ", full=False)
    rig.ctrs.write_log(cid, "stdout", "then one")
    # crictl logs: the text, stdout and stderr each to its own, partial lines joined
    assert cli("logs", cid[:7]) == (0, "sleep 1000\nno newline then one\n", "warning\n")
    assert cli("logs", "--tail", "1", cid) == (0, "then one\n", "")
    code, out, _ = cli("logs", "-t", "--tail", "2", cid)
    assert re.fullmatch(r"\S+Z no newline \S+Z then one\n", out)

    # exec -s: the command's output on ours, its exit status ours
    assert cli("exec", "-s", cid, "sh", "-c", "echo hi; echo ho >&2; exit 5") == (
        5, "hi\n", "ho\n")
    assert cli("exec", "-s", cid[:10], "true") == (0, "", "")
    code, _, err = cli("exec", "-s", "--timeout", "1", cid, "sleep", "20")
    assert code == 1 and "timed out" in err
    code, _, err = cli("exec", cid, "true")
    assert code == 1 and "only -s" in err

    code, out, _ = cli("stats", "-s", "0")  # the fake has no cgroup: not running for stats
    assert out.split() == ["CONTAINER", "NAME", "CPU", "%", "MEM", "DISK", "INODES"]
    code, out, _ = cli("stats", "-a", "-s", "0", cid[:5])
    assert out.splitlines()[1].split() == [cid[:13], "app", "0.00", "0B", "8.192kB", "3"]
    code, out, _ = cli("stats", "-o", "json")
    assert json.loads(out) == {"stats": [{
        "attributes": {"id": cid, "metadata": {"name": "app", "attempt": 0}, "labels": {},
                       "annotations": {}},
        "cpu": {"timestamp": json.loads(out)["stats"][0]["cpu"]["timestamp"],
                "usageCoreNanoSeconds": None},
        "memory": {"timestamp": json.loads(out)["stats"][0]["cpu"]["timestamp"],
                   "workingSetBytes": None},
        "writableLayer": {"timestamp": json.loads(out)["stats"][0]["cpu"]["timestamp"],
                          "fsId": {"mountpoint": ""}, "usedBytes": {"value": "8192"},
                          "inodesUsed": {"value": "3"}}}]}


def test_cli_create_refuses_bad_files_and_names_the_problem(cli: Cli, client: httpx.Client,
                                                            rig: ContainerRig) -> None:
    sid = run_pod(client, rig)
    cpath, ppath = files(rig)
    bad = rig.tmp / "bad.json"
    bad.write_text("[1]")
    assert cli("create", sid, str(bad), ppath)[2] == \
        f"podfsm: {bad}: a container config is a JSON object\n"
    notjson = rig.tmp / "notjson.json"
    notjson.write_text("{")
    code, _, err = cli("create", sid, cpath, str(notjson))
    assert code == 1 and f"{notjson} is not JSON" in err
    code, _, err = cli("create", sid, cpath, str(rig.tmp / "missing.json"))
    assert code == 1 and "cannot read" in err
    code, _, err = cli("create", "0" * 12, cpath, ppath)
    assert code == 1 and "not found" in err
    bogus = rig.tmp / "bogus.json"
    bogus.write_text(json.dumps({**ctr(), "tty": "maybe"}))
    code, _, err = cli("create", sid, str(bogus), ppath)
    assert code == 1 and "tty" in err
    assert rig.ctrs.records == {}


@pytest.mark.parametrize(("seconds", "text"), [
    (0.2, "Less than a second"), (1, "1 second"), (59, "59 seconds"), (60, "About a minute"),
    (3599, "59 minutes"), (3600, "About an hour"), (5 * 3600, "5 hours"),
    (3 * 86400, "3 days"), (20 * 86400, "2 weeks"), (90 * 86400, "3 months"),
    (800 * 86400, "2 years")])
def test_ages_as_crictl_shows_them(seconds: float, text: str) -> None:
    assert containercli.human_duration(seconds) == text


def test_sizes_and_log_lines_as_crictl_reads_them() -> None:
    assert [containercli.human_size(n) for n in (0, 999, 1000, 1234567, 5 * 10**9)] == [
        "0B", "999B", "1kB", "1.235MB", "5GB"]
    assert containercli.parse_log_line("2024-01-01T00:00:00Z stderr P a b ") == (
        "2024-01-01T00:00:00Z", "stderr", False, "a b ")
    assert containercli.parse_log_line("2024-01-01T00:00:00Z stdout F") == (
        "2024-01-01T00:00:00Z", "stdout", True, "")
    assert containercli.parse_log_line("garbage") is None


# ---------------------------------------------------------------------- diagrams

def test_a_pods_diagram_shows_its_containers_machines(client: httpx.Client,
                                                      rig: ContainerRig) -> None:
    sid = run_pod(client, rig)
    alone = client.get(f"/v1/sandboxes/{sid}/graph", params={"format": "mmd"}).text
    assert "state \"" not in alone  # without containers: the sandbox's diagram as it was
    run = create(client, sid, name="run")
    client.post(f"/v1/containers/{run.id}/start")
    made = create(client, sid, name="made")
    mmd = client.get(f"/v1/sandboxes/{sid}/graph", params={"format": "mmd"}).text
    assert f'state "sandbox default/web {sid[:13]}: Ready" as sandbox {{' in mmd
    assert f'state "container run {run.id[:13]}: Running" as c1 {{' in mmd
    assert "        c1_Unknown --> c1_Created : create (1)" in mmd
    assert "        c1_Created --> c1_Running : start (2)" in mmd
    assert "class c1_Running current" in mmd and "class c1_Created visited" in mmd
    assert f'state "container made {made.id[:13]}: Created" as c2 {{' in mmd
    assert "class c2_Created current" in mmd and "class Ready current" in mmd
    dot = client.get(f"/v1/sandboxes/{sid}/graph", params={"format": "dot"}).text
    assert 'subgraph "cluster_c2"' in dot
    assert re.search(rf'id="container-{run.id[:13]}-state-Running"[^]]*class="state current"',
                     dot)
    svg = html.unescape(client.get(f"/v1/sandboxes/{sid}/graph").text)  # dot writes &#45;
    assert svg.lstrip().startswith("<?xml")
    assert f'id="container-{made.id[:13]}-state-Created"' in svg
    assert 'id="sandbox-state-Ready"' in svg
    resp = client.get("/v1/graph", params={"format": "mmd", "machine": "container"})
    assert resp.text == podgraph.container_mermaid()
    assert "Running --> Exited : exit / stop" in resp.text
    assert client.get("/v1/graph", params={"machine": "pod"}).status_code == 400


def test_graph_of_the_container_machine_and_of_a_pod(cli: Cli, client: httpx.Client,
                                                     rig: ContainerRig, tmp_path: Path) -> None:
    code, out, _ = cli("graph", "--containers")
    assert (code, out) == (0, podgraph.container_mermaid())
    code, _, err = cli("graph", "--containers", "abc")
    assert code == 2 and "give no ID" in err
    sid = run_pod(client, rig)
    cid = cli_create(cli, rig, sid)
    code, out, _ = cli("graph", sid[:8])
    assert code == 0 and f'state "container app {cid[:13]}: Created" as c1 {{' in out
    assert cli("graph", "--containers", "-o", str(tmp_path / "c.dot"))[0] == 0
    assert (tmp_path / "c.dot").read_text() == podgraph.container_dot()
