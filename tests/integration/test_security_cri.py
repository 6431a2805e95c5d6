"""The container security context over a real `podfsm serve`, held to critest 1.26.1's
`Security Context|Networking|Mount Propagation|sysctls` specs on runc and crun (MaskedPaths
skipped: Debian's busybox shell runs `ls` without exec, so the spec masking /bin/ls cannot
fail). Stand-ins of critest's images, served by a local registry through a registry.k8s.io /
gcr.io mirror config: busybox (busybox-static with every applet, a `pgrep` and an `ipcs -m`
reading /proc/sysvipc/shm, which busybox-static lacks), nginx (a static C program built here
with gcc: pid 1 showing `nginx: master process` in its cmdline, writing /var/run/nginx.pid,
answering HTTP on port 80), nonewprivs (a setuid-root static binary printing `Effective uid:
N`), test-image-predefined-group (uid 1000 in group 50000) and test-image-user-*."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

from tests import imagekit as ik
from tests.integration.conftest import Env
from tests.integration.test_containers_cri import E2E, PGREP, _remove_all
from tests.integration.test_cri import tool
from tests.integration.test_faces import Daemon, serving, use_env_network

pytestmark = [pytest.mark.integration, pytest.mark.parametrize("runtime", ["runc", "crun"])]

CRITOOLS = "k8s-staging-cri-tools"
FOCUS = "Security Context|Networking|Mount Propagation|sysctls"
SKIP = "MaskedPaths"
#: `ipcs -m`: the System V shared memory segments of the caller's IPC namespace, with their ids
IPCS = b"#!/bin/sh\ncat /proc/sysvipc/shm\n"

NGINX_C = r"""
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
static void bye(int sig) { (void)sig; _exit(0); }
int main(int argc, char **argv) {
    if (argc < 2 || strcmp(argv[1], "--serve") != 0) {
        char *title[] = {"nginx: master process nginx -g daemon off;", "--serve", NULL};
        execv("/usr/sbin/nginx", title);
        return 127;
    }
    signal(SIGTERM, bye); signal(SIGINT, bye); signal(SIGPIPE, SIG_IGN);
    FILE *f = fopen("/var/run/nginx.pid", "w");
    if (!f) return 1;
    fprintf(f, "%d\n", getpid()); fclose(f);
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET; a.sin_port = htons(80); a.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 16)) return 1;
    const char *page = "HTTP/1.0 200 OK\r\nContent-Type: text/html\r\nContent-Length: 44\r\n"
                       "Connection: close\r\n\r\n<html><h1>Welcome to nginx!</h1></html>\n\n\n\n\n";
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) continue;
        char buf[4096];
        (void)read(c, buf, sizeof buf);
        (void)write(c, page, strlen(page));
        close(c);
    }
}
"""

NONEWPRIVS_C = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) { printf("Effective uid: %d\n", geteuid()); return 0; }
"""


def _gcc(src: str, name: str) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        c, out = os.path.join(d, f"{name}.c"), os.path.join(d, name)
        with open(c, "w") as f:
            f.write(src)
        subprocess.run(["gcc", "-static", "-O2", "-o", out, c], check=True,
                       capture_output=True, timeout=120)
        with open(out, "rb") as f:
            return f.read()


def _applets() -> list[str]:
    out = subprocess.run([ik.BUSYBOX, "--list"], capture_output=True, text=True,
                         check=True).stdout.split()
    return [a for a in out if a not in ("pgrep", "ipcs", "busybox")]


#: busybox 1.29's own /etc files (critest's RunAsUserName spec runs as `nobody`)
PASSWD = (b"root:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33:www-data:/var/www:/bin/sh\n"
          b"nobody:x:65534:65534:nobody:/home:/bin/false\n")
GROUP = b"root:x:0:\nwww-data:x:33:\nnogroup:x:65534:\n"


def _busybox_layers() -> list[ik.Layer]:
    base = ik.busybox_layer(_applets())
    top = ik.make_layer([ik.Entry("bin", "dir", mode=0o755),
                         ik.Entry("bin/pgrep", data=PGREP, mode=0o755),
                         ik.Entry("bin/ipcs", data=IPCS, mode=0o755),
                         ik.Entry("tmp", "dir", mode=0o1777),
                         ik.Entry("etc", "dir", mode=0o755),
                         ik.Entry("etc/passwd", data=PASSWD), ik.Entry("etc/group", data=GROUP)])
    return [base, top]


