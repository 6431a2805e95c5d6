"""Records: what podfsm knows about each sandbox, persisted, and what it reports.

Frozen pydantic models with no I/O. A SandboxRecord is written to the store before and after
every step that touches the system (see `pending`), so a restart knows what may be half done.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from podfsm.core.spec import IDMapping, LinuxContainerResources, PodSandboxConfig
from podfsm.core.states import State

SCHEMA_VERSION = 1


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PinnedNamespaces(_Frozen):
    """What the namespace layer created and pinned. Paths are None when not created."""

    netns_path: str | None = None
    userns_path: str | None = None
    netns_inode: int | None = None
    userns_inode: int | None = None
    #: inode of the user namespace that owns the netns (NS_GET_USERNS on the pinned netns)
    netns_owner_inode: int | None = None


class SandboxFiles(_Frozen):
    """The sandbox's files on the host, as containerd keeps them under the sandbox's directory,
    reported so that containers joining the pod can mount the same ones."""

    hostname_path: str
    hosts_path: str
    resolv_conf_path: str
    #: the per-pod tmpfs, or the host's /dev/shm for ipc NODE (then never unmounted)
    shm_path: str
    shm_mounted: bool = False
    log_directory: str = ""
    #: the topmost directory of log_directory that podfsm created for this sandbox ("" if
    #: none), symlinks resolved
    log_directory_created: str = ""
    #: log_directory as it was found or made, symlinks resolved
    log_directory_real: str = ""
    #: every directory podfsm made for log_directory, symlinks resolved, top first: those this
    #: sandbox made, and those another sandbox made that it uses too; at remove each goes
    #: when it is empty and no other sandbox uses it (records of older podfsm versions have
    #: only log_directory_created: their chain is log_directory up to it)
    log_directories_made: list[str] = Field(default_factory=list)


class NetworkInterface(_Frozen):
    name: str
    mac: str = ""
    sandbox: str = ""


class NetworkResult(_Frozen):
    """What CNI ADD returned, kept so status and teardown never depend on re-running it."""

    network_name: str
    ifname: str = "eth0"
    ip: str = ""
    additional_ips: list[str] = Field(default_factory=list)
    interfaces: list[NetworkInterface] = Field(default_factory=list)
    raw: dict[str, Any] = Field(default_factory=dict)


class TaskInfo(_Frozen):
    """The pause task. `start_time` (clock ticks since boot, /proc/<pid>/stat field 22) tells
    the same process from a reused pid."""

    pid: int
    start_time: int


class HistoryEntry(_Frozen):
    source: str
    dest: str
    trigger: str
    at: datetime
    error: str | None = None


class TransitionEvent(_Frozen):
    """One move of one sandbox's state machine, as streamed by Controller.events(); or of one
    of its containers' machines, then with `container_id` set."""

    seq: int = 0
    sandbox_id: str
    source: str
    dest: str
    trigger: str
    at: datetime
    error: str | None = None
    container_id: str | None = None


class SandboxRecord(_Frozen):
    """Everything persisted about one sandbox."""

    schema_version: int = SCHEMA_VERSION
    id: str
    config: PodSandboxConfig
    state: State = State.UNKNOWN
    created_at: datetime
    #: what was under way when the record was written, if anything: the trigger name of the
    #: forward step about to touch the system (a restart turns that run NotReady), or "stop" /
    #: "remove" (a restart finishes them)
    pending: str | None = None
    runtime: str
    uid_mapping: IDMapping | None = None
    gid_mapping: IDMapping | None = None
    #: True when the id range was allocated by podfsm (and must be freed on remove)
    allocated_ids: bool = False
    planned_netns_path: str | None = None
    planned_userns_path: str | None = None
    namespaces: PinnedNamespaces | None = None
    network: NetworkResult | None = None
    files: SandboxFiles | None = None
    #: the loaded Localhost seccomp profile (read at admission), as an OCI linux.seccomp object
    seccomp_profile: dict[str, Any] | None = None
    container_created: bool = False
    bundle_path: str | None = None
    task: TaskInfo | None = None
    exit_status: int | None = None
    finished_at: datetime | None = None
    last_error: str | None = None
    #: what a failed unwinding could not remove
    leftovers: list[str] = Field(default_factory=list)
    history: list[HistoryEntry] = Field(default_factory=list)

    def evolve(self, **changes: Any) -> SandboxRecord:
        """A copy with `changes` applied. Not re-validated: the orchestrator is the only
        caller and passes typed values (mypy checks them); a full dump and validate per step
        cost more CPU than everything else the controller does."""
        unknown = changes.keys() - _RECORD_FIELDS
        if unknown:
            raise TypeError(f"SandboxRecord has no field(s) {sorted(unknown)}")
        # What model_copy(update=changes) makes, without its generic steps (copies of the
        # extra and private parts, which a SandboxRecord has none of): a third of the CPU, and
        # a lifecycle evolves its record 16 times.
        new = SandboxRecord.__new__(SandboxRecord)
        fields = self.__dict__.copy()
        fields.update(changes)
        _set(new, "__dict__", fields)
        _set(new, "__pydantic_fields_set__", self.__pydantic_fields_set__ | changes.keys())
        _set(new, "__pydantic_extra__", None)
        _set(new, "__pydantic_private__", None)
        return new


