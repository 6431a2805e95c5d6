"""Each PodSandboxConfig field: its validation, what it makes of the pause's OCI spec and the
sandbox's files, and the admission checks that need the controller's configuration (fake
drivers; the real-sandbox checks are in tests/integration/test_pod_config.py)."""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from podfsm import InvalidPodConfig, State
from podfsm.core import ocispec
from podfsm.core.errors import SandboxRunError
from podfsm.core.records import SandboxFiles
from podfsm.core.requests import PauseRequest
from podfsm.core.spec import (
    TEXT,
    DNSConfig,
    IDMapping,
    LinuxContainerResources,
    PodSandboxConfig,
    ProfileType,
    parse_pod_config,
)
from tests.fakes import Rig

MAP = IDMapping(host_id=1 << 20, container_id=0, length=65536)


def pod(**extra: Any) -> dict[str, Any]:
    return {"metadata": {"name": "web", "namespace": "default", "uid": "u1"}, **extra}


def sc(**fields: Any) -> dict[str, Any]:
    return pod(linux={"security_context": fields})


# ---------------------------------------------------------------------------------------------
# validation


def test_every_field_accepts_what_kubelet_sends_in_either_key_style() -> None:
    cfg = parse_pod_config({
        "metadata": {"name": "web", "namespace": "ns", "uid": "8f0c-11", "attempt": 1},
        "hostname": "web-0",
        "logDirectory": "/var/log/pods/ns_web_8f0c-11",
        "dnsConfig": {"servers": ["10.96.0.10"], "searches": ["ns.svc.cluster.local"],
                      "options": ["ndots:5"]},
        "portMappings": [{"protocol": "SCTP", "containerPort": 80, "hostPort": 8080,
                          "hostIp": "0.0.0.0"}],
        "labels": {"app": "web"}, "annotations": {"kubernetes.io/config.seen": "2026-11-30"},
        "linux": {
            "cgroupParent": "/podfsm/kubepods/besteffort",
            "securityContext": {
                "runAsUser": {"value": 1000}, "runAsGroup": {"value": 1000},
                "supplementalGroups": [2000], "readonlyRootfs": True,
                "seccomp": {"profileType": 0}, "apparmor": {"profileType": "Unconfined"},
                "selinuxOptions": {"level": "s0:c1,c2"},
                "supplementalGroupsPolicy": "Strict",
                "namespaceOptions": {"pid": "CONTAINER", "ipc": 0},
            },
            "sysctls": {"net.ipv4.ip_unprivileged_port_start": "0"},
            "resources": {"cpuPeriod": 100000, "cpuQuota": -1, "cpuShares": 2,
                          "memoryLimitInBytes": 0, "hugepageLimits": [{"pageSize": "2MB"}],
                          "unified": {"memory.high": "max"}, "cpusetCpus": "0-1,3"},
            "overhead": {"cpuShares": 10},
        },
        "windows": {},
    })
    assert cfg.linux.security_context.seccomp is not None
    assert cfg.linux.security_context.seccomp.profile_type is ProfileType.RuntimeDefault
    assert cfg.dns_config is not None and cfg.dns_config.servers == ["10.96.0.10"]
    assert cfg.linux.resources is not None and cfg.linux.resources.cpu_quota == -1


REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "unknown top-level key": (pod(hostnme="x"), "hostnme: unknown field"),
    "unknown nested key": (sc(runAsUsr={"value": 1}), "runAsUsr: unknown field"),
    "group without user": (sc(run_as_group={"value": 1}), "run_as_group"),
    "uid -1": (sc(run_as_user={"value": 4294967295}), "run_as_user.value"),
    "Localhost without ref": (sc(seccomp={"profile_type": "Localhost"}), "localhost_ref"),
    "ref without Localhost": (sc(seccomp={"localhost_ref": "/p.json"}), "only used with"),
    "relative deprecated profile": (sc(seccomp_profile_path="localhost/p.json"),
                                    "seccomp_profile_path"),
    "unknown profile type": (sc(seccomp={"profile_type": "Strict"}), "unknown ProfileType"),
    "privileged with pod userns": (pod(linux={"security_context": {
        "privileged": True, "namespace_options": {"userns_options": {"mode": "POD"}}}}),
        "privileged contradicts"),
    "host pid with pod userns": (pod(linux={"security_context": {"namespace_options": {
        "pid": "NODE", "userns_options": {"mode": "POD"}}}}), "pid NODE contradicts"),
    "host ipc with pod userns": (pod(linux={"security_context": {"namespace_options": {
        "ipc": "NODE", "userns_options": {"mode": "POD"}}}}), "ipc NODE contradicts"),
    "ipc CONTAINER": (pod(linux={"security_context": {"namespace_options": {
        "ipc": "CONTAINER"}}}), "ipc CONTAINER is not supported"),
    "pid TARGET": (pod(linux={"security_context": {"namespace_options": {"pid": 3}}}),
                   "pid TARGET"),
    "target_id": (pod(linux={"security_context": {"namespace_options": {"target_id": "x"}}}),
                  "target_id"),
    "net sysctl on host network": (pod(linux={
        "sysctls": {"net.core.somaxconn": "1"},
        "security_context": {"namespace_options": {"network": "NODE"}}}), "network is NODE"),
    "ipc sysctl on host ipc": (pod(linux={
        "sysctls": {"kernel.shmmax": "1"},
        "security_context": {"namespace_options": {"ipc": "NODE"}}}), "ipc is NODE"),
    "port mapping on host network": (pod(
        port_mappings=[{"container_port": 80, "host_port": 80}],
        linux={"security_context": {"namespace_options": {"network": "NODE"}}}),
        "port_mappings"),
    "host port without container port": (pod(port_mappings=[{"host_port": 80}]),
                                         "needs a container_port"),
    "host_ip not an address": (pod(port_mappings=[{"container_port": 1, "host_port": 1,
                                                   "host_ip": "1.2.3"}]), "host_ip"),
    "host_ip with a zone": (pod(port_mappings=[{"container_port": 1, "host_port": 1,
                                                "host_ip": "fe80::1%eth0"}]), "host_ip"),
    "protocol": (pod(port_mappings=[{"protocol": "ICMP"}]), "unknown Protocol"),
    "dns server": (pod(dns_config={"servers": ["not-an-ip"]}), "dns_config.servers"),
    "four dns servers": (pod(dns_config={"servers": ["1.1.1.1"] * 4}), "dns_config.servers"),
    "dns search with a space": (pod(dns_config={"searches": ["a b"]}), "dns_config.searches"),
    "dns option with a newline": (pod(dns_config={"options": ["ndots:5\nnameserver 1.2.3.4"]}),
                                  "dns_config.options"),
    "relative log directory": (pod(log_directory="logs"), "log_directory"),
    "log directory with ..": (pod(log_directory="/var/log/../../etc"), "log_directory"),
    "hostname with a dot": (pod(hostname="a.b"), "hostname"),
    "hostname with newline": (pod(hostname="web\n"), "hostname"),
    "label with escape": (pod(labels={"a": "\x1b[2J"}), "labels.a"),
    "label key with newline": (pod(labels={"a\n": "b"}), "labels"),
    "annotation with surrogate": (pod(annotations={"a": "\ud800"}), "annotations.a"),
    "uid with =": (pod(metadata={"name": "web", "uid": "a=b"}), "metadata.uid"),
    "uid with /": (pod(metadata={"name": "web", "uid": "../x"}), "metadata.uid"),
    "name with trailing newline": (pod(metadata={"name": "web\n"}), "metadata.name"),
    "cgroup parent with newline": (pod(linux={"cgroup_parent": "/podfsm/a\n"}), "cgroup_parent"),
    "sysctl value with newline": (pod(linux={"sysctls": {"net.core.somaxconn": "1\n2"}}),
                                  "sysctls"),
    "cpuset": (pod(linux={"resources": {"cpuset_cpus": "0;1"}}), "cpuset_cpus"),
    "oom_score_adj": (pod(linux={"overhead": {"oom_score_adj": -1001}}), "oom_score_adj"),
    "windows": (pod(windows={"security_context": {"host_process": True}}), "Linux runtime"),
    "selinux with newline": (sc(selinux_options={"type": "x\n"}), "selinux_options.type"),
    "bidi override in an annotation": (pod(annotations={"a": "evil\u202etxt.exe"}),
                                       "annotations.a"),
    "line separator in a label": (pod(labels={"a": "x\u2028y"}), "labels.a"),
    "no-break space in a name": (pod(metadata={"name": "a\xa0b"}), "metadata.name"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refusal_names_the_field(case: str) -> None:
    data, words = REFUSED[case]
    with pytest.raises(InvalidPodConfig) as info:
        parse_pod_config(data)
    assert words in str(info.value)


def test_patterns_match_whole_strings() -> None:
    assert re.fullmatch(TEXT, "web") and not re.match(TEXT, "web\n")
    assert r"\Z" in TEXT and "$" not in TEXT


def test_the_name_pattern_agrees_with_the_printable_rule() -> None:
    # what the JSON schema says of a name is what the validator does, for every code point
    # (the planes above the BMP too): refused is what str.isprintable refuses but unassigned
    # and private-use code points, on the Python this runs on (a newer Unicode fails here
    # until the list in spec.py is brought up to date)
    pattern = re.compile(PodSandboxConfig.model_json_schema()["$defs"]["PodSandboxMetadata"][
        "properties"]["name"]["pattern"])
    wrong = [hex(cp) for cp in range(0x110000) if chr(cp) not in ";=" and (
        pattern.match(chr(cp)) is None) != (
        not chr(cp).isprintable() and unicodedata.category(chr(cp)) not in ("Cn", "Co"))]
    assert wrong == []
    for c in ("\U000e0041", "\u200b", "\u202e", "\x85"):  # a tag, zero-width, bidi, NEL
        with pytest.raises(InvalidPodConfig, match=r"metadata\.name"):
            parse_pod_config({"metadata": {"name": f"web{c}"}})
    # an emoji; unassigned ones; private use
    for c in ("\U0001f600", "\u0378", "\U000e0080", "\ue000", "\U000f0000"):
        assert parse_pod_config({"metadata": {"name": f"web{c}"}}).metadata.name == f"web{c}"


def test_the_json_schema_carries_the_constraints() -> None:
    schema = json.dumps(PodSandboxConfig.model_json_schema())
    assert r"\\Z" in schema and '"additionalProperties": false' in schema
    assert '"maxProperties": 0' in schema  # windows
    assert '"RuntimeDefault"' in schema and '"SCTP"' in schema  # enum names are inputs


def test_deprecated_seccomp_profile_path_forms() -> None:
    def profile(path: str) -> tuple[ProfileType, str] | None:
        p = parse_pod_config(sc(seccomp_profile_path=path)).linux.security_context
        got = p.seccomp_profile()
        return None if got is None else (got.profile_type, got.localhost_ref)

    assert profile("") is None and profile("unconfined") is None
    assert profile("runtime/default") == (ProfileType.RuntimeDefault, "")
    assert profile("docker/default") == (ProfileType.RuntimeDefault, "")
    assert profile("localhost//etc/p.json") == (ProfileType.Localhost, "/etc/p.json")


# ---------------------------------------------------------------------------------------------
# the pause's OCI spec


def request(**kw: Any) -> PauseRequest:
    base: dict[str, Any] = dict(container_id="c0ffee", hostname="pod-a",
                                netns_path="/run/netns/x", userns_path="/u", uid_mapping=MAP,
                                gid_mapping=MAP)
    return PauseRequest(**{**base, **kw})


def spec_of(**kw: Any) -> dict[str, Any]:
    return ocispec.pause_spec(request(**kw), rootfs="/rootfs")


FILES = SandboxFiles(hostname_path="/s/hostname", hosts_path="/s/hosts",
                     resolv_conf_path="/s/resolv.conf", shm_path="/s/shm", shm_mounted=True)


def test_user_group_and_supplemental_groups() -> None:
    assert spec_of()["process"]["user"] == {"uid": 0, "gid": 0}
    user = spec_of(run_as_user=1000, run_as_group=3000,
                   supplemental_groups=(4000, 5000))["process"]["user"]
    assert user == {"uid": 1000, "gid": 3000, "additionalGids": [4000, 5000]}


def test_seccomp_is_what_admission_chose() -> None:
    assert "seccomp" not in spec_of()["linux"]
    default = ocispec.runtime_default_seccomp()
    got = spec_of(seccomp=default)["linux"]["seccomp"]
    assert got["defaultAction"] == "SCMP_ACT_ERRNO"
    allowed = set(got["syscalls"][0]["names"])
    # what catatonit -P and the runtimes' last steps need, and nothing that changes the host
    assert {"execve", "signalfd4", "rt_sigtimedwait", "wait4", "fstatfs"} <= allowed
    assert not {"mount", "ptrace", "unshare", "setns", "bpf", "kexec_load"} & allowed


def test_host_pid_and_ipc_drop_those_namespaces() -> None:
    kinds = [n["type"] for n in spec_of(host_pid=True, host_ipc=True)["linux"]["namespaces"]]
    assert "pid" not in kinds and "ipc" not in kinds and "uts" in kinds
    spec = spec_of(host_ipc=True, files=FILES.model_copy(update={"shm_path": "/dev/shm"}))
    shm = [m for m in spec["mounts"] if m["destination"] == "/dev/shm"]
    assert shm == [{"destination": "/dev/shm", "type": "bind", "source": "/dev/shm",
                    "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]}]
    assert not [m for m in spec["mounts"] if m["destination"] == "/dev/mqueue"]


def test_sandbox_files_are_bound_read_only() -> None:
    mounts = {m["destination"]: m for m in spec_of(files=FILES)["mounts"]}
    for dest, src in (("/etc/hostname", "/s/hostname"), ("/etc/hosts", "/s/hosts"),
                      ("/etc/resolv.conf", "/s/resolv.conf"), ("/dev/shm", "/s/shm")):
        assert mounts[dest]["source"] == src and mounts[dest]["type"] == "bind"
        assert "ro" in mounts[dest]["options"]
    assert [m["destination"] for m in spec_of(files=FILES)["mounts"]].count("/dev/shm") == 1


def test_resources_reach_the_runtime_as_containerd_annotations() -> None:
    res = LinuxContainerResources(cpu_period=100000, cpu_quota=50000, cpu_shares=512,
                                  memory_limit_in_bytes=1 << 27)
    spec = spec_of(resources=res)
    assert spec["annotations"]["io.kubernetes.cri.sandbox-cpu-quota"] == "50000"
    assert spec["annotations"]["io.kubernetes.cri.sandbox-memory"] == str(1 << 27)
    assert "io.kubernetes.cri.sandbox-cpu-quota" not in spec_of()["annotations"]


def test_only_annotations_matching_the_operators_patterns_reach_the_spec() -> None:
    ann = {"run.oci.pidfd_receiver": "/s.sock", "example.com/a": "1", "example.org/b": "2"}
    assert ocispec.passthrough_annotations(ann, ()) == {}
    assert ocispec.passthrough_annotations(ann, ("example.com/*",)) == {"example.com/a": "1"}
    assert "run.oci.pidfd_receiver" not in spec_of(annotations=ann)["annotations"]


def test_network_node_has_no_hostname_in_the_spec() -> None:
    assert "hostname" not in spec_of(netns_path=None)


def test_resolv_conf_as_containerd_writes_it() -> None:
    dns = DNSConfig(servers=["10.0.0.10", "fd00::a"], searches=["a.example", "b.example"],
                    options=["ndots:5"])
    assert ocispec.resolv_conf(dns) == ("search a.example b.example\nnameserver 10.0.0.10\n"
                                        "nameserver fd00::a\noptions ndots:5\n")
    assert ocispec.resolv_conf(DNSConfig()) == ""


@pytest.mark.parametrize(("text", "says"), [
    ("{nope", "not JSON"),
    (b"\xff\xfe secret", "not JSON"),
    ("[]", "JSON object"),
    ('{"defaultAction": "SCMP_ACT_NOPE"}', "defaultAction"),
    ('{"defaultAction": "hunter2"}', "defaultAction"),
    ('{"defaultAction": "SCMP_ACT_ERRNO", "listenerPath": "/x.sock"}', "listenerPath"),
    ('{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": "read"}]}', "syscalls"),
])
def test_a_bad_localhost_profile_is_refused_without_quoting_it(text: str | bytes,
                                                               says: str) -> None:
    with pytest.raises(ValueError, match=says) as info:
        ocispec.seccomp_from_profile(text)
    said = str(info.value)
    for secret in ("hunter2", "secret", "nope", "0xff", "\\xff", "SCMP_ACT_NOPE", "/x.sock"):
        assert secret not in said


def test_a_localhost_profile_keeps_only_the_oci_keys() -> None:
    got = ocispec.seccomp_from_profile(json.dumps({
        "defaultAction": "SCMP_ACT_ALLOW", "archMap": [], "comment": "x",
        "syscalls": [{"names": ["ptrace"], "action": "SCMP_ACT_ERRNO"}]}))
    assert got == {"defaultAction": "SCMP_ACT_ALLOW",
                   "syscalls": [{"names": ["ptrace"], "action": "SCMP_ACT_ERRNO"}]}


# ---------------------------------------------------------------------------------------------
# admission and the sandbox's files, on fake drivers


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = Rig(tmp_path)
    yield r
    await r.rt.kill_all()


def userns_pod(uid: dict[str, int] | None = None, **sc_fields: Any) -> dict[str, Any]:
    us: dict[str, Any] = {"mode": "POD"}
    if uid is not None:
        us.update(uids=[uid], gids=[uid])
    return pod(linux={"security_context": {"namespace_options": {"userns_options": us},
                                           **sc_fields}})


async def test_admission_refusals_that_need_the_configuration(rig: Rig, tmp_path: Path) -> None:
    start = rig.cfg.idmap_pool_start
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases = {
        "below the pool": (userns_pod({"host_id": 1, "container_id": 0, "length": 65535}),
                           "host ids 1-65535 are not inside"),
        "past the pool": (userns_pod({"host_id": start + rig.cfg.idmap_pool_size - 10,
                                      "container_id": 0, "length": 65536}), "not inside"),
        "too long": (userns_pod({"host_id": start, "container_id": 0, "length": 1 << 31}),
                     "more than the 65536"),
        "cgroup parent elsewhere": (pod(linux={"cgroup_parent": "/esc-bars/a/b"}),
                                    "not under podfsm's cgroup root /podfsm"),
        "cgroup parent prefix": (pod(linux={"cgroup_parent": "/podfsmx"}), "cgroup_parent"),
        "unmapped user": (userns_pod(run_as_user={"value": 70000}), "run_as_user 70000"),
        "unmapped group": (userns_pod(run_as_user={"value": 0},
                                      supplemental_groups=[65536]), "supplemental_groups"),
        "missing profile": (sc(seccomp={"profile_type": "Localhost",
                                        "localhost_ref": str(tmp_path / "none.json")}),
                            str(tmp_path / "none.json")),
        "invalid profile": (sc(seccomp_profile_path=f"localhost/{bad}"), str(bad)),
        "a fifo for a profile": (sc(seccomp={"profile_type": "Localhost",
                                             "localhost_ref": str(fifo)}),
                                 "cannot be used: it is not a readable regular file"),
    }
    async with rig.controller() as ctl:
        for case, (data, words) in cases.items():
            with pytest.raises(InvalidPodConfig) as info:
                await ctl.run_sandbox(data)
            assert words in str(info.value), case
        assert await ctl.list_sandboxes() == []
    rig.nothing_left()
    assert rig.rt.requests == []
    assert not os.path.exists(os.path.join(rig.cfg.run_dir, "sandboxes")) or not os.listdir(
        os.path.join(rig.cfg.run_dir, "sandboxes"))


async def test_a_profile_path_gets_one_answer_whatever_it_is(rig: Rig, tmp_path: Path) -> None:
    # missing, a directory, a FIFO, a terminal, a symlink loop: one answer, so a client
    # learns nothing of what lies at a path on the daemon's host
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    master, terminal = os.openpty()
    paths = [tmp_path / "none.json", tmp_path, fifo, tmp_path / "loop",
             Path(os.ttyname(terminal))]
    said = set()
    try:
        async with rig.controller() as ctl:
            for path in paths:
                with pytest.raises(InvalidPodConfig) as info:
                    await ctl.run_sandbox(sc(seccomp={"profile_type": "Localhost",
                                                      "localhost_ref": str(path)}))
                said.add(str(info.value).replace(repr(str(path)), "<path>"))
    finally:
        os.close(master)
        os.close(terminal)
    assert said == {"linux.security_context.seccomp.localhost_ref: the seccomp profile <path> "
                    "cannot be used: it is not a readable regular file"}
    rig.nothing_left()


async def test_the_pause_request_carries_every_honoured_field(rig: Rig, tmp_path: Path) -> None:
    profile = tmp_path / "p.json"
    profile.write_text('{"defaultAction": "SCMP_ACT_LOG"}')
    logs = tmp_path / "logs" / "a" / "b"
    cfg = rig.cfg.model_copy(update={"pod_annotations": ("example.com/*",)})
    rig.cfg = cfg
    data = userns_pod(run_as_user={"value": 1000}, run_as_group={"value": 1000},
                      supplemental_groups=[7],
                      seccomp={"profile_type": "Localhost", "localhost_ref": str(profile)})
    data.update(hostname="h1", log_directory=str(logs),
                dns_config={"servers": ["10.0.0.1"]},
                annotations={"example.com/x": "1", "run.oci.hooks": "2"})
    data["linux"]["cgroup_parent"] = "/podfsm/kube"
    async with rig.controller() as ctl:
        st = await ctl.run_sandbox(data)
        assert st.state is State.READY
        req = rig.rt.requests[-1]
        assert (req.run_as_user, req.run_as_group, req.supplemental_groups) == (1000, 1000, (7,))
        assert req.seccomp == {"defaultAction": "SCMP_ACT_LOG"}
        assert req.cgroup_parent == "/podfsm/kube"
        assert req.annotation_patterns == ("example.com/*",)
        spec = ocispec.pause_spec(req, rootfs="/r")
        assert "example.com/x" in spec["annotations"]
        assert "run.oci.hooks" not in spec["annotations"]
        assert st.files is not None and req.files == st.files
        assert Path(st.files.hostname_path).read_text() == "h1\n"
        assert Path(st.files.resolv_conf_path).read_text() == "nameserver 10.0.0.1\n"
        assert "localhost" in Path(st.files.hosts_path).read_text()
        assert logs.is_dir() and st.files.log_directory_created == str(tmp_path / "logs")
        await ctl.remove_sandbox(st.id)
    assert not (tmp_path / "logs").exists()
    rig.nothing_left()


async def test_privileged_and_unconfined_get_no_filter_and_default_gets_one(rig: Rig) -> None:
    async with rig.controller() as ctl:
        for data, want in ((sc(privileged=True, seccomp={}), None),
                           (sc(seccomp={"profile_type": "Unconfined"}), None),
                           (sc(seccomp={}), ocispec.runtime_default_seccomp()),
                           (pod(), None)):
            st = await ctl.run_sandbox(data)
            assert rig.rt.requests[-1].seccomp == want
            await ctl.remove_sandbox(st.id)


async def test_a_log_directory_that_cannot_be_made_unwinds(rig: Rig, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    async with rig.controller() as ctl:
        with pytest.raises(SandboxRunError, match="sandbox files"):
            await ctl.run_sandbox(pod(log_directory=str(tmp_path / "file" / "logs")))
        assert await ctl.list_sandboxes() == []
    rig.nothing_left()


async def test_selinux_and_apparmor_are_refused_where_enabled_and_ignored_where_not(
    rig: Rig, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from podfsm.drivers.hostfiles import HostFiles

    selinux = sc(selinux_options={"type": "spc_t"})
    apparmor = sc(apparmor={"profile_type": "RuntimeDefault"})
    async with rig.controller() as ctl:
        monkeypatch.setattr(HostFiles, "security_modules", lambda self: frozenset())
        for data in (selinux, apparmor):  # as containerd on a host without them
            st = await ctl.run_sandbox(data)
            await ctl.remove_sandbox(st.id)
        monkeypatch.setattr(HostFiles, "security_modules",
                            lambda self: frozenset({"selinux", "apparmor"}))
        for data, words in ((selinux, "selinux_options: SELinux is enabled"),
                            (apparmor, "apparmor: AppArmor is enabled")):
            with pytest.raises(InvalidPodConfig, match=words):
                await ctl.run_sandbox(data)
        st = await ctl.run_sandbox(sc(apparmor={"profile_type": "Unconfined"}))
        await ctl.remove_sandbox(st.id)
    rig.nothing_left()


def test_process_ids_stop_where_kubernetes_and_runc_stop() -> None:
    # runc refuses a uid or gid over 2^31-1 ("uids and gids must be in range 0-2147483647",
    # a 500 at create before); Kubernetes validates the same range
    top = (1 << 31) - 1
    ok = parse_pod_config(sc(run_as_user={"value": top}, run_as_group={"value": top},
                             supplemental_groups=[top]))
    assert ok.linux.security_context.supplemental_groups == [top]
    for fields in ({"run_as_user": {"value": top + 1}},
                   {"run_as_user": {"value": 0}, "run_as_group": {"value": top + 1}},
                   {"supplemental_groups": [top + 1]}):
        with pytest.raises(InvalidPodConfig, match="less than or equal to 2147483647"):
            parse_pod_config(sc(**fields))
