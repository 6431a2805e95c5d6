"""The command line, run in-process by main([...]) against a real uvicorn daemon (the fake
drivers) on a unix socket: output, exit statuses, finding the daemon, diagrams, events."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import types
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest

from podfsm.core import failpoints
from podfsm.faces import graph
from podfsm.faces.cli import build_parser, main
from podfsm.faces.client import ApiError, Client
from tests.fakes import Rig
from tests.unit.test_http import Served, pod

DESIGN_FIELDS = ("id", "name", "namespace", "uid", "state", "created_at", "pid", "netns_path",
                 "userns_path", "ip", "additional_ips", "uid_mappings", "gid_mappings",
                 "exit_status", "history")
Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(served: Served, capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run `podfsm --socket <the daemon's> ARGS...`: (exit status, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main(["--socket", served.socket, *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def pod_file(tmp_path: Path) -> Callable[..., str]:
    def write(name: str = "web", body: object = None) -> str:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(pod(name) if body is None else body))
        return str(path)

    return write


def runp(cli: Cli, pod_file: Callable[..., str], name: str = "web") -> str:
    code, out, err = cli("runp", pod_file(name))
    assert code == 0, err
    sandbox_id = out.strip()
    assert re.fullmatch(r"[0-9a-f]{64}", sandbox_id)
    return sandbox_id


# ---------------------------------------------------------------------- the verbs

def test_runp_prints_the_id_and_pods_lists_it(cli: Cli, pod_file: Callable[..., str]) -> None:
    sandbox_id = runp(cli, pod_file)
    code, out, _ = cli("pods")
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == ["POD", "ID", "CREATED", "STATE", "NAME", "NAMESPACE", "ATTEMPT",
                              "RUNTIME", "IP"]
    assert row.split() == [sandbox_id[:13], "0s", "ago", "Ready", "web", "default", "0", "fake",
                           "10.99.0.2"]


def test_pods_as_json_quiet_and_filtered(cli: Cli, pod_file: Callable[..., str]) -> None:
    a, b = runp(cli, pod_file, "a"), runp(cli, pod_file, "b")
    assert cli("stopp", b)[0] == 0
    code, out, _ = cli("pods", "-o", "json")
    assert code == 0
    items = json.loads(out)["items"]
    assert [i["id"] for i in items] == [a, b]
    assert all(set(DESIGN_FIELDS) <= set(i) for i in items)
    assert cli("pods", "-q")[1].split() == [a, b]
    assert cli("pods", "-q", "--state", "notready")[1].split() == [b]
    assert cli("pods", "-q", "--name", "a")[1].split() == [a]
    assert cli("pods", "-q", "--namespace", "other")[1] == ""


def test_inspectp_by_prefix_for_people_and_as_json(cli: Cli,
                                                   pod_file: Callable[..., str]) -> None:
    sandbox_id = runp(cli, pod_file)
    code, out, _ = cli("inspectp", sandbox_id[:8])
    assert code == 0
    assert re.search(rf"^ID:\s+{sandbox_id}$", out, re.MULTILINE)
    assert re.search(r"^State:\s+Ready$", out, re.MULTILINE)
    assert re.search(r"^IP:\s+10\.99\.0\.2$", out, re.MULTILINE)
    assert re.search(r"^UID map:\s+0 -> \d+ \(65536\)$", out, re.MULTILINE)
    history = out.split("History:\n", 1)[1].splitlines()
    assert history[0].split() == ["#", "AT", "TRIGGER", "TRANSITION", "ERROR"]
    assert [line.split()[2] for line in history[1:]] == [
        "setup_namespaces", "create_container", "start_task", "mark_ready"]

    code, out, _ = cli("inspectp", sandbox_id, "-o", "json")
    assert code == 0
    body = json.loads(out)
    for key in DESIGN_FIELDS:
        assert key in body, key
    assert body["id"] == sandbox_id and body["state"] == "Ready"
    assert [h["dest"] for h in body["history"]] == ["NamespacesReady", "ContainerCreated",
                                                     "TaskRunning", "Ready"]


def test_stopp_and_rmp_report_each_sandbox_and_succeed_for_unknown_ones(
    cli: Cli, pod_file: Callable[..., str],
) -> None:
    # as crictl over the CRI, whose StopPodSandbox and RemovePodSandbox are idempotent: an
    # unknown id is stopped and removed already, with crictl's line and exit 0
    a, b = runp(cli, pod_file, "a"), runp(cli, pod_file, "b")
    code, out, err = cli("stopp", a, "f" * 64, b[:10], "0" * 12)
    assert code == 0 and err == ""
    assert out.splitlines() == [f"Stopped sandbox {a}", f"Stopped sandbox {'f' * 64}",
                                f"Stopped sandbox {b}", f"Stopped sandbox {'0' * 12}"]
    assert {i["state"] for i in json.loads(cli("pods", "-o", "json")[1])["items"]} == {
        "NotReady"}
    code, out, err = cli("rmp", a, b)
    assert code == 0 and err == ""
    assert out.splitlines() == [f"Removed sandbox {a}", f"Removed sandbox {b}"]
    assert cli("pods", "-q")[1] == ""
    assert cli("rmp", a) == (0, f"Removed sandbox {a}\n", "")


def test_an_ambiguous_prefix_is_refused(cli: Cli, pod_file: Callable[..., str]) -> None:
    # 17 ids among 16 hex digits: at least two start alike
    ids = [runp(cli, pod_file, f"p{i}") for i in range(17)]
    shared = next(c for c in "0123456789abcdef" if sum(i.startswith(c) for i in ids) > 1)
    code, _, err = cli("inspectp", shared)
    assert code == 1 and f"'{shared}' is the start of" in err


@pytest.mark.parametrize(("body", "says"), [
    ({"metadata": {"name": "a\nb"}}, "control"),
    ({"metadata": {"name": "x"}, "linux": {"security_context": {"namespace_options": {
        "userns_options": {"mode": "TARGET"}}}}}, "TARGET is not supported"),
    ([1, 2], "a pod config is a JSON object"),
])
def test_runp_of_an_invalid_config_exits_1_with_the_reason(
    cli: Cli, pod_file: Callable[..., str], body: object, says: str,
) -> None:
    code, out, err = cli("runp", pod_file("bad", body))
    assert code == 1 and out == ""
    assert says in err


def test_runp_of_a_missing_or_unparsable_file_exits_1(cli: Cli, tmp_path: Path) -> None:
    code, _, err = cli("runp", str(tmp_path / "none.json"))
    assert code == 1 and "cannot read" in err
    (tmp_path / "x.json").write_text("{nope")
    code, _, err = cli("runp", str(tmp_path / "x.json"))
    assert code == 1 and "is not JSON" in err


def test_runp_reads_stdin_and_a_reserved_name_exits_1(
    cli: Cli, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(pod())))
    code, out, _ = cli("runp", "-")
    assert code == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(pod())))
    code, _, err = cli("runp", "-")
    assert code == 1 and f"is reserved for sandbox {out.strip()}" in err


def test_a_failed_run_exits_1_naming_the_step(cli: Cli, rig: Rig,
                                              pod_file: Callable[..., str]) -> None:
    rig.faults.fail.add("cni.add")
    code, out, err = cli("runp", pod_file())
    assert code == 1 and out == ""
    assert "run_sandbox failed at step 'setup_namespaces'" in err
    assert "everything done was unwound" in err


def test_a_recovering_daemon_is_waited_for(cli: Cli, served: Served) -> None:
    served.ctl.recovering = True
    threading.Timer(0.5, setattr, (served.ctl, "recovering", False)).start()
    started = time.monotonic()
    assert cli("pods", "-q") == (0, "", "")
    assert time.monotonic() - started >= 0.4


async def test_the_client_gives_up_on_a_daemon_that_stays_unavailable(served: Served) -> None:
    served.ctl.recovering = True
    async with Client(served.socket, wait_ready=0.3) as c:
        with pytest.raises(ApiError) as info:
            await c.list_sandboxes()
    assert info.value.status == 503 and info.value.kind == "ServiceUnavailable"


# ---------------------------------------------------------------------- finding the daemon

@pytest.mark.parametrize("verb", [["pods"], ["inspectp", "ab"], ["stopp", "ab"], ["rmp", "ab"],
                                  ["events"], ["graph", "ab"]])
def test_no_daemon_exits_2_naming_the_socket(tmp_path: Path, verb: list[str],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "none.sock")
    assert main(["--socket", path, *verb]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip() == (f"podfsm: no podfsm daemon answers on {path} (No such file or "
                           "directory): start one with `podfsm serve`")


def test_a_stale_socket_is_no_daemon_either(sock_dir: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = os.path.join(sock_dir, "dead.sock")
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(path)
    try:
        assert main(["pods", "--socket", path]) == 2
        assert "Connection refused" in capsys.readouterr().err
    finally:
        os.unlink(path)


def test_the_socket_comes_from_the_option_then_the_environment(
    served: Served, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("PODFSM_SOCKET", served.socket)
    assert main(["pods"]) == 0
    assert main(["pods", "-q", "--socket", served.socket]) == 0
    monkeypatch.setenv("PODFSM_SOCKET", str(tmp_path / "elsewhere.sock"))
    assert main(["pods"]) == 2
    assert main(["--socket", served.socket, "pods"]) == 0  # the option wins
    assert main(["pods", "--socket", served.socket]) == 0
    capsys.readouterr()


def test_the_default_socket_is_the_documented_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from podfsm.faces.client import resolve_socket

    monkeypatch.delenv("PODFSM_SOCKET", raising=False)
    assert resolve_socket(None) == "/run/podfsm/podfsm.sock"


# ---------------------------------------------------------------------- diagrams

@pytest.mark.parametrize("ext", graph.FORMATS)
def test_graph_of_the_machine_needs_no_daemon(tmp_path: Path, ext: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PODFSM_SOCKET", str(tmp_path / "none.sock"))
    out = tmp_path / f"machine.{ext}"
    assert main(["graph", "-o", str(out)]) == 0
    assert out.read_bytes() == graph.render(ext)


def test_graph_without_a_file_prints_mermaid(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    assert main(["graph"]) == 0
    assert capsysbinary.readouterr().out.decode() == graph.mermaid()


def test_graph_with_an_unknown_extension_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["graph", "-o", str(tmp_path / "x.gif")]) == 2
    assert ".mmd" in capsys.readouterr().err
    assert not (tmp_path / "x.gif").exists()


def test_graph_of_a_sandbox_comes_from_the_daemon(cli: Cli, pod_file: Callable[..., str],
                                                  tmp_path: Path) -> None:
    sandbox_id = runp(cli, pod_file)
    svg, mmd = tmp_path / "s.svg", tmp_path / "s.mmd"
    assert cli("graph", sandbox_id[:6], "-o", str(svg))[0] == 0
    root = ET.fromstring(svg.read_bytes())
    current = [g.get("id") for g in root.iter("{http://www.w3.org/2000/svg}g")
               if "current" in (g.get("class") or "").split()]
    assert current == ["state-Ready"]
    assert cli("graph", sandbox_id, "-o", str(mmd))[0] == 0
    assert "class Ready current" in mmd.read_text()
    assert "TaskRunning --> Ready : mark_ready (4)" in mmd.read_text()
    code, _, err = cli("graph", "f" * 64, "-o", str(tmp_path / "none.svg"))
    assert code == 1 and "not found" in err


# ---------------------------------------------------------------------- events

def watch_events(served: Served, capsys: pytest.CaptureFixture[str], args: list[str],
                 replayed: int) -> tuple[int | None, list[str]]:
    """Run `podfsm events ARGS` in a thread until it has printed `replayed` lines, stop the
    daemon (which removes every sandbox first), and return its exit status and every line."""
    result: list[int] = []
    watcher = threading.Thread(target=lambda: result.append(main(
        ["--socket", served.socket, "events", *args])))
    watcher.start()
    out = ""
    deadline = time.monotonic() + 10
    while out.count("\n") < replayed and time.monotonic() < deadline:
        time.sleep(0.01)
        out += capsys.readouterr().out
    served.stop()
    watcher.join(10)
    assert not watcher.is_alive()
    out += capsys.readouterr().out
    return (result[0] if result else None), out.splitlines()


def test_events_streams_until_the_daemon_stops(
    cli: Cli, served: Served, pod_file: Callable[..., str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    sandbox_id = runp(cli, pod_file)
    code, lines = watch_events(served, capsys, ["--since", "0", "-o", "json"], 4)
    assert code == 0
    events = [json.loads(line) for line in lines]
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert [e["trigger"] for e in events] == ["setup_namespaces", "create_container",
                                              "start_task", "mark_ready", "stop", "remove"]
    assert {e["sandbox_id"] for e in events} == {sandbox_id}


def test_events_as_text(cli: Cli, served: Served, pod_file: Callable[..., str],
                        capsys: pytest.CaptureFixture[str]) -> None:
    runp(cli, pod_file)
    code, lines = watch_events(served, capsys, ["--since", "3"], 1)
    assert code == 0
    assert re.fullmatch(r"\s+4 \S+ [0-9a-f]{13} TaskRunning -> Ready \(mark_ready\)", lines[0])
    assert [line.split()[-1] for line in lines] == ["(mark_ready)", "(stop)", "(remove)"]


# ---------------------------------------------------------------------- verbs without a daemon

def test_debug_failpoints_lists_every_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["debug", "failpoints"]) == 0
    assert capsys.readouterr().out.splitlines() == list(failpoints.NAMES)


@pytest.mark.parametrize(("argv", "code"), [
    ([], 2), (["nope"], 2), (["--help"], 0), (["pods", "-o", "yaml"], 2),
    (["serve", "--host", "0.0.0.0"], 2), (["bench", "--runtime", "docker"], 2),
    (["bench", "-n", "0"], 2), (["debug"], 2),
    (["serve", "--stream-port", "70000"], 2), (["serve", "--stream-port", "-2"], 2),
])
def test_usage_errors_exit_2(argv: list[str], code: int,
                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == code
    capsys.readouterr()


def test_serve_with_a_bad_configuration_exits_1(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    sock = tmp_path / "s.sock"
    assert main(["serve", "--socket", str(sock), "--state-dir", "relative/dir"]) == 1
    assert "state_dir must be an absolute path" in capsys.readouterr().err
    assert not sock.exists()


def test_demo_and_bench_options_and_delegation(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = build_parser()
    demo = parser.parse_args(["demo"])
    assert [demo.state_dir, demo.run_dir, demo.netns_dir, demo.runtime, demo.cni_conf_dir] == [
        None] * 5
    demo = parser.parse_args(["demo", "--runtime", "crun", "--state-dir", "/s", "--run-dir", "/r",
                              "--netns-dir", "/n", "--cni-conf-dir", "/c"])
    assert [demo.state_dir, demo.run_dir, demo.netns_dir, demo.runtime, demo.cni_conf_dir] == [
        "/s", "/r", "/n", "crun", "/c"]
    bench = parser.parse_args(["bench"])
    assert (bench.count, bench.concurrency, bench.runtime, bench.json) == (
        20, [1, 4, 16], ["runc", "crun"], False)
    assert (bench.exit_samples, bench.ready, bench.soak) == (20, 0, 0)
    bench = parser.parse_args(["bench", "-n", "3", "--concurrency", "2,8", "--concurrency", "32",
                               "--runtime", "crun", "--json", "--ready", "50", "--soak", "500"])
    assert (bench.count, bench.concurrency, bench.runtime, bench.json) == (
        3, [2, 8, 32], ["crun"], True)
    assert (bench.ready, bench.soak) == (50, 500)

    seen: list[tuple[str, object]] = []

    def fake_bench(args: argparse.Namespace) -> int:
        seen.append(("bench", args.count))
        return 7

    def fake_demo(args: argparse.Namespace) -> int:
        seen.append(("demo", args.runtime))
        return 5

    module = types.ModuleType("podfsm.tools.benchmain")
    module.main = fake_bench  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "podfsm.tools.benchmain", module)
    monkeypatch.setattr("podfsm.tools.demo.main", fake_demo)
    assert main(["bench", "-n", "2"]) == 7
    assert main(["demo", "--runtime", "runc"]) == 5
    assert seen == [("bench", 2), ("demo", "runc")]


def test_python_dash_m_podfsm_runs_the_cli() -> None:
    proc = subprocess.run([sys.executable, "-m", "podfsm", "debug", "failpoints"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == list(failpoints.NAMES)
    proc = subprocess.run([sys.executable, "-m", "podfsm", "--version"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0 and proc.stdout.startswith("podfsm ")
