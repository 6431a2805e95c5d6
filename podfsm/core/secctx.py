"""A container's security context, as containerd 2.x turns the CRI fields into OCI spec pieces:
capabilities (add and drop, `ALL`, privileged), the masked and read-only /proc and /sys paths,
the seccomp profile chosen by the CRI fields (new and legacy), and the process's user and
groups resolved from the image's /etc/passwd and /etc/group texts with the supplemental groups
policy. Pure: the caller reads the files and hands their text in.

Compared with containerd's source at 301026e (2026-08): internal/cri/server/container_create.go
(buildLinuxSpec), container_create_linux.go (containerSpecOpts), internal/cri/opts/
spec_opts.go (WithCapabilities, WithAdditionalGIDs, WithSupplementalGroups), internal/cri/util/
util.go (GenerateUserString), internal/cri/sputil (seccomp profile choice), pkg/oci/spec.go
(default capabilities, masked and read-only paths) and pkg/oci/spec_opts.go (WithUser,
WithUserID, WithUsername, WithAdditionalGIDs, WithPrivileged).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from podfsm.core.ocispec import seccomp_from_profile
from podfsm.core.runtimedefault import runtime_default_profile
from podfsm.core.spec import ProfileType, SecurityProfile, SupplementalGroupsPolicy

#: containerd's default capabilities (pkg/oci/spec.go defaultUnixCaps; Docker's set)
DEFAULT_CAPS: tuple[str, ...] = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
)
#: every capability of Linux 5.9 and later, in number order (what `ALL` and privileged give;
#: containerd takes the capabilities its own process holds, which for root are these)
ALL_CAPS: tuple[str, ...] = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)
#: containerd's (and kubelet's, for procMount Default) masked paths (pkg/oci/spec.go)
DEFAULT_MASKED_PATHS: tuple[str, ...] = (
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
    "/sys/devices/virtual/powercap", "/proc/scsi",
)
DEFAULT_READONLY_PATHS: tuple[str, ...] = (
    "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
)
#: runc's limit on ids, which containerd follows (pkg/oci WithUser)
MAX_ID = 2**31 - 1


class SecurityContextError(ValueError):
    """A security-context field podfsm refuses; the message names the field and why."""


# -- capabilities ------------------------------------------------------------------------------

def capability_name(name: str, known: Iterable[str] = ALL_CAPS) -> str:
    """`chown`, `CHOWN` or `CAP_CHOWN` as the OCI name `CAP_CHOWN`. The CRI sends names
    without the prefix; containerd adds it blindly, so `CAP_CHOWN` would become
    `CAP_CAP_CHOWN` and fail in the runtime: here both forms are taken. Unknown: refused."""
    upper = name.strip().upper()
    full = upper if upper.startswith("CAP_") else "CAP_" + upper
    if full not in set(known):
        raise SecurityContextError(f"unknown capability {name!r}")
    return full


def capabilities(add: Sequence[str] = (), drop: Sequence[str] = (), *,
                 privileged: bool = False, all_caps: Sequence[str] = ALL_CAPS) -> list[str]:
    """The container's capability set, in containerd's order of operations: the default set;
    `ALL` in `add` gives every capability, then `ALL` in `drop` none; then the named adds,
    then the named drops (so add ALL + drop CHOWN is all but CAP_CHOWN, drop ALL + add
    NET_ADMIN is just CAP_NET_ADMIN, and a cap both added and dropped is dropped). Privileged:
    every capability, whatever else is asked."""
    if privileged:
        return list(all_caps)
    caps = list(DEFAULT_CAPS)
    if any(c.upper() == "ALL" for c in add):
        caps = list(all_caps)
    if any(c.upper() == "ALL" for c in drop):
        caps = []
    for c in add:
        if c.upper() != "ALL" and (full := capability_name(c, all_caps)) not in caps:
            caps.append(full)
    dropped = {capability_name(c, all_caps) for c in drop if c.upper() != "ALL"}
    return [c for c in caps if c not in dropped]


def oci_capabilities(caps: Sequence[str]) -> dict[str, list[str]]:
    """process.capabilities for `caps`: bounding, effective and permitted; never inheritable
    (CVE-2022-24769) nor ambient (containerd's WithoutAmbientCaps)."""
    return {"bounding": list(caps), "effective": list(caps), "permitted": list(caps),
            "inheritable": [], "ambient": []}


# -- privileged, masked and read-only paths ---------------------------------------------------

def privileged_problem(privileged: bool, *, sandbox_privileged: bool,
                       pod_userns: bool) -> str | None:
    """Why a container may not be privileged here, or None. containerd refuses a privileged
    container in a sandbox that is not privileged; podfsm also refuses one in a pod with its
    own user namespace (its "all capabilities and devices" would be the namespace's, not the
    host's: a promise the kernel does not keep)."""
    if not privileged:
        return None
    if not sandbox_privileged:
        return "privileged: a privileged container needs a privileged sandbox"
    if pod_userns:
        return "privileged: refused in a pod with its own user namespace (userns mode POD)"
    return None


def proc_paths(masked: Sequence[str], readonly: Sequence[str], *, privileged: bool,
               defaults_when_empty: bool = False) -> tuple[list[str], list[str]]:
    """linux.maskedPaths and linux.readonlyPaths. containerd 2.x applies what kubelet sends
    (kubelet sends the defaults for procMount Default and nothing for Unmasked; containerd
    issue 5029), and none for a privileged container. `defaults_when_empty` gives the
    defaults to a client that sends nothing (crictl with a bare config), at the cost of
    procMount Unmasked, which is indistinguishable from nothing sent on the wire."""
    if privileged:
        return [], []
    m, r = list(masked), list(readonly)
    if defaults_when_empty:
        m = m or list(DEFAULT_MASKED_PATHS)
        r = r or list(DEFAULT_READONLY_PATHS)
    return m, r


# -- seccomp -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SeccompChoice:
    """Which seccomp profile a container gets: none, RuntimeDefault, or the file at `path`."""

    kind: Literal["unconfined", "runtime-default", "localhost"]
    path: str = ""


UNCONFINED = SeccompChoice("unconfined")
RUNTIME_DEFAULT = SeccompChoice("runtime-default")
_LOCALHOST_PREFIX = "localhost/"


def legacy_seccomp_profile(path: str) -> SecurityProfile | None:
    """The CRI's deprecated seccomp_profile_path as a SecurityProfile (containerd's
    sputil.GenerateSecurityProfile): `runtime/default` and `docker/default` RuntimeDefault,
    `unconfined` Unconfined, `localhost/<path>` Localhost, "" nothing asked."""
    if path == "":
        return None
    if path in ("runtime/default", "docker/default"):
        return SecurityProfile(profile_type=ProfileType.RuntimeDefault)
    if path == "unconfined":
        return SecurityProfile(profile_type=ProfileType.Unconfined)
    if not path.startswith(_LOCALHOST_PREFIX) or len(path) == len(_LOCALHOST_PREFIX):
        raise SecurityContextError(f"seccomp_profile_path: invalid profile {path!r} (one of "
                                   "runtime/default, docker/default, unconfined, "
                                   "localhost/<path>)")
    return SecurityProfile(profile_type=ProfileType.Localhost,
                           localhost_ref=path.removeprefix(_LOCALHOST_PREFIX))


def seccomp_choice(profile: SecurityProfile | None, legacy_path: str = "", *,
                   privileged: bool = False, unset_profile: str = "") -> SeccompChoice:
    """The profile the CRI fields ask for: `seccomp` when set, else the legacy path, else the
    operator's `unset_profile` (containerd's unset_seccomp_profile; "" leaves the container
    unconfined, containerd's default). A privileged container has none."""
    if privileged:
        return UNCONFINED
    if profile is None:
        profile = legacy_seccomp_profile(legacy_path or unset_profile)
    if profile is None or profile.profile_type is ProfileType.Unconfined:
        return UNCONFINED
    if profile.profile_type is ProfileType.RuntimeDefault:
        return RUNTIME_DEFAULT
    ref = profile.localhost_ref.removeprefix(_LOCALHOST_PREFIX)
    if not ref.startswith("/"):
        raise SecurityContextError(f"seccomp: a Localhost profile must be an absolute path, "
                                   f"not {ref!r}")
    return SeccompChoice("localhost", ref)


def seccomp_spec(choice: SeccompChoice, *, bounding: Sequence[str],
                 localhost_text: str | bytes | None = None, machine: str = "x86_64",
                 kernel: tuple[int, int] = (6, 0)) -> dict[str, Any] | None:
    """linux.seccomp for `choice`: None when unconfined; containerd's RuntimeDefault for the
    container's bounding capabilities; a Localhost profile's text (read by the caller from
    choice.path) checked as the pause's are (ocispec.seccomp_from_profile)."""
    if choice.kind == "unconfined":
        return None
    if choice.kind == "runtime-default":
        return runtime_default_profile(bounding, machine, kernel)
    if localhost_text is None:
        raise SecurityContextError(f"seccomp: the Localhost profile {choice.path} was not read")
    try:
        return seccomp_from_profile(localhost_text)
    except ValueError as exc:
        raise SecurityContextError(
            f"seccomp: the Localhost profile {choice.path} cannot be used: {exc}") from None


# -- users and groups --------------------------------------------------------------------------

@dataclass(frozen=True)
class PasswdEntry:
    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class GroupEntry:
    name: str
    gid: int
    members: tuple[str, ...]


def _rows(text: str, fields: int) -> Iterable[list[str]]:
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        row = line.split(":")
        if len(row) >= fields:
            yield row


def _id(text: str) -> int | None:
    return int(text) if text.isdigit() and int(text) <= MAX_ID else None


def parse_passwd(text: str) -> list[PasswdEntry]:
    """/etc/passwd's entries, in file order; a line without a numeric uid and gid is skipped
    (it could match nothing a runtime can switch to)."""
    out = []
    for row in _rows(text, 4):
        uid, gid = _id(row[2]), _id(row[3])
        if uid is not None and gid is not None:
            out.append(PasswdEntry(row[0], uid, gid))
    return out


def parse_group(text: str) -> list[GroupEntry]:
    """/etc/group's entries, in file order; a line without a numeric gid is skipped."""
    out = []
    for row in _rows(text, 3):
        gid = _id(row[2])
        if gid is not None:
            members = tuple(m.strip() for m in row[3].split(",") if m.strip()) \
                if len(row) > 3 else ()
            out.append(GroupEntry(row[0], gid, members))
    return out


@dataclass(frozen=True)
class ProcessUser:
    """process.user: uid, gid and additionalGids (sorted, the gid among them, as containerd)."""

    uid: int
    gid: int
    additional_gids: tuple[int, ...]


def user_string(run_as_username: str = "", run_as_user: int | None = None,
                run_as_group: int | None = None, image_user: str = "") -> str:
    """Which user to resolve, as containerd forms it (GenerateUserString, then the image's
    User): the username wins over the uid; run_as_group is appended; without either, the
    image's User as it is; "" when nothing is set (uid 0)."""
    user = run_as_username or ("" if run_as_user is None else str(run_as_user))
    if not user:
        if run_as_group is not None:
            raise SecurityContextError(f"run_as_group {run_as_group} is set without a user")
        return image_user
    return user if run_as_group is None else f"{user}:{run_as_group}"


def _parse_id(text: str, what: str, userstr: str) -> int | None:
    """A number of the user string, or None for a name. containerd: out of runc's range is an
    error."""
    if not text.lstrip("-").isdigit():
        return None
    value = int(text)
    if value < 0 or value > MAX_ID:
        raise SecurityContextError(f"invalid USER value {userstr!r}: {what} out of range")
    return value


def _primary(userstr: str, users: list[PasswdEntry], groups: list[GroupEntry]) -> tuple[int, int]:
    """uid and gid of `userstr` (containerd's oci.WithUser)."""
    parts = userstr.split(":")
    if len(parts) > 2:
        raise SecurityContextError(f"invalid USER value {userstr!r}")
    uid = _parse_id(parts[0], "uid", userstr)
    if len(parts) == 1:
        if uid is not None:  # a uid need not be listed: its gid is then 0
            entry = next((u for u in users if u.uid == uid), None)
            return uid, entry.gid if entry else 0
        entry = next((u for u in users if u.name == parts[0]), None)
        if entry is None:
            raise SecurityContextError(f"user {parts[0]!r} is not in the image's /etc/passwd")
        return entry.uid, entry.gid
    gid = _parse_id(parts[1], "gid", userstr)
    if uid is None:
        entry = next((u for u in users if u.name == parts[0]), None)
        if entry is None:
            raise SecurityContextError(f"user {parts[0]!r} is not in the image's /etc/passwd")
        uid = entry.uid
    if gid is None:
        grp = next((g for g in groups if g.name == parts[1]), None)
        if grp is None:
            raise SecurityContextError(f"group {parts[1]!r} is not in the image's /etc/group")
        gid = grp.gid
    return uid, gid


def _member_gids(user: str, users: list[PasswdEntry], groups: list[GroupEntry]) -> list[int]:
    """The groups of /etc/group that list `user` (a name, or a uid looked up in /etc/passwd)
    as a member, except a group named like the user (containerd's oci.WithAdditionalGIDs)."""
    uid = _parse_id(user, "uid", user)
    if uid is not None:
        entry = next((u for u in users if u.uid == uid), None)
        if entry is None:
            return []
        user = entry.name
    return [g.gid for g in groups if g.name != user and user in g.members]


def resolve_user(userstr: str, passwd: str, group: str, *, supplemental: Sequence[int] = (),
                 policy: SupplementalGroupsPolicy = SupplementalGroupsPolicy.Merge
                 ) -> ProcessUser:
    """process.user for `userstr` (see user_string; "" is uid 0) in an image whose
    /etc/passwd and /etc/group read `passwd` and `group` ("" when the file is missing).

    Merge (the default): the gid, the groups of /etc/group that list the user, and
    `supplemental` (the CRI's supplemental_groups). Strict: the gid and `supplemental` only,
    nothing from the image. Either way sorted and without repeats, as containerd merges them.
    SecurityContextError names a user or group the image does not list, or an id out of range.
    """
    users, groups = parse_passwd(passwd), parse_group(group)
    uid, gid = _primary(userstr or "0", users, groups)
    extra: set[int] = {gid}
    for g in supplemental:
        if g < 0 or g > MAX_ID:
            raise SecurityContextError(f"supplemental_groups: gid {g} out of range")
        extra.add(g)
    if policy is SupplementalGroupsPolicy.Merge:
        extra.update(_member_gids((userstr or "0").split(":")[0], users, groups))
    return ProcessUser(uid, gid, tuple(sorted(extra)))
