"""protobuf messages of CRI v1 (cri_api.v1.api_pb2) to and from podfsm's models.

The pod config goes through its protobuf-JSON form into parse_pod_config, so the CRI and the
JSON files of `crictl runp` / `podfsm runp` meet one validation and one set of messages.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection
from datetime import datetime
from typing import Any

from cri_api.v1 import api_pb2 as pb
from google.protobuf.json_format import MessageToDict

from podfsm.core.images import ImageRecord
from podfsm.core.records import (
    FilesystemUsage,
    InterfaceStats,
    LifecycleEvent,
    SandboxStats,
    SandboxStatus,
)
from podfsm.core.spec import IDMapping, NamespaceMode, PodSandboxConfig, parse_pod_config
from podfsm.core.states import State

#: SandboxStatus -> CRI state: only Ready is READY; every other state is NOTREADY
NOT_READY_STATES: frozenset[State] = frozenset(State) - {State.READY}

EVENT_TYPES = {
    "created": pb.CONTAINER_CREATED_EVENT,
    "started": pb.CONTAINER_STARTED_EVENT,
    "stopped": pb.CONTAINER_STOPPED_EVENT,
    "deleted": pb.CONTAINER_DELETED_EVENT,
}


def pod_config(msg: pb.PodSandboxConfig) -> PodSandboxConfig:
    """The podfsm pod config of a CRI PodSandboxConfig; InvalidPodConfig as for JSON files."""
    data: dict[str, Any] = MessageToDict(msg, preserving_proto_field_name=True)
    data.setdefault("metadata", {})
    # protobuf JSON leaves out zero values; an id mapping's fields have no default in the
    # model (a JSON file must spell them out), so the zeros the message holds are put back.
    userns = (data.get("linux", {}).get("security_context", {})
              .get("namespace_options", {}).get("userns_options", {}))
    for m in (*userns.get("uids", ()), *userns.get("gids", ())):
        for key in ("host_id", "container_id", "length"):
            m.setdefault(key, 0)
    return parse_pod_config(data)


def ns(t: datetime | None) -> int:
    """Nanoseconds since the epoch, as the CRI counts time."""
    return int(t.timestamp() * 1_000_000_000) if t is not None else 0


def state(st: State) -> pb.PodSandboxState.ValueType:
    return pb.SANDBOX_READY if st is State.READY else pb.SANDBOX_NOTREADY


def states(value: pb.PodSandboxStateValue) -> Collection[State]:
    """The podfsm states a CRI state filter selects."""
    return {State.READY} if value.state == pb.SANDBOX_READY else NOT_READY_STATES


def metadata(st: SandboxStatus) -> pb.PodSandboxMetadata:
    return pb.PodSandboxMetadata(name=st.name, uid=st.uid, namespace=st.namespace,
                                 attempt=st.attempt)


def pod_sandbox(st: SandboxStatus) -> pb.PodSandbox:
    return pb.PodSandbox(id=st.id, metadata=metadata(st), state=state(st.state),
                         created_at=ns(st.created_at), labels=st.labels,
                         annotations=st.annotations, runtime_handler=st.runtime)


def _mode(mode: NamespaceMode) -> pb.NamespaceMode.ValueType:
    return pb.NamespaceMode.Value(mode.name)


def _idmaps(maps: list[IDMapping]) -> list[pb.IDMapping]:
    return [pb.IDMapping(host_id=m.host_id, container_id=m.container_id, length=m.length)
            for m in maps]


def sandbox_status(st: SandboxStatus, config: PodSandboxConfig) -> pb.PodSandboxStatus:
    """The CRI status; the namespace options are the pod's, with the user namespace's ACTUAL
    mappings (allocated ones included)."""
    opts = config.linux.security_context.namespace_options
    userns = pb.UserNamespace(mode=pb.POD, uids=_idmaps(st.uid_mappings),
                              gids=_idmaps(st.gid_mappings)) if config.pod_userns \
        else pb.UserNamespace(mode=pb.NODE)
    return pb.PodSandboxStatus(
        id=st.id, metadata=metadata(st), state=state(st.state), created_at=ns(st.created_at),
        network=pb.PodSandboxNetworkStatus(
            ip=st.ip, additional_ips=[pb.PodIP(ip=ip) for ip in st.additional_ips]),
        linux=pb.LinuxPodSandboxStatus(namespaces=pb.Namespace(options=pb.NamespaceOption(
            network=_mode(opts.network), pid=_mode(opts.pid), ipc=_mode(opts.ipc),
            target_id=opts.target_id, userns_options=userns))),
        labels=st.labels, annotations=st.annotations, runtime_handler=st.runtime,
    )


def _u64(v: int) -> pb.UInt64Value:
    return pb.UInt64Value(value=max(0, v))


def _iface(i: InterfaceStats) -> pb.NetworkInterfaceUsage:
    return pb.NetworkInterfaceUsage(
        name=i.name, rx_bytes=_u64(i.rx_bytes), rx_errors=_u64(i.rx_errors),
        tx_bytes=_u64(i.tx_bytes), tx_errors=_u64(i.tx_errors))


def sandbox_stats(st: SandboxStatus, stats: SandboxStats) -> pb.PodSandboxStats:
    linux = pb.LinuxPodSandboxStats()
    cg = stats.cgroup
    if cg is not None:
        linux.cpu.CopyFrom(pb.CpuUsage(timestamp=cg.timestamp_ns,
                                       usage_core_nano_seconds=_u64(cg.cpu_usage_ns)))
        linux.memory.CopyFrom(pb.MemoryUsage(
            timestamp=cg.timestamp_ns, working_set_bytes=_u64(cg.memory_working_set_bytes),
            usage_bytes=_u64(cg.memory_usage_bytes), rss_bytes=_u64(cg.memory_rss_bytes),
            page_faults=_u64(cg.page_faults), major_page_faults=_u64(cg.major_page_faults)))
    if stats.interfaces:
        default = next((i for i in stats.interfaces if i.name == stats.default_interface),
                       stats.interfaces[0])
        linux.network.CopyFrom(pb.NetworkUsage(
            timestamp=stats.timestamp_ns, default_interface=_iface(default),
            interfaces=[_iface(i) for i in stats.interfaces if i is not default]))
    return pb.PodSandboxStats(
        attributes=pb.PodSandboxAttributes(id=st.id, metadata=metadata(st), labels=st.labels,
                                           annotations=st.annotations),
        linux=linux)


def filesystem_usage(fs: FilesystemUsage) -> pb.FilesystemUsage:
    return pb.FilesystemUsage(timestamp=fs.timestamp_ns,
                              fs_id=pb.FilesystemIdentifier(mountpoint=fs.mountpoint),
                              used_bytes=_u64(fs.used_bytes), inodes_used=_u64(fs.inodes_used))


def image(img: ImageRecord) -> pb.Image:
    """A CRI Image: uid set only for a numeric config User, username only for a name."""
    out = pb.Image(id=img.id, repo_tags=list(img.repo_tags), repo_digests=list(img.repo_digests),
                   size=img.size, username=img.username,
                   spec=pb.ImageSpec(image=img.id), pinned=img.pinned)
    if img.uid is not None:
        out.uid.value = img.uid
    return out


def container_event(ev: LifecycleEvent, config: PodSandboxConfig) -> pb.ContainerEventResponse:
    return pb.ContainerEventResponse(
        container_id=ev.container_id or ev.status.id, container_event_type=EVENT_TYPES[ev.kind],
        created_at=ns(ev.at), pod_sandbox_status=sandbox_status(ev.status, config))


def pod_cidrs(text: str) -> list[str]:
    """The comma-separated pod CIDRs of UpdateRuntimeConfig, each as the network it names
    ("10.244.1.0/24"); [] for an empty string. ValueError naming the one that is not a CIDR
    (containerd parses them the same way, host bits allowed)."""
    out = []
    for part in (p.strip() for p in text.split(",")) if text.strip() else ():
        try:
            if "/" not in part:
                raise ValueError("no prefix length")
            out.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError as exc:
            raise ValueError(f"pod_cidr {part!r} is not a CIDR: {exc}") from None
    return out