def _etc(passwd: bytes, group: bytes) -> ik.Layer:
    return ik.make_layer([ik.Entry("etc", "dir", mode=0o755),
                          ik.Entry("etc/passwd", data=passwd),
                          ik.Entry("etc/group", data=group)])


@pytest.fixture(scope="module")
def registry() -> Iterator[ik.Registry]:
    nginx = _gcc(NGINX_C, "nginx")
    nonewprivs = _gcc(NONEWPRIVS_C, "nonewprivs")
    with ik.run_registry() as reg:
        bb = _busybox_layers()
        reg.push_image(f"{E2E}/busybox", ik.build_image(bb, cmd=("sh",)), "1.29-2")
        reg.push_image(f"{E2E}/nginx", ik.build_image([*bb, ik.make_layer([
            ik.Entry("usr", "dir", mode=0o755), ik.Entry("usr/sbin", "dir", mode=0o755),
            ik.Entry("usr/sbin/nginx", data=nginx, mode=0o755),
            ik.Entry("var", "dir", mode=0o755), ik.Entry("var/run", "dir", mode=0o755)])],
            cmd=("/usr/sbin/nginx",)), "1.14-2")
        reg.push_image(f"{E2E}/nonewprivs", ik.build_image([*bb, ik.make_layer([
            ik.Entry("usr", "dir", mode=0o755), ik.Entry("usr/local", "dir", mode=0o755),
            ik.Entry("usr/local/bin", "dir", mode=0o755),
            ik.Entry("usr/local/bin/nnp", data=nonewprivs, mode=0o4755)])],
            cmd=("/usr/local/bin/nnp",)), "1.3")
        passwd = (b"root:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33::/var/www:/bin/sh\n"
                  b"default-user:x:1000:1000::/home:/bin/sh\n")
        group = b"root:x:0:\nwww-data:x:33:\ngroup-defined-in-image:x:50000:default-user\n"
        reg.push_image(f"{CRITOOLS}/test-image-predefined-group", ik.build_image(
            [*bb, _etc(passwd, group)], user="1000", cmd=("sh",)), "latest")
        for name, user in (("test-image-user-uid", "1002"),
                           ("test-image-user-username", "www-data"),
                           ("test-image-user-uid-group", "1003:1004"),
                           ("test-image-user-username-group", "www-data:1004")):
            reg.push_image(f"{CRITOOLS}/{name}", ik.build_image(bb, user=user, cmd=("sh",)),
                           "latest")
        yield reg


@pytest.fixture
def daemon(env: Env, registry: ik.Registry) -> Iterator[Daemon]:
    use_env_network(env)
    certs = os.path.join(env.tmp, "certs.d")
    for host in ("gcr.io", "registry.k8s.io"):
        ik.hosts_toml(certs, host, registry.url)
    with serving(env, options=["--registry-config-dir", certs]) as d:
        yield d
        _remove_all(d)
        assert d.terminate() == 0
    assert env.leftovers() == {}


def _shm_ids() -> set[str]:
    with open("/proc/sysvipc/shm") as f:
        return {line.split()[1] for line in f.readlines()[1:]}


def test_critest_security_context(env: Env, daemon: Daemon, runtime: str) -> None:
    sock = f"unix://{daemon.cri_socket}"
    shm_before = _shm_ids()
    try:
        r = subprocess.run([tool("critest"), "--runtime-endpoint", sock, "--image-endpoint",
                            sock, "--runtime-handler", runtime, "--ginkgo.no-color",
                            f"--ginkgo.focus={FOCUS}", f"--ginkgo.skip={SKIP}"],
                           capture_output=True, text=True, timeout=1500, cwd=env.tmp,
                           check=False)
    finally:
        # the HostIpc specs make shared memory segments on the host (ipcmk) and leave them
        for shmid in _shm_ids() - shm_before:
            subprocess.run(["ipcrm", "-m", shmid], capture_output=True, check=False)
    out = r.stdout + r.stderr
    with open(os.path.join(os.environ.get("PODFSM_CRITEST_OUT", env.tmp),
                           f"critest-security-{runtime}.log"), "w") as f:
        f.write(out)
    summary = [line for line in out.splitlines() if "Passed" in line or "Ran " in line]
    print("\n".join(summary))
    assert r.returncode == 0, out[-20000:]
    assert " 0 Failed" in out, out[-5000:]
