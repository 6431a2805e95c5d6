"""Every example in examples/ runs, as its docstring says, and does what it says.

Each run gets a private world through the examples' environment variables (PODFSM_EXAMPLE_DIR,
_NETWORK, _BRIDGE, _SUBNET, from make_env), so it never meets the host's podfsm or another
test; its bridge and its CNI store directory go afterwards (destroy_env), and it must have left
no sandbox behind."""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import Env, destroy_env, make_env
from tests.integration.test_faces import PODS, ROOT, serving, svg_current, use_env_network

pytestmark = pytest.mark.integration

EXAMPLES = ROOT / "examples"


def run_example(env: Env, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    environ = {
        **os.environ,
        "PODFSM_EXAMPLE_DIR": env.tmp, "PODFSM_EXAMPLE_NETWORK": env.network,
        "PODFSM_EXAMPLE_BRIDGE": env.bridge, "PODFSM_EXAMPLE_SUBNET": env.subnet,
        "PYTHON": sys.executable,
    }
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=environ, stdin=subprocess.DEVNULL, check=False)


def in_subnet(env: Env, address: str) -> bool:
    return ipaddress.ip_address(address.split("/")[0]) in ipaddress.ip_network(env.subnet)


def test_embed(env: Env) -> None:
    out = run_example(env, sys.executable, str(EXAMPLES / "embed.py"), env.cfg.runtime)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    m = re.fullmatch(r"web: Ready ip=(\S+) pid=(\d+)", lines[0])
    assert m and in_subnet(env, m.group(1)), lines[0]
    assert re.fullmatch(r"uid map: 0 (\d+) 65536  netns: " + re.escape(env.cfg.netns_dir)
                        + r"/\S+", lines[1]), lines[1]
    assert int(lines[1].split()[3]) >= 65536
    ifaces = {line.split()[0]: line.split()[1:] for line in lines[2:-1]}
    assert set(ifaces) == {"lo", "eth0"}
    assert m.group(1) in [a.split("/")[0] for a in ifaces["eth0"]]
    assert lines[-1] == "removed; sandboxes left: 0"
    assert env.leftovers() == {}


def test_watch_events(env: Env) -> None:
    out = run_example(env, sys.executable, str(EXAMPLES / "watch_events.py"), env.cfg.runtime)
    assert out.returncode == 0, out.stderr
    moves = re.findall(r"^\d\d:\d\d:\d\d\.\d{6} ([0-9a-f]{12}) (\w+) --(\w+)--> (\w+)$",
                       out.stdout, re.MULTILINE)
    assert len(moves) == len(out.stdout.splitlines())
    assert len({sandbox for sandbox, *_ in moves}) == 1
    assert [(src, trig, dst) for _, src, trig, dst in moves] == [
        ("Unknown", "setup_namespaces", "NamespacesReady"),
        ("NamespacesReady", "create_container", "ContainerCreated"),
        ("ContainerCreated", "start_task", "TaskRunning"),
        ("TaskRunning", "mark_ready", "Ready"),
        ("Ready", "stop", "NotReady"),
        ("NotReady", "remove", "Unknown"),
    ]
    assert env.leftovers() == {}


def test_curl() -> None:
    env = make_env("runc")
    try:
        out = run_example(env, "bash", str(EXAMPLES / "curl.sh"), "runc")
        assert out.returncode == 0, out.stdout + out.stderr
        text = out.stdout
        sandbox_id = re.search(r'^\{"id":"([0-9a-f]{64})"', text, re.MULTILINE)
        assert sandbox_id, text
        steps = re.findall(r"^== (.*)$", text.replace(sandbox_id.group(1), "ID"), re.MULTILINE)
        assert steps == [
            f"waiting for the daemon on {env.tmp}/podfsm.sock",
            "POST /v1/sandboxes (examples/pods/userns-allocated.json)", "GET /v1/sandboxes",
            "GET /v1/sandboxes/ID", "GET /v1/sandboxes/ID/graph?format=mmd",
            "POST /v1/sandboxes/ID/stop", "DELETE /v1/sandboxes/ID",
            "GET /v1/sandboxes (empty again)", "stopping the daemon (SIGTERM)"]
        statuses = re.findall(r"^HTTP (\d+)$", text, re.MULTILINE)
        assert statuses == ["200", "201", "200", "200", "200", "200", "204", "200"]
        ip = re.search(r'"state":"Ready".*?"ip":"([\d.]+)"', text)
        assert ip and in_subnet(env, ip.group(1))
        assert '"state":"NotReady"' in text and "    class Ready current" in text
        assert '{"items":[],"last_event_seq":6}' in text
        assert text.endswith("daemon exited with status 0\n")
        assert not os.path.exists(os.path.join(env.tmp, "podfsm.sock"))
        assert env.leftovers() == {}
    finally:
        destroy_env(env)


def test_render_diagram(tmp_path: Path) -> None:
    # the machine: no daemon, no root
    machine = subprocess.run([sys.executable, str(EXAMPLES / "render_diagram.py"),
                              str(tmp_path / "machine")], capture_output=True, text=True,
                             cwd=ROOT, check=False)
    assert machine.returncode == 0, machine.stderr
    assert (tmp_path / "machine" / "states.mmd").read_text().startswith("stateDiagram-v2\n")
    assert svg_current((tmp_path / "machine" / "states.svg").read_bytes()) == []
    assert sorted(p.name for p in (tmp_path / "machine").iterdir()) == ["states.mmd",
                                                                        "states.svg"]
    # and one sandbox's, from a running daemon
    env = make_env("runc")
    try:
        use_env_network(env)
        with serving(env) as d, d.client() as c:
            r = c.post("/v1/sandboxes", content=(PODS / "node-userns.json").read_bytes(),
                       headers={"content-type": "application/json"})
            assert r.status_code == 201, r.text
            sandbox_id = r.json()["id"]
            c.post(f"/v1/sandboxes/{sandbox_id}/stop")
            out = subprocess.run([sys.executable, str(EXAMPLES / "render_diagram.py"),
                                  str(tmp_path / "one"), "--socket", d.socket,
                                  "--id", sandbox_id[:8]],
                                 capture_output=True, text=True, cwd=ROOT, check=False)
            assert out.returncode == 0, out.stderr
            assert f"sandbox {sandbox_id[:13]} (default/plain) is NotReady" in out.stdout
            base = tmp_path / "one" / f"sandbox-{sandbox_id[:13]}"
            mmd = base.with_suffix(".mmd").read_text()
            assert "    class NotReady current" in mmd
            assert "Ready --> NotReady : task_exit / fail / stop (5)" in mmd
            assert svg_current(base.with_suffix(".svg").read_bytes()) == ["state-NotReady"]
            assert c.delete(f"/v1/sandboxes/{sandbox_id}").status_code == 204
            assert d.terminate() == 0
        assert env.leftovers() == {}
    finally:
        destroy_env(env)
