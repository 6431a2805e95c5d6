"""The value types the controller hands to its drivers (and the store hands back).

They are plain frozen data, built by the controller from a sandbox's record and consumed by the
drivers (podfsm.drivers) and by pure generators such as :mod:`podfsm.core.ocispec`, so they
live in the core, below both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from podfsm.core.records import SandboxFiles
from podfsm.core.spec import IDMapping, LinuxContainerResources, PortMapping


@dataclass(frozen=True)
class NamespaceRequest:
    """What to create for one sandbox.

    userns_path None: the pod stays in the host user namespace (mode NODE).
    netns_path None: the pod uses the host network namespace (network NODE).
    With both set, the netns is created INSIDE the new user namespace (owned by it).
    """

    sandbox_id: str
    netns_path: str | None
    userns_path: str | None
    uid_mapping: IDMapping | None = None
    gid_mapping: IDMapping | None = None


@dataclass(frozen=True)
class NetworkRequest:
    sandbox_id: str  # used as CNI_CONTAINERID
    netns_path: str | None  # None or missing: DEL still releases the address
    pod_name: str = ""
    pod_namespace: str = ""
    pod_uid: str = ""
    ifname: str = "eth0"
    port_mappings: tuple[PortMapping, ...] = ()


@dataclass(frozen=True)
class InterfaceInfo:
    """An interface as read back from inside the pod's netns."""

    name: str
    mac: str
    addresses: tuple[str, ...] = field(default_factory=tuple)  # "10.x.y.z/24"
    up: bool = False
    rx_bytes: int = 0
    rx_errors: int = 0
    tx_bytes: int = 0
    tx_errors: int = 0


@dataclass(frozen=True)
class PauseRequest:
    """Everything needed to generate the pause container's config.json (see core.ocispec)."""

    container_id: str
    hostname: str
    netns_path: str | None
    userns_path: str | None
    uid_mapping: IDMapping | None
    gid_mapping: IDMapping | None
    cgroup_parent: str = ""
    #: the pod's annotations; only those matching `annotation_patterns` reach the spec
    annotations: dict[str, str] = field(default_factory=dict)
    annotation_patterns: tuple[str, ...] = ()
    sysctls: dict[str, str] = field(default_factory=dict)
    #: the pause process's uid, gid (None: 0) and supplementary groups
    run_as_user: int | None = None
    run_as_group: int | None = None
    supplemental_groups: tuple[int, ...] = ()
    #: the OCI linux.seccomp object, or None for no filter
    seccomp: dict[str, Any] | None = None
    host_pid: bool = False
    host_ipc: bool = False
    #: the sandbox's files on the host (see SandboxFiles), bound read-only into the pause
    files: SandboxFiles | None = None
    #: linux.resources of the pod, handed to the runtime as containerd does (annotations)
    resources: LinuxContainerResources | None = None


@dataclass(frozen=True)
class SetAside:
    """A record the store could not read, moved out of the way so the others still load."""

    sandbox_id: str
    problem: str  # what was wrong and where the record went, as logged
