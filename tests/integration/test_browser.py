"""The web page of `podfsm serve` in a real headless browser: Debian's chromium, driven by
Debian's chromedriver through selenium (both given by path, so selenium never looks for or
downloads a browser or a driver). The daemon listens on 127.0.0.1 only and the browser resolves
no other host: no traffic leaves the machine.

A sandbox created through the API appears on the open page, reaches Ready with its diagram
highlighting Ready, turns NotReady when stopped and disappears when removed, all without a
reload; the page says so when the daemon goes away."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from podfsm.drivers import linux
from tests.integration.conftest import destroy_env, make_env
from tests.integration.test_faces import PNG_MAGIC, PODS, serving, use_env_network

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_ARGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-first-run", "--no-default-browser-check", "--disable-default-apps",
    "--disable-crash-reporter", "--disable-breakpad",
    "--disable-extensions", "--no-proxy-server", "--window-size=1280,1000",
    # belt and braces: no name resolves, so nothing but 127.0.0.1 can be reached
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)
#: set to a path to keep the screenshot (docs/web-page.png was made so)
KEEP_SCREENSHOT = os.environ.get("PODFSM_KEEP_SCREENSHOT")


def descendants(pid: int) -> dict[int, str]:
    """Every live process below `pid`, with its start time (to tell it from a reused pid)."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = linux.proc_stat(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append((int(entry), fields[19]))
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        for child, started in children.get(todo.pop(), []):
            if child not in found:
                found[child] = started
                todo.append(child)
    return found


def _alive(pid: int, started: str) -> bool:
    fields = linux.proc_stat(pid)
    return fields is not None and fields[19] == started and fields[0] != "Z"


