"""ControllerConfig: every path and knob, with the defaults of design.md."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from podfsm.core.paths import normalised_problem

DEFAULT_CNI_BIN_DIRS = ("/opt/cni/bin", "/usr/lib/cni")
# Pod user namespaces are handed 65536-id ranges from here; 0-65535 always stays with the host.
DEFAULT_IDMAP_POOL_START = 1 << 20
DEFAULT_IDMAP_POOL_SIZE = 1 << 30
DEFAULT_IDMAP_MAX_LENGTH = 65536


class ControllerConfig(BaseModel):
    """Where a controller keeps its state and which runtime and network it uses.

    Every path can be set, so several controllers (and the tests) can run side by side without
    touching each other or the defaults.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", regex_engine="python-re")

    state_dir: str = "/var/lib/podfsm"
    run_dir: str = "/run/podfsm"
    netns_dir: str = "/run/netns"
    runtime: Literal["runc", "crun"] = "runc"
    runtime_binary: str | None = None  # default: found on PATH
    pause_binary: str = "/usr/bin/catatonit"
    cni_conf_dir: str = "/etc/cni/net.d"
    cni_bin_dirs: tuple[str, ...] = DEFAULT_CNI_BIN_DIRS
    #: used when cni_conf_dir holds no network: a shipped bridge network with these names
    default_network_name: str = "podfsm"
    default_bridge: str = "podfsm0"
    default_subnet: str = "10.209.0.0/16"
    idmap_pool_start: int = Field(default=DEFAULT_IDMAP_POOL_START, ge=65536)
    idmap_pool_size: int = Field(default=DEFAULT_IDMAP_POOL_SIZE, ge=65536)
    #: the longest id range a pod may ask for: one pod's share (KEP-127), so that a request
    #: cannot drain the pool for every other pod
    idmap_max_length: int = Field(default=DEFAULT_IDMAP_MAX_LENGTH, ge=1)
    #: the cgroup under which every pause container's cgroup lives; a pod's
    #: linux.cgroup_parent must lie under it (anything else is refused)
    cgroup_root: str = Field(default="/podfsm", pattern=r"^(/[A-Za-z0-9_.:@+-]+)+\Z")
    #: glob patterns (Go's path.Match / fnmatch, as containerd's `pod_annotations`) of the pod
    #: annotations that are copied into the pause container's OCI spec; the default lets none
    #: through, since runtimes act on some (crun's run.oci.*)
    pod_annotations: tuple[str, ...] = ()
    #: namespace worker subprocesses
    workers: int = Field(default=2, ge=1, le=64)
    #: seconds a namespace worker may sit idle before it exits (~14 MB each); the next
    #: sandbox that needs it starts it again (~50 ms, once). None: workers live as long as
    #: the controller.
    worker_idle_exit: float | None = Field(default=120.0, gt=0)
    #: sandboxes doing system work at once
    max_parallel: int = Field(default=16, ge=1)
    #: seconds an unwinding may take before it gives up (and reports what is left)
    unwind_timeout: float = Field(default=30.0, gt=0)
    #: seconds to wait for the pause task to exit after SIGTERM before SIGKILL; 0 (the default,
    #: as containerd does for the pause container) sends SIGKILL at once
    stop_grace: float = Field(default=0.0, ge=0)
    #: seconds a CNI plugin or an OCI runtime command may run; then its whole process group is
    #: killed and the step fails naming the timeout
    command_timeout: float = Field(default=60.0, gt=0)
    #: where images live (blobs, records, unpacked layers; see docs/images.md); None:
    #: <state_dir>/images
    image_dir: str | None = None
    #: containerd-style registry hosts configuration: <dir>/<host>/hosts.toml (mirrors, TLS,
    #: headers), `_default/hosts.toml` for every other host
    registry_config_dir: str = "/etc/podfsm/certs.d"
    #: the platform pulled from a multi-platform image, "os/arch[/variant]"; None: the host's
    image_platform: str | None = Field(default=None, pattern=r"^[a-z0-9]+/[a-z0-9]+(/[a-z0-9]+)?\Z")
    #: seconds a registry may take to answer (connect, or between two reads)
    registry_timeout: float = Field(default=60.0, gt=0)

    @property
    def images_dir(self) -> str:
        """image_dir, or its default under state_dir."""
        return self.image_dir or os.path.join(self.state_dir, "images")

    @model_validator(mode="after")
    def _absolute(self) -> ControllerConfig:
        for name in ("state_dir", "run_dir", "netns_dir", "cni_conf_dir", "pause_binary",
                     "registry_config_dir", "image_dir"):
            value = getattr(self, name)
            if value is None:
                continue
            if not os.path.isabs(value):
                raise ValueError(f"{name} must be an absolute path, got {value!r}")
        # the pod's cgroup_parent is compared with it as a string (see core.paths)
        problem = normalised_problem(self.cgroup_root)
        if problem is not None:
            raise ValueError(f"cgroup_root {self.cgroup_root!r} {problem}")
        return self
