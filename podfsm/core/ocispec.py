"""The pause container's OCI runtime spec (config.json), generated without side effects.

The pod's user and network namespaces are created and pinned before the pause container exists
(containerd PR #10607's order), so the spec only JOINS them by path; pid, ipc, uts and mount
namespaces are always new. Everything here is a pure function of the request, so the spec can be
tested exhaustively and two calls with the same request give the same document.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from podfsm.core.requests import PauseRequest
from podfsm.core.spec import DNSConfig, IDMapping, LinuxContainerResources

OCI_VERSION = "1.0.2"
DEFAULT_CGROUP_PARENT = "/podfsm"
DEFAULT_PAUSE_ARGS: tuple[str, ...] = ("/catatonit", "-P")
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: runc's `runc spec` defaults, plus containerd's powercap mask (energy counters leak secrets).
MASKED_PATHS: tuple[str, ...] = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
READONLY_PATHS: tuple[str, ...] = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)

#: What RuntimeDefault means for the pause: deny by default (EPERM), allow what runc's and
#: crun's last steps before execve, the dynamic-loader-free start of a static binary and
#: catatonit's wait-for-signals-and-reap loop need. A process that only waits needs no more.
PAUSE_SYSCALLS: tuple[str, ...] = (
    "arch_prctl", "brk", "capget", "capset", "chdir", "clock_gettime", "clock_nanosleep", "close",
    "close_range", "dup", "dup2", "dup3", "epoll_create1", "epoll_ctl", "epoll_pwait",
    "epoll_wait", "execve", "execveat", "exit", "exit_group", "fchdir", "fcntl", "fstat",
    "fstatfs", "futex", "getcwd", "getdents64", "getegid", "geteuid", "getgid", "getpgrp",
    "getpid", "getppid", "getrandom", "getrlimit", "gettid", "getuid", "ioctl", "kill", "lseek",
    "madvise", "mmap", "mprotect", "munmap", "nanosleep", "newfstatat", "open", "openat", "pause",
    "pipe2", "poll", "ppoll", "prctl", "pread64", "prlimit64", "read", "readlink", "readlinkat",
    "restart_syscall", "rseq", "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigsuspend",
    "rt_sigtimedwait", "sched_getaffinity", "sched_yield", "set_robust_list", "set_tid_address",
    "setsid", "sigaltstack", "signalfd4", "stat", "statfs", "statx", "tgkill", "tkill", "uname",
    "wait4", "waitid", "write", "writev",
)
#: The architectures a RuntimeDefault filter lists (the native one and its 32-bit sibling).
SECCOMP_ARCHES: tuple[str, ...] = ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32")
_SECCOMP_KEYS = {"defaultAction", "defaultErrnoRet", "architectures", "flags", "syscalls"}
_SECCOMP_ACTIONS = {"SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD",
                    "SCMP_ACT_TRAP", "SCMP_ACT_ERRNO", "SCMP_ACT_TRACE", "SCMP_ACT_ALLOW",
                    "SCMP_ACT_LOG"}
#: annotations through which containerd hands linux.resources of a sandbox to the runtime
RESOURCE_ANNOTATIONS = {
    "cpu_period": "io.kubernetes.cri.sandbox-cpu-period",
    "cpu_quota": "io.kubernetes.cri.sandbox-cpu-quota",
    "cpu_shares": "io.kubernetes.cri.sandbox-cpu-shares",
    "memory_limit_in_bytes": "io.kubernetes.cri.sandbox-memory",
}
# containerd also gives the pause cpu shares 2 (WithDefaultSandboxShares), weighed against
# the pod's containers in the pod's cgroup. Here every pause's siblings are other pods'
# pauses, so equal shares change nothing but how long a pause waits to exec under contention
# beside other controllers' pods: podfsm leaves the default.


def runtime_default_seccomp() -> dict[str, Any]:
    """The OCI linux.seccomp object of RuntimeDefault for the pause container."""
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,
        "architectures": list(SECCOMP_ARCHES),
        "syscalls": [{"names": list(PAUSE_SYSCALLS), "action": "SCMP_ACT_ALLOW"}],
    }


def seccomp_from_profile(text: str | bytes) -> dict[str, Any]:
    """A Localhost seccomp profile (the OCI linux.seccomp object, which is also what simple
    Docker-format profiles are) checked and reduced to the keys the runtime needs.

    Raises ValueError saying what is wrong in words, never quoting the file (it may be any
    file of the daemon's host the client cannot read itself): not JSON, not an object, an
    unknown default action, or a notification listener (listenerPath would make the runtime
    send the filter's fd to any socket the profile names).
    """
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ValueError("it is not JSON in UTF-8") from None
    if not isinstance(obj, dict):
        raise ValueError("it is not a JSON object")
    if "listenerPath" in obj or "listenerMetadata" in obj:
        raise ValueError("listenerPath is refused (it would hand the filter's notification fd "
                         "to a socket)")
    if obj.get("defaultAction") not in _SECCOMP_ACTIONS:
        raise ValueError("its defaultAction is missing or not one of "
                         f"{', '.join(sorted(_SECCOMP_ACTIONS))}")
    syscalls = obj.get("syscalls", [])
    if not isinstance(syscalls, list) or not all(
        isinstance(s, dict) and isinstance(s.get("names"), list)
        and s.get("action") in _SECCOMP_ACTIONS for s in syscalls
    ):
        raise ValueError("its syscalls must be a list of {names: [...], action: SCMP_ACT_...}")
    return {k: v for k, v in obj.items() if k in _SECCOMP_KEYS}


def passthrough_annotations(annotations: Mapping[str, str],
                            patterns: Iterable[str]) -> dict[str, str]:
    """The pod annotations allowed into the OCI spec: those whose key matches one of the
    operator's glob `patterns` (containerd's `pod_annotations`). No patterns: none."""
    pats = tuple(patterns)
    return {k: v for k, v in annotations.items()
            if any(fnmatch.fnmatchcase(k, p) for p in pats)}


def resource_annotations(res: LinuxContainerResources | None) -> dict[str, str]:
    """linux.resources as containerd hands them to the runtime for a sandbox."""
    if res is None:
        return {}
    return {key: str(getattr(res, name)) for name, key in RESOURCE_ANNOTATIONS.items()}


#: The tty group that devpts hands new ptys to (runc's default spec); it must be mapped in the
#: pod's user namespace or the devpts mount fails with EINVAL.
_TTY_GID = 5


def cgroup_parent_path(cgroup_parent: str, default: str = DEFAULT_CGROUP_PARENT) -> str:
    """The cgroup parent of a pod's containers: the pod's, else `default`; absolute, without
    trailing slashes, and otherwise verbatim (a cgroup's name may end in a space, or in any
    character the kernel takes: as containerd, podfsm neither strips nor changes it).

    The one spelling of it: what the runtime is given (cgroups_path) and what the teardown
    removes are the same directories. (A parent stripped of its trailing whitespace for the
    runtime but not for the teardown left `/podfsm/<name>` in every hierarchy: issue 17.)
    A relative parent would be resolved against the runtime's own cgroup, which differs between
    callers, so the parent is made absolute.
    """
    parent = cgroup_parent.rstrip("/") or default.rstrip("/") or DEFAULT_CGROUP_PARENT
    return parent if parent.startswith("/") else "/" + parent


def cgroups_path(container_id: str, cgroup_parent: str = "") -> str:
    """The cgroupfs-driver path of the pause container: `<parent or /podfsm>/<container_id>`
    (the parent as cgroup_parent_path spells it)."""
    return f"{cgroup_parent_path(cgroup_parent)}/{container_id}"


def sysfs_mount(req: PauseRequest) -> dict[str, Any]:
    """How /sys is provided.

    Mounting sysfs needs CAP_SYS_ADMIN in the user namespace that owns the network namespace
    (Linux 3.12, "sysfs: Restrict mounting sysfs"). A pod with its own user namespace but the
    host's network namespace cannot mount it, so it gets the host's /sys bound read-only, as
    containerd and CRI-O do. In every other case a fresh read-only sysfs shows only the pod's
    own interfaces. `rro` makes the bind's submounts, such as the host's cgroup hierarchies,
    read-only too (plain `ro` covers only the top mount); runc 1.1 and crun 1.8 honour it.
    """
    if req.userns_path is not None and req.netns_path is None:
        return {
            "destination": "/sys",
            "type": "bind",
            "source": "/sys",
            "options": ["rbind", "ro", "rro", "nosuid", "nodev", "noexec"],
        }
    return {
        "destination": "/sys",
        "type": "sysfs",
        "source": "sysfs",
        "options": ["nosuid", "noexec", "nodev", "ro"],
    }


def _covers(mapping: IDMapping | None, container_id: int) -> bool:
    if mapping is None:
        return False
    return mapping.container_id <= container_id < mapping.container_id + mapping.length


def _mounts(req: PauseRequest) -> list[dict[str, Any]]:
    devpts_options = ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]
    if req.userns_path is None or _covers(req.gid_mapping, _TTY_GID):
        devpts_options.append(f"gid={_TTY_GID}")
    return [
        {
            "destination": "/proc",
            "type": "proc",
            "source": "proc",
            "options": ["nosuid", "noexec", "nodev"],
        },
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": devpts_options,
        },
        *_ipc_mounts(req),
        sysfs_mount(req),
        *sandbox_file_mounts(req),
    ]


def _ipc_mounts(req: PauseRequest) -> list[dict[str, Any]]:
    if req.host_ipc:
        # The host's ipc namespace: its /dev/shm (containerd binds it); mqueue cannot be
        # mounted from inside another user namespace, and the host's is not the pod's to see.
        return [] if req.files is not None else [_bind(_HOST_SHM, "/dev/shm")]
    mounts: list[dict[str, Any]] = []
    if req.files is None:
        mounts.append({
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        })
    # The pause container has its own ipc namespace here, created inside the pod's user
    # namespace when there is one, so mqueue can be mounted there.
    mounts.append({
        "destination": "/dev/mqueue",
        "type": "mqueue",
        "source": "mqueue",
        "options": ["nosuid", "noexec", "nodev"],
    })
    return mounts


_HOST_SHM = "/dev/shm"


def _bind(source: str, destination: str, *, ro: bool = True) -> dict[str, Any]:
    return {
        "destination": destination,
        "type": "bind",
        "source": source,
        "options": ["rbind", "ro" if ro else "rw", "nosuid", "nodev", "noexec"],
    }


def sandbox_file_mounts(req: PauseRequest) -> list[dict[str, Any]]:
    """The sandbox's files bound into the pause, as containerd binds them: /dev/shm (the
    per-pod tmpfs, or the host's for ipc NODE) and /etc/resolv.conf, plus /etc/hostname and
    /etc/hosts, read-only."""
    f = req.files
    if f is None:
        return []
    return [
        _bind(f.shm_path, "/dev/shm"),
        _bind(f.hostname_path, "/etc/hostname"),
        _bind(f.hosts_path, "/etc/hosts"),
        _bind(f.resolv_conf_path, "/etc/resolv.conf"),
    ]


def _id_mappings(mapping: IDMapping) -> list[dict[str, int]]:
    return [
        {"containerID": mapping.container_id, "hostID": mapping.host_id, "size": mapping.length}
    ]


def _namespaces(req: PauseRequest) -> list[dict[str, str]]:
    namespaces: list[dict[str, str]] = [{"type": "mount"}]
    if not req.host_pid:
        namespaces.append({"type": "pid"})
    if not req.host_ipc:
        namespaces.append({"type": "ipc"})
    if req.netns_path is not None:
        # network NODE shares the host's UTS namespace too, as containerd does
        namespaces.append({"type": "uts"})
        namespaces.append({"type": "network", "path": req.netns_path})
    if req.userns_path is not None:
        namespaces.append({"type": "user", "path": req.userns_path})
    return namespaces


def pause_spec(
    req: PauseRequest,
    *,
    rootfs: str,
    pause_args: Sequence[str] = DEFAULT_PAUSE_ARGS,
    runtime: str = "runc",
) -> dict[str, Any]:
    """The OCI config.json of the pause container described by `req`.

    `rootfs` is the (shared, read-only) root filesystem holding the pause binary, `pause_args`
    its command line. `runtime` matters only for the id mappings: runc refuses to join a user
    namespace by path without `uidMappings`/`gidMappings` (it does not compare them with the
    namespace's), crun ignores them; they are written whenever they are known.

    Raises ValueError when a user namespace is joined without mappings and `runtime` is runc,
    or when `pause_args` is empty.
    """
    if not pause_args:
        raise ValueError("pause_args must not be empty")
    if req.userns_path is not None and runtime == "runc" and (
        req.uid_mapping is None or req.gid_mapping is None
    ):
        raise ValueError(
            "runc needs uid and gid mappings to join the user namespace at "
            f"{req.userns_path}"
        )
    # pause only sleeps and reaps: it needs no capability at all.
    no_caps: list[str] = []
    linux: dict[str, Any] = {
        "namespaces": _namespaces(req),
        "cgroupsPath": cgroups_path(req.container_id, req.cgroup_parent),
        # runc adds its default device allow-list (null, zero, tty, ...) on top of this.
        "resources": {"devices": [{"allow": False, "access": "rwm"}]},
        "maskedPaths": list(MASKED_PATHS),
        "readonlyPaths": list(READONLY_PATHS),
    }
    if req.userns_path is not None:
        if req.uid_mapping is not None:
            linux["uidMappings"] = _id_mappings(req.uid_mapping)
        if req.gid_mapping is not None:
            linux["gidMappings"] = _id_mappings(req.gid_mapping)
    if req.sysctls:
        linux["sysctl"] = dict(sorted(req.sysctls.items()))
    if req.seccomp is not None:
        linux["seccomp"] = req.seccomp
    user: dict[str, Any] = {"uid": req.run_as_user or 0, "gid": req.run_as_group or 0}
    if req.supplemental_groups:
        user["additionalGids"] = list(req.supplemental_groups)

    spec: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": user,
            "args": list(pause_args),
            "env": [DEFAULT_PATH],
            "cwd": "/",
            "capabilities": {
                "bounding": list(no_caps),
                "effective": list(no_caps),
                "inheritable": list(no_caps),
                "permitted": list(no_caps),
                "ambient": list(no_caps),
            },
            "noNewPrivileges": True,
        },
        "root": {"path": rootfs, "readonly": True},
        "mounts": _mounts(req),
        "linux": linux,
    }
    if req.hostname and req.netns_path is not None:
        spec["hostname"] = req.hostname
    annotations = {
        **passthrough_annotations(req.annotations, req.annotation_patterns),
        **resource_annotations(req.resources),
        "io.kubernetes.cri.container-type": "sandbox",
        "io.kubernetes.cri.sandbox-id": req.container_id,
    }
    spec["annotations"] = dict(sorted(annotations.items()))
    return spec


#: /etc/hosts of a pod with its own network: the localhost entries (the host's file names the
#: host's addresses, which are not the pod's)
LOCALHOST_HOSTS = (
    "127.0.0.1\tlocalhost\n"
    "::1\tlocalhost ip6-localhost ip6-loopback\n"
    "fe00::0\tip6-localnet\n"
    "ff00::0\tip6-mcastprefix\n"
    "ff02::1\tip6-allnodes\n"
    "ff02::2\tip6-allrouters\n"
)
#: the size of a pod's /dev/shm tmpfs (containerd's defaultShmSize)
SHM_SIZE = 64 << 20
SHM_OPTIONS = f"mode=1777,size={SHM_SIZE}"


def resolv_conf(dns: DNSConfig) -> str:
    """resolv.conf built from the pod's dns_config, as containerd's parseDNSOptions writes it
    (searches, then one nameserver line each, then options). The entries are validated by the
    model: no character of them can start another line."""
    text = ""
    if dns.searches:
        text += "search " + " ".join(dns.searches) + "\n"
    for server in dns.servers:
        text += f"nameserver {server}\n"
    if dns.options:
        text += "options " + " ".join(dns.options) + "\n"
    return text