@contextlib.contextmanager
def chromium(tmp: Path) -> Iterator[webdriver.Chrome]:
    """A headless chromium with a fresh profile; it and every process it started are gone
    afterwards."""
    assert os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK), \
        "apt-get install chromium chromium-driver (.ci/setup does)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in CHROMIUM_ARGS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={tmp / 'profile'}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # chromium keeps crash reports and caches under $HOME: keep them in the test's directory
    home = tmp / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "XDG_CACHE_HOME": str(home / ".cache")}
    service = Service(CHROMEDRIVER, log_output=str(tmp / "chromedriver.log"), env=env)
    driver = webdriver.Chrome(service=service, options=options)
    assert service.process is not None
    driver_pid = service.process.pid
    tree = {driver_pid: str(linux.proc_start_time(driver_pid)), **descendants(driver_pid)}
    try:
        yield driver
    finally:
        tree |= descendants(driver_pid)
        driver.quit()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(*p) for p in tree.items()):
            time.sleep(0.05)
        for pid, started in tree.items():  # only ours: the same pid with the same start time
            if _alive(pid, started):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def test_a_sandbox_appears_reaches_ready_and_disappears_live(tmp_path: Path) -> None:
    env = make_env("runc")
    try:
        use_env_network(env)
        with serving(env, port=0) as d, d.client() as api, chromium(tmp_path) as browser:
            wait = WebDriverWait(browser, 15, poll_frequency=0.05)
            base = f"http://127.0.0.1:{d.tcp_port}/"
            # without the token the page loads but gets nothing, and says how to get in
            browser.get(base)
            wait.until(lambda _: "no token" in browser.find_element(By.ID, "conn").text)
            assert not browser.find_elements(By.CSS_SELECTOR, "#conn.live")
            # the URL serve printed: the token becomes a cookie the page's script cannot read
            m = re.search(r"open (http://\S+/\?token=\S+)", d.log_text())
            assert m and m.group(1) == f"{base}?token={d.token}", d.log_text()
            browser.get(m.group(1))
            assert browser.current_url == base  # the token is gone from the address bar
            cookie = browser.get_cookie(f"podfsm_token_{d.tcp_port}")
            assert cookie is not None and cookie["value"] == d.token
            assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
            assert d.token not in browser.execute_script("return document.cookie")

            def present(css: str) -> bool:
                return bool(browser.find_elements(By.CSS_SELECTOR, css))

            def until(condition: Callable[[], bool], what: str) -> None:
                try:
                    wait.until(lambda _: condition())
                except TimeoutException:
                    pods = browser.find_element(By.ID, "pods").get_attribute("outerHTML")
                    pods = re.sub(r"<svg.*?</svg>", "<svg>...</svg>", pods or "", flags=re.S)
                    log = browser.find_element(By.ID, "log").text
                    raise AssertionError(f"the page never showed {what}; it shows:\n{pods}\n"
                                         f"transitions:\n{log}") from None

            until(lambda: present("#conn.live"), "the event stream live")
            assert browser.find_element(By.ID, "empty").is_displayed()
            until(lambda: present("#machine svg"), "the machine's diagram")
            browser.execute_script("window.podfsmNotReloaded = true")

            # a sandbox made through the API appears and reaches Ready, diagram and all
            r = api.post("/v1/sandboxes", content=(PODS / "userns-allocated.json").read_bytes(),
                         headers={"content-type": "application/json"})
            assert r.status_code == 201, r.text
            st = r.json()
            card = f'section.pod[data-id="{st["id"]}"]'
            until(lambda: present(f'{card} .state[data-state="Ready"]'), "the sandbox Ready")
            until(lambda: present(f"{card} .diagram svg g.current#state-Ready"),
                  "its diagram at Ready")
            # (read in one go: the page redraws a diagram when the sandbox's history grows)
            current = browser.execute_script(
                "return [...document.querySelectorAll(arguments[0])].map((g) => g.id)",
                f"{card} .diagram svg g.current")
            assert current == ["state-Ready"]
            pod = browser.find_element(By.CSS_SELECTOR, card)
            assert pod.find_element(By.CSS_SELECTOR, ".name").text == "default/web"
            assert pod.find_element(By.CSS_SELECTOR, ".ip").text == st["ip"]
            assert pod.find_element(By.CSS_SELECTOR, ".pid").text == str(st["pid"])
            assert pod.find_element(By.CSS_SELECTOR, ".runtime").text == "runc"
            until(lambda: "TaskRunning -> Ready" in browser.find_element(By.ID, "log").text,
                  "the transition to Ready in the log")
            log = browser.find_element(By.ID, "log").text
            assert "Unknown -> NamespacesReady  (setup_namespaces)" in log
            assert not browser.find_element(By.ID, "empty").is_displayed()

            shot = tmp_path / "web-page.png"
            assert browser.save_screenshot(str(shot))
            png = shot.read_bytes()
            assert png.startswith(PNG_MAGIC) and len(png) > 10_000
            if KEEP_SCREENSHOT:
                shutil.copyfile(shot, KEEP_SCREENSHOT)

            # stopped: NotReady, with the diagram's current state following
            assert api.post(f"/v1/sandboxes/{st['id']}/stop").status_code == 200
            until(lambda: present(f'{card} .state[data-state="NotReady"]'), "the sandbox NotReady")
            until(lambda: present(f"{card} .diagram svg g.current#state-NotReady"),
                  "its diagram at NotReady")

            # removed: it disappears
            assert api.delete(f"/v1/sandboxes/{st['id']}").status_code == 204
            until(lambda: not present(card), "the sandbox gone")
            assert browser.find_element(By.ID, "empty").is_displayed()
            assert browser.execute_script("return window.podfsmNotReloaded") is True

            # the daemon goes: it stops at once although the page holds a stream open,
            # and the page says it is no longer live
            assert d.terminate(timeout=15) == 0, d.log_text()
            until(lambda: not present("#conn.live"), "the stream no longer live")
            errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"
                      and "favicon.ico" not in e["message"]
                      and "/v1/" not in e["message"]]  # the requests that meet the closed port
            assert errors == []
        assert env.leftovers() == {}
    finally:
        destroy_env(env)
