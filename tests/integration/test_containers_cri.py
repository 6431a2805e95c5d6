"""Containers over a real `podfsm serve`, held to critest 1.26.1's container specs on runc and
crun: images pulled from a local registry through a gcr.io/registry.k8s.io mirror config, with
stand-ins of critest's busybox (busybox-static plus a `pgrep`, which Debian's busybox lacks)
and httpd (prints `httpd -D FOREGROUND`, serves port 80 with busybox httpd)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from tests import imagekit as ik
from tests.integration.conftest import Env
from tests.integration.test_cri import tool
from tests.integration.test_faces import Daemon, serving, use_env_network

pytestmark = [pytest.mark.integration, pytest.mark.parametrize("runtime", ["runc", "crun"])]

E2E = "e2e-test-images"
#: `pgrep NAME`: the pids whose comm is NAME, as procps' pgrep prints them; 1 when none
PGREP = b"""#!/bin/sh
found=
for d in /proc/[0-9]*; do
    read -r comm < "$d/comm" 2>/dev/null || continue
    if [ "$comm" = "$1" ]; then echo "${d#/proc/}"; found=1; fi
done
[ -n "$found" ]
"""
APPLETS = ("sh", "ls", "cat", "echo", "sleep", "id", "top", "httpd", "true", "kill", "ps")
CRITEST_FOCUS = ("Container runtime should support (basic operations|log|adding volume)"
                 "|Multiple Containers")


def busybox_image(*, cmd: tuple[str, ...] = ("sh",), extra: list[ik.Entry] | None = None
                  ) -> ik.Image:
    base = ik.busybox_layer(APPLETS)
    top = ik.make_layer([ik.Entry("bin", "dir", mode=0o755),
                         ik.Entry("bin/pgrep", data=PGREP, mode=0o755),
                         ik.Entry("tmp", "dir", mode=0o1777), *(extra or [])])
    return ik.build_image([base, top], cmd=cmd)


def httpd_image() -> ik.Image:
    return busybox_image(
        cmd=("/bin/sh", "-c", "echo 'httpd -D FOREGROUND'; exec httpd -f -p 80 -h /htdocs"),
        extra=[ik.Entry("htdocs", "dir", mode=0o755),
               ik.Entry("htdocs/index.html", data=b"<html>It works!</html>\n")])


@pytest.fixture(scope="module")
def registry() -> Iterator[ik.Registry]:
    with ik.run_registry() as reg:
        reg.push_image(f"{E2E}/busybox", busybox_image(), "1.29-2")
        reg.push_image(f"{E2E}/httpd", httpd_image(), "2.4.39-4")
        yield reg


@pytest.fixture
def daemon(env: Env, registry: ik.Registry) -> Iterator[Daemon]:
    use_env_network(env)
    certs = os.path.join(env.tmp, "certs.d")
    for host in ("gcr.io", "registry.k8s.io"):
        ik.hosts_toml(certs, host, registry.url)
    with serving(env, options=["--registry-config-dir", certs]) as d:
        yield d
        assert d.terminate() == 0
    assert env.leftovers() == {}


def test_critest_containers(env: Env, daemon: Daemon, runtime: str) -> None:
    sock = f"unix://{daemon.cri_socket}"
    r = subprocess.run([tool("critest"), "--runtime-endpoint", sock, "--image-endpoint", sock,
                        "--runtime-handler", runtime, "--ginkgo.no-color",
                        f"--ginkgo.focus={CRITEST_FOCUS}"],
                       capture_output=True, text=True, timeout=900, cwd=env.tmp, check=False)
    out = r.stdout + r.stderr
    summary = [line for line in out.splitlines() if "Passed" in line or "Ran " in line]
    print("\n".join(summary))
    assert r.returncode == 0, out[-20000:]
    assert "Ran 19 of " in out and "SUCCESS! -- 19 Passed | 0 Failed" in out, out[-5000:]
