"""The container verbs of the CLI against a real `podfsm serve`, on runc and crun: a real busybox
container from the local registry (the stand-in of critest's busybox) through pull, runp,
create, start, ps, inspect, logs, exec -s, stats, stop and rm, and logs -f of one that exits.
Each verb is a `python -m podfsm` process, as a person types it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import imagekit as ik
from tests.integration.conftest import Env
from tests.integration.test_containers_cri import BUSYBOX, E2E, busybox_image
from tests.integration.test_faces import Daemon, podfsm, podfsm_argv, serving, use_env_network

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def registry() -> Iterator[ik.Registry]:
    with ik.run_registry() as reg:
        reg.push_image(f"{E2E}/busybox", busybox_image(), "1.29-2")
        yield reg


@pytest.fixture
def daemon(env: Env, registry: ik.Registry) -> Iterator[Daemon]:
    use_env_network(env)
    certs = os.path.join(env.tmp, "certs.d")
    ik.hosts_toml(certs, "registry.k8s.io", registry.url)
    with serving(env, options=["--registry-config-dir", certs]) as d:
        yield d
        with d.client(timeout=120) as c:  # what a failed test left
            for item in c.get("/v1/sandboxes").json()["items"]:
                assert c.delete(f"/v1/sandboxes/{item['id']}").status_code < 300
        assert d.terminate() == 0
    assert env.leftovers() == {}


def ok(d: Daemon, *args: str) -> str:
    r = podfsm(d.socket, *args)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return r.stdout


def write(env: Env, name: str, body: object) -> str:
    path = Path(env.tmp, name)
    path.write_text(json.dumps(body))
    return str(path)


def until(check: object, within: float = 20) -> None:
    deadline = time.monotonic() + within
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_busybox_container_through_the_cli(env: Env, daemon: Daemon, runtime: str) -> None:
    d = daemon
    assert ok(d, "pull", BUSYBOX).startswith("Image is up to date for sha256:")
    logdir = os.path.join(env.tmp, "logs")
    pod = write(env, "pod.json", {"metadata": {"name": "cli-pod", "namespace": "t",
                                               "uid": "cli-pod"}, "log_directory": logdir})
    sid = ok(d, "runp", pod, "--runtime", runtime).strip()
    ctr = write(env, "ctr.json", {
        "metadata": {"name": "box"}, "image": {"image": BUSYBOX},
        "command": ["sh", "-c", "echo hello-out; echo hello-err >&2; exec sleep 1000"],
        "log_path": "box.log", "labels": {"app": "box"}})
    cid = ok(d, "create", sid[:12], ctr, pod).strip()
    assert re.fullmatch(r"[0-9a-f]{64}", cid)
    assert ok(d, "ps", "-a", "-q") == f"{cid}\n"
    assert ok(d, "ps", "-q") == ""  # Created, not running
    assert ok(d, "start", cid[:12]) == f"{cid}\n"

    header, row = ok(d, "ps").splitlines()
    assert header.split()[:4] == ["CONTAINER", "IMAGE", "CREATED", "STATE"]
    assert row.startswith(f"{cid[:13]}   {BUSYBOX}   ")
    assert row.split()[-5:] == ["Running", "box", "0", sid[:13], "cli-pod"]
    listed = json.loads(ok(d, "ps", "--label", "app=box", "-o", "json"))["containers"]
    assert [c["id"] for c in listed] == [cid] and listed[0]["state"] == "CONTAINER_RUNNING"
    assert listed[0]["imageRef"].startswith(f"registry.k8s.io/{E2E}/busybox@sha256:")
    doc = json.loads(ok(d, "inspect", cid[:8]))
    pid = doc["info"]["pid"]
    assert doc["status"]["state"] == "CONTAINER_RUNNING" and pid > 0
    assert Path(f"/proc/{pid}/comm").read_text() == "sleep\n"
    assert doc["info"]["runtimeHandler"] == runtime
    assert doc["status"]["logPath"] == os.path.join(logdir, "box.log")

    def logged() -> bool:
        r = podfsm(d.socket, "logs", cid)
        return r.stdout == "hello-out\n" and r.stderr == "hello-err\n"

    until(logged)
    r = podfsm(d.socket, "exec", "-s", cid, "sh", "-c", "echo in-$HOSTNAME; echo e >&2; exit 4")
    assert (r.returncode, r.stdout, r.stderr) == (4, "in-cli-pod\n", "e\n")
    t0 = time.monotonic()
    r = podfsm(d.socket, "exec", "-s", "--timeout", "1", cid, "sleep", "30")
    assert r.returncode == 1 and "timed out" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 15
    stats = ok(d, "stats", "-s", "0.5", cid).splitlines()
    assert stats[0].split() == ["CONTAINER", "NAME", "CPU", "%", "MEM", "DISK", "INODES"]
    name, cpu, mem = stats[1].split()[1:4]
    assert name == "box" and float(cpu) >= 0 and re.fullmatch(r"[0-9.]+[kM]B", mem), stats

    # a second one that exits while `logs -f` follows it: the command ends with it
    quick = write(env, "quick.json", {
        "metadata": {"name": "quick"}, "image": {"image": BUSYBOX},
        "command": ["sh", "-c", "sleep 1; echo one; sleep 1; echo two; exit 3"],
        "log_path": "quick.log"})
    qid = ok(d, "create", sid, quick, pod).strip()
    follower = subprocess.Popen(podfsm_argv(d.socket, "logs", "-f", qid), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ok(d, "start", qid)
    out, err = follower.communicate(timeout=60)
    assert (follower.returncode, out) == (0, "one\ntwo\n"), err
    q = json.loads(ok(d, "inspect", qid))["status"]
    assert (q["state"], q["exitCode"], q["reason"]) == ("CONTAINER_EXITED", 3, "Error")

    r = podfsm(d.socket, "rm", cid)
    assert r.returncode == 1 and "is running, please stop it first" in r.stderr
    assert ok(d, "stop", "-t", "5", cid) == f"{cid}\n"
    st = json.loads(ok(d, "inspect", cid))["status"]
    # sleep shares the pause's pid namespace (not pid 1 there): SIGTERM ends it
    assert (st["state"], st["exitCode"]) == ("CONTAINER_EXITED", 143), st
    assert not Path(f"/proc/{pid}").exists()
    assert ok(d, "rm", cid, qid) == f"{cid}\n{qid}\n"
    assert ok(d, "ps", "-a", "-q") == ""
    assert ok(d, "stopp", sid) == f"Stopped sandbox {sid}\n"
    assert ok(d, "rmp", sid) == f"Removed sandbox {sid}\n"


def test_the_page_shows_a_pods_containers_live(tmp_path: Path, registry: ik.Registry) -> None:
    """The web page in headless chromium (tests/integration/test_browser.py's): a container
    made through the API appears under its pod, Running with its machine drawn beside the
    pod's, then Exited, then gone while the pod stays."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.integration.conftest import destroy_env, make_env
    from tests.integration.test_browser import chromium

    env = make_env("runc")
    try:
        use_env_network(env)
        certs = os.path.join(env.tmp, "certs.d")
        ik.hosts_toml(certs, "registry.k8s.io", registry.url)
        with serving(env, port=0, options=["--registry-config-dir", certs]) as d, \
                d.client(timeout=60) as api, chromium(tmp_path) as browser:
            wait = WebDriverWait(browser, 20, poll_frequency=0.05)
            browser.get(f"http://127.0.0.1:{d.tcp_port}/?token={d.token}")

            def present(css: str) -> bool:
                return bool(browser.find_elements(By.CSS_SELECTOR, css))

            def until(css: str, what: str, *, gone: bool = False) -> None:
                try:
                    wait.until(lambda _: present(css) != gone)
                except TimeoutException:
                    pods = browser.find_element(By.ID, "pods").get_attribute("outerHTML")
                    pods = re.sub(r"<svg.*?</svg>", "<svg>...</svg>", pods or "", flags=re.S)
                    raise AssertionError(f"the page never showed {what}:\n{pods}") from None

            until("#conn.live", "the event stream live")
            until("#cmachine svg g#state-Running", "the container machine")
            assert api.post("/v1/images", json={"image": BUSYBOX}).status_code == 201
            sid = api.post("/v1/sandboxes", json={"metadata": {"name": "page", "namespace": "t",
                                                               "uid": "page"}}).json()["id"]
            card = f'section.pod[data-id="{sid}"]'
            until(f'{card} .state[data-state="Ready"]', "the pod Ready")
            assert not browser.find_element(By.CSS_SELECTOR, f"{card} .ctrs").is_displayed()
            r = api.post("/v1/containers", json={"sandbox_id": sid, "config": {
                "metadata": {"name": "web"}, "image": {"image": BUSYBOX},
                "command": ["sleep", "1000"]}})
            assert r.status_code == 201, r.text
            cid = r.json()["id"]
            row = f'{card} tr.ctr[data-id="{cid}"]'
            until(f'{row} .state[data-state="Created"]', "the container Created")
            assert api.post(f"/v1/containers/{cid}/start").status_code == 200
            until(f'{row} .state[data-state="Running"]', "the container Running")
            until(f"{card} .diagram svg g.current#container-{cid[:13]}-state-Running",
                  "its machine at Running")
            current = browser.execute_script(
                "return [...document.querySelectorAll(arguments[0])].map((g) => g.id)",
                f"{card} .diagram svg g.current")
            assert current == ["sandbox-state-Ready", f"container-{cid[:13]}-state-Running"]
            cells = browser.find_element(By.CSS_SELECTOR, row).text.split()
            assert cells[:3] == ["web", "Running", cid[:13]]
            assert api.post(f"/v1/containers/{cid}/stop").status_code == 200
            until(f'{row} .state[data-state="Exited"]', "the container Exited")
            assert "137 Error" in browser.find_element(By.CSS_SELECTOR, row).text
            assert api.delete(f"/v1/containers/{cid}").status_code == 204
            until(row, "the container gone", gone=True)
            until(f'{card} .state[data-state="Ready"]', "the pod still there")
            until(f"{card} .diagram svg g.current#state-Ready", "the pod's diagram alone again")
            log = browser.find_element(By.ID, "log").text
            assert f"container {cid[:13]}  Created -> Running  (start)" in log
            assert api.delete(f"/v1/sandboxes/{sid}").status_code == 204
            until(card, "the pod gone", gone=True)
            assert d.terminate(timeout=15) == 0, d.log_text()
        assert env.leftovers() == {}
    finally:
        destroy_env(env)
