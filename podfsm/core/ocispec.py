"""The pause container's OCI runtime spec (config.json), generated without side effects.

The pod's user and network namespaces are created and pinned before the pause container exists
(containerd PR #10607's order), so the spec only JOINS them by path; pid, ipc, uts and mount
namespaces are always new. Everything here is a pure function of the request, so the spec can be
tested exhaustively and two calls with the same request give the same document.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from podfsm.core.spec import IDMapping
from podfsm.drivers.base import PauseRequest

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

#: The tty group that devpts hands new ptys to (runc's default spec); it must be mapped in the
#: pod's user namespace or the devpts mount fails with EINVAL.
_TTY_GID = 5


def cgroups_path(container_id: str, cgroup_parent: str = "") -> str:
    """The cgroupfs-driver path of the pause container: `<parent or /podfsm>/<container_id>`.

    A relative parent would be resolved against the runtime's own cgroup, which differs between
    callers, so the parent is made absolute.
    """
    parent = cgroup_parent.strip().rstrip("/") or DEFAULT_CGROUP_PARENT
    if not parent.startswith("/"):
        parent = "/" + parent
    return f"{parent}/{container_id}"


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
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        # The pause container always has its own ipc namespace, created inside the pod's user
        # namespace when there is one, so mqueue can be mounted there.
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        sysfs_mount(req),
    ]


def _id_mappings(mapping: IDMapping) -> list[dict[str, int]]:
    return [
        {"containerID": mapping.container_id, "hostID": mapping.host_id, "size": mapping.length}
    ]


def _namespaces(req: PauseRequest) -> list[dict[str, str]]:
    namespaces: list[dict[str, str]] = [
        {"type": "pid"},
        {"type": "ipc"},
        {"type": "uts"},
        {"type": "mount"},
    ]
    if req.netns_path is not None:
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

    spec: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
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
    if req.hostname:
        spec["hostname"] = req.hostname
    if req.annotations:
        spec["annotations"] = dict(sorted(req.annotations.items()))
    return spec
