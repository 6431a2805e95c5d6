"""podfsm.core.secctx and podfsm.core.runtimedefault against containerd 2.x's behaviour
(containerd 301026e: internal/cri/server/container_create_linux_test.go TestContainerCapabilities,
container_create.go buildLinuxSpec, internal/cri/opts/spec_opts.go, internal/cri/util/util.go
GenerateUserString, internal/cri/sputil, pkg/oci/spec.go and spec_opts.go WithUser/WithUserID/
WithUsername/WithAdditionalGIDs, contrib/seccomp/seccomp_default.go)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from podfsm.core import secctx
from podfsm.core.runtimedefault import ALLOWED, runtime_default_profile
from podfsm.core.secctx import (
    ALL_CAPS,
    DEFAULT_CAPS,
    RUNTIME_DEFAULT,
    UNCONFINED,
    SeccompChoice,
    SecurityContextError,
)
from podfsm.core.spec import ProfileType, SecurityProfile, SupplementalGroupsPolicy

STRICT = SupplementalGroupsPolicy.Strict

# -- capabilities: containerd's TestContainerCapabilities cases, plus what they imply ---------


def test_the_default_set_is_containerds() -> None:
    assert secctx.capabilities() == list(DEFAULT_CAPS)
    assert len(DEFAULT_CAPS) == 14 and "CAP_SYS_ADMIN" not in DEFAULT_CAPS
    assert len(ALL_CAPS) == 41 and len(set(ALL_CAPS)) == 41


def test_add_and_drop_by_cri_names() -> None:
    caps = secctx.capabilities(["SYS_ADMIN"], ["CHOWN"])
    assert "CAP_SYS_ADMIN" in caps and "CAP_CHOWN" not in caps
    assert set(caps) == (set(DEFAULT_CAPS) | {"CAP_SYS_ADMIN"}) - {"CAP_CHOWN"}


def test_add_all_gives_every_capability() -> None:
    assert secctx.capabilities(["ALL"]) == list(ALL_CAPS)


def test_drop_all_gives_none() -> None:
    assert secctx.capabilities([], ["ALL"]) == []


def test_add_all_then_drop_one() -> None:
    assert secctx.capabilities(["ALL"], ["CHOWN"]) == [c for c in ALL_CAPS if c != "CAP_CHOWN"]


def test_drop_all_then_add_one() -> None:
    assert secctx.capabilities(["SYS_ADMIN"], ["ALL"]) == ["CAP_SYS_ADMIN"]


def test_add_all_and_drop_all_is_none_and_a_cap_both_added_and_dropped_is_dropped() -> None:
    assert secctx.capabilities(["ALL"], ["ALL"]) == []
    assert "CAP_NET_ADMIN" not in secctx.capabilities(["NET_ADMIN"], ["NET_ADMIN"])


def test_names_in_any_case_and_with_the_prefix_and_unknown_ones_refused() -> None:
    assert secctx.capabilities(["net_admin", "CAP_SYS_TIME"], ["cap_kill"]) == [
        c for c in DEFAULT_CAPS if c != "CAP_KILL"] + ["CAP_NET_ADMIN", "CAP_SYS_TIME"]
    with pytest.raises(SecurityContextError, match="unknown capability 'FLY'"):
        secctx.capabilities(["FLY"])


def test_privileged_has_every_capability_whatever_is_dropped() -> None:
    assert secctx.capabilities([], ["ALL"], privileged=True) == list(ALL_CAPS)


def test_oci_capabilities_never_inheritable_nor_ambient() -> None:
    sets = secctx.oci_capabilities(["CAP_KILL"])
    assert sets == {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"],
                    "permitted": ["CAP_KILL"], "inheritable": [], "ambient": []}


# -- privileged, masked and readonly paths (buildLinuxSpec, oci.WithPrivileged) ---------------


def test_privileged_needs_a_privileged_sandbox_and_no_pod_user_namespace() -> None:
    assert secctx.privileged_problem(False, sandbox_privileged=False, pod_userns=True) is None
    assert secctx.privileged_problem(True, sandbox_privileged=True, pod_userns=False) is None
    assert "privileged sandbox" in str(
        secctx.privileged_problem(True, sandbox_privileged=False, pod_userns=False))
    assert "own user namespace" in str(
        secctx.privileged_problem(True, sandbox_privileged=True, pod_userns=True))


def test_masked_and_readonly_paths_are_what_kubelet_sends() -> None:
    kubelet = (list(secctx.DEFAULT_MASKED_PATHS), list(secctx.DEFAULT_READONLY_PATHS))
    assert secctx.proc_paths(*kubelet, privileged=False) == kubelet
    assert secctx.proc_paths(["/proc/x"], [], privileged=False) == (["/proc/x"], [])
    # procMount Unmasked: kubelet sends nothing, containerd 2.x masks nothing
    assert secctx.proc_paths([], [], privileged=False) == ([], [])
    assert secctx.proc_paths([], [], privileged=False, defaults_when_empty=True) == kubelet
    assert secctx.proc_paths(*kubelet, privileged=True) == ([], [])
    assert "/sys/devices/virtual/powercap" in secctx.DEFAULT_MASKED_PATHS


# -- seccomp choice (sputil.GenerateSeccompSecurityProfile / GenerateSeccompSpecOpts) ---------


@pytest.mark.parametrize(("legacy", "want"), [
    ("", UNCONFINED),
    ("unconfined", UNCONFINED),
    ("runtime/default", RUNTIME_DEFAULT),
    ("docker/default", RUNTIME_DEFAULT),
    ("localhost//etc/p.json", SeccompChoice("localhost", "/etc/p.json")),
])
def test_the_legacy_strings(legacy: str, want: SeccompChoice) -> None:
    assert secctx.seccomp_choice(None, legacy) == want


def test_a_bad_legacy_string_is_refused_by_name() -> None:
    for bad in ("localhost/", "default", "runtime/defaults"):
        with pytest.raises(SecurityContextError, match="invalid profile"):
            secctx.seccomp_choice(None, bad)


def test_the_new_field_wins_over_the_legacy_string() -> None:
    unconfined = SecurityProfile(profile_type=ProfileType.Unconfined)
    assert secctx.seccomp_choice(unconfined, "runtime/default") == UNCONFINED
    default = SecurityProfile(profile_type=ProfileType.RuntimeDefault)
    assert secctx.seccomp_choice(default, "unconfined") == RUNTIME_DEFAULT
    local = SecurityProfile(profile_type=ProfileType.Localhost, localhost_ref="/p.json")
    assert secctx.seccomp_choice(local) == SeccompChoice("localhost", "/p.json")
    relative = SecurityProfile(profile_type=ProfileType.Localhost, localhost_ref="p.json")
    with pytest.raises(SecurityContextError, match="absolute path"):
        secctx.seccomp_choice(relative)


def test_privileged_has_no_seccomp_and_the_unset_profile_applies_to_nothing_asked() -> None:
    default = SecurityProfile(profile_type=ProfileType.RuntimeDefault)
    assert secctx.seccomp_choice(default, privileged=True) == UNCONFINED
    assert secctx.seccomp_choice(None, "", unset_profile="runtime/default") == RUNTIME_DEFAULT
    assert secctx.seccomp_choice(None, "unconfined",
                                 unset_profile="runtime/default") == UNCONFINED


def names_of(profile: dict[str, Any], action: str = "SCMP_ACT_ALLOW") -> set[str]:
    return {n for r in profile["syscalls"] if r["action"] == action and "args" not in r
            for n in r["names"]}


def test_runtime_default_is_containerds_profile_for_the_default_capabilities() -> None:
    spec = secctx.seccomp_spec(RUNTIME_DEFAULT, bounding=DEFAULT_CAPS)
    assert spec is not None and spec["defaultAction"] == "SCMP_ACT_ERRNO"
    assert spec["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    allowed = names_of(spec)
    assert len(ALLOWED) == 363 and set(ALLOWED) <= allowed
    # default caps: chroot (CAP_SYS_CHROOT) yes; mount, unshare, ptrace-free kcmp, bpf no
    assert {"chroot", "arch_prctl", "ptrace", "process_vm_readv"} <= allowed
    assert not {"mount", "unshare", "setns", "bpf", "kcmp", "reboot", "open_by_handle_at",
                "socket", "clone", "clone3", "personality"} & allowed
    # clone only without namespace flags, clone3 ENOSYS so libcs fall back to clone
    clone = next(r for r in spec["syscalls"] if r["names"] == ["clone"])
    assert clone["args"] == [{"index": 0, "value": 0x7E020000, "op": "SCMP_CMP_MASKED_EQ",
                              "valueTwo": 0}]
    assert {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38} in spec["syscalls"]
    # socket for every family but AF_ALG (38) and AF_VSOCK (40)
    sockets = [r["args"][0] for r in spec["syscalls"] if r["names"] == ["socket"]]
    assert [(a["op"], a["value"]) for a in sockets] == [
        ("SCMP_CMP_LT", 38), ("SCMP_CMP_EQ", 39), ("SCMP_CMP_GT", 40)]
    json.dumps(spec)  # what goes into config.json


def test_runtime_default_follows_the_bounding_set_and_the_architecture() -> None:
    admin = secctx.seccomp_spec(RUNTIME_DEFAULT, bounding=[*DEFAULT_CAPS, "CAP_SYS_ADMIN"])
    assert admin is not None
    assert {"mount", "unshare", "setns", "clone", "clone3", "open_tree"} <= names_of(admin)
    assert not any(r["names"] == ["clone"] and "args" in r for r in admin["syscalls"])
    arm = runtime_default_profile(DEFAULT_CAPS, "aarch64")
    assert arm["architectures"] == ["SCMP_ARCH_ARM", "SCMP_ARCH_AARCH64"]
    assert "set_tls" in names_of(arm) and "arch_prctl" not in names_of(arm)
    old = runtime_default_profile(DEFAULT_CAPS, "x86_64", (4, 4))
    assert "ptrace" not in names_of(old)


def test_a_localhost_profile_is_checked_like_the_pauses() -> None:
    text = json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"}], "comment": "dropped"})
    choice = SeccompChoice("localhost", "/p.json")
    assert secctx.seccomp_spec(choice, bounding=[], localhost_text=text) == {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"}]}
    with pytest.raises(SecurityContextError, match=r"/p\.json cannot be used: it is not JSON"):
        secctx.seccomp_spec(choice, bounding=[], localhost_text="{")
    with pytest.raises(SecurityContextError, match="was not read"):
        secctx.seccomp_spec(choice, bounding=[])
    assert secctx.seccomp_spec(UNCONFINED, bounding=[]) is None


# -- users and groups (GenerateUserString, oci.WithUser, WithAdditionalGIDs) ------------------

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
# a comment
daemon:x:1:1::/:/bin/false
www-data:x:33:33:www-data:/var/www:/bin/false
user:x:1000:1000::/home/user:/bin/sh
broken:x:notanumber:1::/:/bin/sh
"""
GROUP = """\
root:x:0:
wheel:x:10:root,user
www-data:x:33:
user:x:1000:user
predefined:x:50000:user
audio:x:29:www-data,user
"""


