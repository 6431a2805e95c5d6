"""The OCI runtime spec (config.json) of a container, from its image's config and its CRI
ContainerConfig, as containerd 2.x builds it (internal/cri/server/container_create_linux.go,
internal/cri/opts/spec_linux_opts.go, pkg/oci/spec_opts.go). Pure: every fact about the system
(the rootfs, the sandbox's pause pid and files, resolved host paths, the user's ids) comes in
a ContainerSpecInput.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from podfsm.core import secctx
from podfsm.core.containerspec import ContainerConfig, MountPropagation
from podfsm.core.ocispec import (
    DEFAULT_PATH,
    OCI_VERSION,
    cgroups_path,
    passthrough_annotations,
)
from podfsm.core.records import SandboxFiles
from podfsm.core.secctx import ProcessUser, SeccompChoice
from podfsm.core.spec import IDMapping, NamespaceMode, SupplementalGroupsPolicy

TTY_GID = 5
_PROPAGATION = {
    MountPropagation.PROPAGATION_PRIVATE: "rprivate",
    MountPropagation.PROPAGATION_HOST_TO_CONTAINER: "rslave",
    MountPropagation.PROPAGATION_BIDIRECTIONAL: "rshared",
}


@dataclass(frozen=True)
class HostDevice:
    """A host device node as stat(2) shows it."""

    kind: str  # "c" or "b"
    major: int
    minor: int
    mode: int
    uid: int
    gid: int


@dataclass(frozen=True)
class ContainerSpecInput:
    container_id: str
    sandbox_id: str
    config: ContainerConfig
    #: the image config's `config` object (Env, Entrypoint, Cmd, WorkingDir, User, ...)
    image_config: Mapping[str, Any]
    image_name: str
    rootfs: str
    pause_pid: int
    netns_path: str | None
    pod_pid_mode: NamespaceMode
    pod_ipc_mode: NamespaceMode
    pod_hostname: str
    pod_name: str
    pod_namespace: str
    pod_uid: str
    files: SandboxFiles | None
    cgroup_parent: str
    user: ProcessUser
    #: CRI mounts' host paths with symlinks resolved (container_path -> real host path)
    host_paths: Mapping[str, str] = field(default_factory=dict)
    #: a Localhost seccomp profile's text, read from the file seccomp_choice named
    seccomp_localhost: str | bytes | None = None
    #: the host's machine (uname -m) and kernel (major, minor): RuntimeDefault depends on them
    machine: str = "x86_64"
    kernel: tuple[int, int] = (6, 0)
    #: the capabilities this host's podfsm holds (what `ALL` and privileged give)
    held_caps: tuple[str, ...] = secctx.ALL_CAPS
    #: a privileged container's host devices (every node under /dev), by container path
    host_devices: Mapping[str, HostDevice] = field(default_factory=dict)
    #: the pod's pinned user namespace (userns mode POD) and its mappings: the container
    #: joins it; None: the host's
    userns_path: str | None = None
    uid_mapping: IDMapping | None = None
    gid_mapping: IDMapping | None = None
    annotation_patterns: tuple[str, ...] = ()
    #: the config's devices, by container path, as found on the host
    devices: Mapping[str, HostDevice] = field(default_factory=dict)


def process_args(config: ContainerConfig, image: Mapping[str, Any]) -> list[str]:
    """The command line as containerd (after moby) forms it; ValueError when there is none."""
    command, args = list(config.command), list(config.args)
    if not command:
        if not args:
            args = list(image.get("Cmd") or [])
        entry = list(image.get("Entrypoint") or [])
        if entry != [""]:
            command = entry
    argv = command + args
    if not argv:
        raise ValueError("no command specified: neither the container config nor the image "
                         "gives one")
    return argv


def environment(config: ContainerConfig, image: Mapping[str, Any], hostname: str) -> list[str]:
    """HOSTNAME, then the image's Env, then the config's envs, each key once (later wins)."""
    env: dict[str, str] = {}
    for item in [f"HOSTNAME={hostname}", *(image.get("Env") or [])]:
        key, _, value = str(item).partition("=")
        env[key] = value
    for kv in config.envs:
        env[kv.key] = kv.value
    if "PATH" not in env:
        env["PATH"] = DEFAULT_PATH.partition("=")[2]
    return [f"{k}={v}" for k, v in env.items()]


def capabilities(config: ContainerConfig, held: Sequence[str] = secctx.ALL_CAPS) -> list[str]:
    """The container's capabilities as containerd gives them (podfsm.core.secctx); `ALL` and
    privileged give `held`, the capabilities podfsm itself holds."""
    sc = config.linux.security_context
    caps = sc.capabilities
    return secctx.capabilities(caps.add_capabilities if caps else (),
                               caps.drop_capabilities if caps else (),
                               privileged=sc.privileged, all_caps=held)


def stop_signal(config: ContainerConfig, image: Mapping[str, Any]) -> str:
    """The signal that stops the container: the config's, the image's StopSignal, SIGTERM."""
    sig = config.stop_signal if config.stop_signal not in ("", "RUNTIMEDEFAULT") else ""
    return sig or str(image.get("StopSignal") or "") or "SIGTERM"


def signal_number(name: str) -> int:
    """The number of a signal given as SIGTERM, TERM or 15; ValueError if unknown."""
    text = name.strip().upper()
    if text.isdigit():
        return int(text)
    if not text.startswith("SIG"):
        text = "SIG" + text
    try:
        return int(signal.Signals[text])
    except KeyError:
        raise ValueError(f"unknown stop signal {name!r}") from None


def _bind(source: str, dest: str, options: Sequence[str]) -> dict[str, Any]:
    return {"destination": dest, "type": "bind", "source": source, "options": list(options)}


def _mounts(inp: ContainerSpecInput) -> list[dict[str, Any]]:
    cfg = inp.config
    sc = cfg.linux.security_context
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620",
                     *(["gid=5"] if _maps_tty_gid(inp) else [])]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "rw" if sc.privileged else "ro"]},
    ]
    user_paths = {m.container_path.rstrip("/") or "/" for m in cfg.mounts}
    f = inp.files
    if f is not None:
        ro = "ro" if sc.readonly_rootfs else "rw"
        for src, dest in ((f.hostname_path, "/etc/hostname"), (f.hosts_path, "/etc/hosts"),
                          (f.resolv_conf_path, "/etc/resolv.conf")):
            if dest not in user_paths:
                mounts.append(_bind(src, dest, ["rbind", "rprivate", ro]))
        if "/dev/shm" not in user_paths:
            mounts.append(_bind(f.shm_path, "/dev/shm", ["rbind", "rprivate", "rw"]))
    # the CRI mounts, shallowest first (containerd sorts them so a parent never hides a child)
    for m in sorted(cfg.mounts, key=lambda m: m.container_path.rstrip("/").count("/")):
        src = inp.host_paths.get(m.container_path, m.host_path)
        opts = ["rbind", _PROPAGATION[m.propagation], "ro" if m.readonly else "rw"]
        mounts.append(_bind(src, m.container_path, opts))
    return mounts


def _maps_tty_gid(inp: ContainerSpecInput) -> bool:
    """Whether gid 5 (tty) exists where the container lives: devpts refuses a gid its user
    namespace does not map (as for the pause, ocispec)."""
    m = inp.gid_mapping
    return inp.userns_path is None or (m is not None and m.container_id <= TTY_GID
                                       < m.container_id + m.length)


def _namespaces(inp: ContainerSpecInput) -> list[dict[str, str]]:
    ns_opts = inp.config.linux.security_context.namespace_options
    pause = f"/proc/{inp.pause_pid}/ns"
    out: list[dict[str, str]] = [{"type": "mount"}]
    if inp.netns_path is not None:
        out.append({"type": "network", "path": inp.netns_path})
        out.append({"type": "uts", "path": f"{pause}/uts"})
    if ns_opts.pid is NamespaceMode.CONTAINER:
        out.append({"type": "pid"})
    elif ns_opts.pid is NamespaceMode.POD and inp.pod_pid_mode is not NamespaceMode.NODE:
        out.append({"type": "pid", "path": f"{pause}/pid"})
    if inp.pod_ipc_mode is not NamespaceMode.NODE:
        out.append({"type": "ipc", "path": f"{pause}/ipc"})
    if inp.userns_path is not None:
        out.append({"type": "user", "path": inp.userns_path})
    return out


def _resources(inp: ContainerSpecInput) -> dict[str, Any]:
    res = inp.config.linux.resources
    if inp.config.linux.security_context.privileged:  # every device, as containerd
        out: dict[str, Any] = {"devices": [{"allow": True, "access": "rwm"}]}
    else:
        out = {"devices": [{"allow": False, "access": "rwm"}]}
    for d in inp.config.devices:
        dev = inp.devices[d.container_path]
        out["devices"].append({"allow": True, "type": dev.kind, "major": dev.major,
                               "minor": dev.minor, "access": d.permissions or "rwm"})
    if res is None:
        return out
    cpu: dict[str, Any] = {}
    if res.cpu_shares:
        cpu["shares"] = res.cpu_shares
    if res.cpu_quota:
        cpu["quota"] = res.cpu_quota
    if res.cpu_period:
        cpu["period"] = res.cpu_period
    if res.cpuset_cpus:
        cpu["cpus"] = res.cpuset_cpus
    if res.cpuset_mems:
        cpu["mems"] = res.cpuset_mems
    if cpu:
        out["cpu"] = cpu
    if res.memory_limit_in_bytes:
        mem: dict[str, Any] = {"limit": res.memory_limit_in_bytes}
        if res.memory_swap_limit_in_bytes:
            mem["swap"] = res.memory_swap_limit_in_bytes
        out["memory"] = mem
    if res.hugepage_limits:
        out["hugepageLimits"] = [{"pageSize": h.page_size, "limit": h.limit}
                                 for h in res.hugepage_limits]
    if res.unified:
        out["unified"] = dict(res.unified)
    return out


def seccomp_choice(config: ContainerConfig) -> SeccompChoice:
    """Which seccomp profile the config asks for (the field, else the legacy path string):
    SecurityContextError (a ValueError) naming a bad one."""
    sc = config.linux.security_context
    return secctx.seccomp_choice(sc.seccomp, sc.seccomp_profile_path, privileged=sc.privileged)


def seccomp(inp: ContainerSpecInput, caps: Sequence[str]) -> dict[str, Any] | None:
    """The linux.seccomp object: none unless asked (containerd's default), RuntimeDefault
    containerd's profile for the container's capabilities on this machine, Localhost the
    profile read by the caller (checked)."""
    return secctx.seccomp_spec(seccomp_choice(inp.config), bounding=caps,
                               localhost_text=inp.seccomp_localhost, machine=inp.machine,
                               kernel=inp.kernel)


def container_spec(inp: ContainerSpecInput) -> dict[str, Any]:
    """config.json of the container. ValueError naming what cannot be honoured."""
    cfg = inp.config
    sc = cfg.linux.security_context
    img = inp.image_config
    caps = capabilities(cfg, inp.held_caps)
    user: dict[str, Any] = {"uid": inp.user.uid, "gid": inp.user.gid}
    if inp.user.additional_gids:
        user["additionalGids"] = list(inp.user.additional_gids)
    process: dict[str, Any] = {
        "terminal": cfg.tty,
        "user": user,
        "args": process_args(cfg, img),
        "env": environment(cfg, img, inp.pod_hostname),
        "cwd": cfg.working_dir or str(img.get("WorkingDir") or "") or "/",
        "capabilities": secctx.oci_capabilities(caps),
        "noNewPrivileges": sc.no_new_privs,
    }
    res = cfg.linux.resources
    if res is not None and res.oom_score_adj:
        process["oomScoreAdj"] = res.oom_score_adj
    propagations = {m.propagation for m in cfg.mounts}
    masked, readonly = secctx.proc_paths(sc.masked_paths, sc.readonly_paths,
                                         privileged=sc.privileged, defaults_when_empty=True)
    linux: dict[str, Any] = {
        "namespaces": _namespaces(inp),
        "cgroupsPath": cgroups_path(inp.container_id, inp.cgroup_parent),
        "resources": _resources(inp),
        "maskedPaths": masked,
        "readonlyPaths": readonly,
    }
    # a bidirectional mount needs a shared rootfs to propagate back, a host-to-container one
    # a slave rootfs (containerd's WithMounts)
    if MountPropagation.PROPAGATION_BIDIRECTIONAL in propagations:
        linux["rootfsPropagation"] = "rshared"
    elif MountPropagation.PROPAGATION_HOST_TO_CONTAINER in propagations:
        linux["rootfsPropagation"] = "rslave"
    devices = {**(inp.host_devices if sc.privileged else {}),
               **{d.container_path: inp.devices[d.container_path] for d in cfg.devices}}
    if devices:
        linux["devices"] = [
            {"path": path, "type": dev.kind, "major": dev.major, "minor": dev.minor,
             "fileMode": dev.mode & 0o777, "uid": dev.uid, "gid": dev.gid}
            for path, dev in devices.items()]
    if inp.userns_path is not None:
        # runc refuses to join a user namespace by path without them; crun ignores them
        for key, m in (("uidMappings", inp.uid_mapping), ("gidMappings", inp.gid_mapping)):
            if m is None:
                raise ValueError(f"the pod's user namespace {inp.userns_path} has no "
                                 f"{key} recorded")
            linux[key] = [{"containerID": m.container_id, "hostID": m.host_id,
                           "size": m.length}]
    filt = seccomp(inp, caps)
    if filt is not None:
        linux["seccomp"] = filt
    annotations = {
        **passthrough_annotations(cfg.annotations, inp.annotation_patterns),
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.container-name": cfg.metadata.name,
        "io.kubernetes.cri.sandbox-id": inp.sandbox_id,
        "io.kubernetes.cri.sandbox-name": inp.pod_name,
        "io.kubernetes.cri.sandbox-namespace": inp.pod_namespace,
        "io.kubernetes.cri.sandbox-uid": inp.pod_uid,
        "io.kubernetes.cri.image-name": inp.image_name,
    }
    return {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": inp.rootfs, "readonly": sc.readonly_rootfs},
        "mounts": _mounts(inp),
        "linux": linux,
        "annotations": dict(sorted(annotations.items())),
    }


# -- users -------------------------------------------------------------------------------------


def resolve_user(config: ContainerConfig, image: Mapping[str, Any], passwd: str,
                 group: str) -> ProcessUser:
    """process.user for the config in an image whose /etc/passwd and /etc/group read
    `passwd` and `group`, as containerd resolves it (podfsm.core.secctx: the username over the
    uid, run_as_group, the image's User, supplemental groups Merge or Strict).
    SecurityContextError (a ValueError) names what the image does not list."""
    sc = config.linux.security_context
    userstr = secctx.user_string(
        sc.run_as_username, sc.run_as_user.value if sc.run_as_user else None,
        sc.run_as_group.value if sc.run_as_group else None, str(image.get("User") or ""))
    return secctx.resolve_user(userstr, passwd, group, supplemental=sc.supplemental_groups,
                               policy=SupplementalGroupsPolicy(sc.supplemental_groups_policy))