_RECORD_FIELDS = frozenset(SandboxRecord.model_fields)
_set = object.__setattr__  # how pydantic itself fills a frozen model's slots


class SandboxStatus(_Frozen):
    """What status, list and the faces report about a sandbox."""

    id: str
    name: str
    namespace: str
    uid: str
    attempt: int
    state: State
    created_at: datetime
    runtime: str
    pid: int | None
    netns_path: str | None
    userns_path: str | None
    ip: str
    additional_ips: list[str]
    uid_mappings: list[IDMapping]
    gid_mappings: list[IDMapping]
    exit_status: int | None
    finished_at: datetime | None
    labels: dict[str, str]
    annotations: dict[str, str]
    files: SandboxFiles | None = None
    #: linux.resources and linux.overhead as asked for
    resources: LinuxContainerResources | None = None
    overhead: LinuxContainerResources | None = None
    last_error: str | None
    leftovers: list[str]
    history: list[HistoryEntry]

    @classmethod
    def from_record(cls, rec: SandboxRecord) -> SandboxStatus:
        ns = rec.namespaces
        md = rec.config.metadata
        return cls(
            id=rec.id,
            name=md.name,
            namespace=md.namespace,
            uid=md.uid,
            attempt=md.attempt,
            state=rec.state,
            created_at=rec.created_at,
            runtime=rec.runtime,
            pid=rec.task.pid if rec.task else None,
            netns_path=(ns.netns_path if ns else None) or rec.planned_netns_path,
            userns_path=(ns.userns_path if ns else None) or rec.planned_userns_path,
            ip=rec.network.ip if rec.network else "",
            additional_ips=list(rec.network.additional_ips) if rec.network else [],
            uid_mappings=[rec.uid_mapping] if rec.uid_mapping else [],
            gid_mappings=[rec.gid_mapping] if rec.gid_mapping else [],
            exit_status=rec.exit_status,
            finished_at=rec.finished_at,
            labels=dict(rec.config.labels),
            annotations=dict(rec.config.annotations),
            files=rec.files,
            resources=rec.config.linux.resources,
            overhead=rec.config.linux.overhead,
            last_error=rec.last_error,
            leftovers=list(rec.leftovers),
            history=list(rec.history),
        )


class CgroupStats(_Frozen):
    """CPU and memory counters of a sandbox's cgroup, read at `timestamp_ns` (ns since epoch).
    working set = usage less inactive file pages, as the kubelet counts it."""

    cgroup: str
    timestamp_ns: int
    cpu_usage_ns: int
    memory_usage_bytes: int
    memory_working_set_bytes: int
    memory_rss_bytes: int
    page_faults: int
    major_page_faults: int


class InterfaceStats(_Frozen):
    """Counters of one interface in the pod's network namespace."""

    name: str
    rx_bytes: int
    rx_errors: int
    tx_bytes: int
    tx_errors: int


class SandboxStats(_Frozen):
    """What Controller.sandbox_stats reports: the cgroup's counters (None when the pause task
    is not running) and the pod's interfaces (`default_interface` is the CNI one, eth0)."""

    id: str
    timestamp_ns: int
    cgroup: CgroupStats | None
    default_interface: str
    interfaces: list[InterfaceStats]


class FilesystemUsage(_Frozen):
    """Usage of a filesystem holding podfsm's state or run directory."""

    mountpoint: str
    timestamp_ns: int
    used_bytes: int
    inodes_used: int


class LifecycleEvent(_Frozen):
    """A sandbox lifecycle event, as the CRI's GetContainerEvents carries it for sandboxes:
    `kind` created, started, stopped or deleted, with the sandbox's status at that moment."""

    kind: str
    at: datetime
    status: SandboxStatus
    config: PodSandboxConfig
    #: set for an event of one of the sandbox's containers (then `kind` is the container's)
    container_id: str | None = None