def resolve(userstr: str, **kw: Any) -> tuple[int, int, tuple[int, ...]]:
    u = secctx.resolve_user(userstr, PASSWD, GROUP, **kw)
    return u.uid, u.gid, u.additional_gids


def test_the_user_string_as_containerd_forms_it() -> None:
    assert secctx.user_string() == ""
    assert secctx.user_string(run_as_user=1000) == "1000"
    assert secctx.user_string("www-data", 1000) == "www-data"      # the name wins
    assert secctx.user_string(run_as_user=1000, run_as_group=50) == "1000:50"
    assert secctx.user_string(image_user="www-data:1004") == "www-data:1004"
    assert secctx.user_string(run_as_user=0, image_user="user") == "0"
    with pytest.raises(SecurityContextError, match="without a user"):
        secctx.user_string(run_as_group=5, image_user="user")


def test_nothing_set_is_root_with_roots_groups() -> None:
    assert resolve("") == (0, 0, (0, 10))


def test_a_listed_uid_takes_its_gid_and_an_unlisted_one_gid_0() -> None:
    assert resolve("1000") == (1000, 1000, (10, 29, 1000, 50000))
    assert resolve("1234") == (1234, 0, (0,))


def test_a_name_must_be_listed() -> None:
    assert resolve("www-data") == (33, 33, (29, 33))
    with pytest.raises(SecurityContextError, match="'nobody' is not in the image's /etc/passwd"):
        resolve("nobody")


def test_user_and_group_parts() -> None:
    assert resolve("1003:1004") == (1003, 1004, (1004,))            # numbers need no lookup
    assert resolve("www-data:1004") == (33, 1004, (29, 1004))
    # the group "user" (1000) lists user but is named like it: not an extra group
    assert resolve("1000:predefined") == (1000, 50000, (10, 29, 50000))
    with pytest.raises(SecurityContextError, match="group 'nogroup' is not"):
        resolve("1000:nogroup")
    with pytest.raises(SecurityContextError, match="uid out of range"):
        resolve("4294967296")
    with pytest.raises(SecurityContextError, match="invalid USER value"):
        resolve("a:b:c")


def test_merge_adds_the_images_groups_and_the_supplemental_ones_sorted() -> None:
    # critest's test-image-predefined-group: uid 1000 in group 50000 by /etc/group
    assert resolve("1000", supplemental=[5, 50000]) == (1000, 1000, (5, 10, 29, 1000, 50000))


def test_strict_ignores_the_images_groups() -> None:
    assert resolve("1000", supplemental=[5], policy=STRICT) == (1000, 1000, (5, 1000))
    assert resolve("1000:50", policy=STRICT) == (1000, 50, (50,))


def test_a_group_named_like_the_user_is_not_an_extra_group_and_missing_files_are_empty() -> None:
    # "user" lists itself in its own group "user": containerd skips it (the gid is there anyway)
    u = secctx.resolve_user("user", PASSWD, "user:x:2000:user\n")
    assert (u.uid, u.gid, u.additional_gids) == (1000, 1000, (1000,))
    u = secctx.resolve_user("1000", "", "")
    assert (u.uid, u.gid, u.additional_gids) == (1000, 0, (0,))
    with pytest.raises(SecurityContextError, match="gid -1 out of range"):
        secctx.resolve_user("0", "", "", supplemental=[-1])


def test_parsing_skips_comments_blank_and_malformed_lines() -> None:
    assert [u.name for u in secctx.parse_passwd(PASSWD)] == ["root", "daemon", "www-data",
                                                             "user"]
    assert secctx.parse_group("a:x:1\nb:x:x:\n\nc:x:3:p, q\n") == [
        secctx.GroupEntry("a", 1, ()), secctx.GroupEntry("c", 3, ("p", "q"))]
