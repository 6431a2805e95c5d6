"""The pod config: the CRI PodSandboxConfig as `crictl runp` reads it from JSON.

Keys may be snake_case or lowerCamelCase and enums may be names or numbers, as protobuf JSON
allows. Every refusal happens here, before anything is created on the system. This module holds
the models; the rules their fields share (patterns, limits, enums, sysctls, address rules, how an
error is told) are in :mod:`podfsm.core.specfields`, importable from here.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from podfsm.core import paths
from podfsm.core.errors import InvalidPodConfig

# isort: off
from podfsm.core.specfields import (  # moved there; importable from here as before
    UNSAFE as UNSAFE, _UNPRINTABLE as _UNPRINTABLE, _UNPRINTABLE_RE as _UNPRINTABLE_RE,
    TEXT as TEXT, CNI_ARG_TEXT as CNI_ARG_TEXT, _DNS_LABEL as _DNS_LABEL, HOSTNAME as HOSTNAME,
    _DOMAIN_LABEL as _DOMAIN_LABEL, DOMAIN as DOMAIN, RESOLV_OPTION as RESOLV_OPTION,
    NAME_MAX as NAME_MAX, _SEG as _SEG, PATH_SEGMENT as PATH_SEGMENT,
    CGROUP_PARENT as CGROUP_PARENT, LOG_DIRECTORY as LOG_DIRECTORY, CPUSET as CPUSET,
    _SYSCTL_NAME as _SYSCTL_NAME, ID_SPACE as ID_SPACE, MAX_ID as MAX_ID,
    MAP_BYTES_MAX as MAP_BYTES_MAX, _MAP_BYTES as _MAP_BYTES, Text as Text, LabelKey as LabelKey,
    NamespaceMode as NamespaceMode, Protocol as Protocol, ProfileType as ProfileType,
    SupplementalGroupsPolicy as SupplementalGroupsPolicy, _enum_parser as _enum_parser,
    Mode as Mode, Proto as Proto, Profile as Profile, GroupsPolicy as GroupsPolicy,
    _Model as _Model, _mode_enum as _mode_enum, _POD_MODE as _POD_MODE,
    _NODE_MODE as _NODE_MODE, _POD_USERNS as _POD_USERNS,
    _POD_MAPPING as _POD_MAPPING, _MAPPING as _MAPPING, _MAPPED as _MAPPED, _LSM as _LSM,
    IPC_SYSCTLS as IPC_SYSCTLS, _IPC_SYSCTL_TEXT as _IPC_SYSCTL_TEXT, SYSCTL_NAME as SYSCTL_NAME,
    _mode_is as _mode_is, LOG_DIRECTORY_MAX as LOG_DIRECTORY_MAX, _PATH_BYTES as _PATH_BYTES,
    _LOG_PLACES as _LOG_PLACES, is_ipc_sysctl as is_ipc_sysctl, _IP_ADDRESS as _IP_ADDRESS,
    _IP_FORMATS as _IP_FORMATS, _ip as _ip, HOST_IP_RULE as HOST_IP_RULE,
    _NOT_HOST_IP as _NOT_HOST_IP, _no_windows as _no_windows, _PLAIN as _PLAIN,
    SHOWN_PROBLEMS as SHOWN_PROBLEMS, SHOWN_VALUE as SHOWN_VALUE, _shown as _shown,
    describe_validation_error as describe_validation_error,
)
# isort: on


class IDMapping(_Model):
    """One id mapping: `length` ids from `container_id` inside map to `host_id` on the host."""

    host_id: int = Field(ge=0, lt=ID_SPACE)
    container_id: int = Field(ge=0, lt=ID_SPACE)
    length: int = Field(ge=0, le=ID_SPACE)

    def line(self) -> str:
        """The line for /proc/<pid>/uid_map (and as the kernel shows it back)."""
        return f"{self.container_id} {self.host_id} {self.length}"

    @property
    def host_end(self) -> int:
        return self.host_id + self.length

    def covers(self, container_id: int) -> bool:
        """True when `container_id` is mapped by this range."""
        return self.container_id <= container_id < self.container_id + self.length


class UserNamespace(_Model):
    # PodSandboxConfig._namespaces' mapping rules, stated in the JSON schema: NODE takes no
    # mapping; POD takes uids and gids both (one mapping each) or neither.
    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"if": {"required": ["mode"], "properties": {"mode": _NODE_MODE}},
         "then": {"properties": {"uids": {"maxItems": 0}, "gids": {"maxItems": 0}}},
         "else": {"anyOf": [
             {"required": ["uids", "gids"],
              "properties": {"uids": {"minItems": 1, "maxItems": 1},
                             "gids": {"minItems": 1, "maxItems": 1}}},
             {"properties": {"uids": {"maxItems": 0}, "gids": {"maxItems": 0}}}]}},
        {"properties": {"uids": {"items": _POD_MAPPING}, "gids": {"items": _POD_MAPPING}}},
    ]})

    mode: Mode = Field(default=NamespaceMode.POD,
                       json_schema_extra=_mode_enum(NamespaceMode.POD, NamespaceMode.NODE))
    uids: list[IDMapping] = Field(default_factory=list, max_length=16, description=_MAPPING)
    gids: list[IDMapping] = Field(default_factory=list, max_length=16, description=_MAPPING)


class NamespaceOption(_Model):
    # _namespaces' rules in the JSON schema: the modes it supports, and no host pid or ipc
    # namespace for a pod with its own user namespace
    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"if": {"required": ["userns_options"], "properties": {"userns_options": _POD_USERNS}},
         "then": {"properties": {"pid": {"not": _NODE_MODE}, "ipc": {"not": _NODE_MODE}}}},
    ]})

    network: Mode = Field(default=NamespaceMode.POD,
                          json_schema_extra=_mode_enum(NamespaceMode.POD, NamespaceMode.NODE))
    pid: Mode = Field(default=NamespaceMode.POD, json_schema_extra=_mode_enum(
        NamespaceMode.POD, NamespaceMode.CONTAINER, NamespaceMode.NODE))
    ipc: Mode = Field(default=NamespaceMode.POD,
                      json_schema_extra=_mode_enum(NamespaceMode.POD, NamespaceMode.NODE))
    target_id: str = Field(default="", max_length=0,
                           description="only meaningful with mode TARGET, which is refused")
    userns_options: UserNamespace | None = None


class Int64Value(_Model):
    """CRI Int64Value: a wrapper that tells 0 from unset. Here a uid or gid."""

    value: int = Field(default=0, ge=0, le=MAX_ID)


class SELinuxOption(_Model):
    user: str = Field(default="", max_length=256, pattern=TEXT)
    role: str = Field(default="", max_length=256, pattern=TEXT)
    type: str = Field(default="", max_length=256, pattern=TEXT)
    level: str = Field(default="", max_length=256, pattern=TEXT)


class SecurityProfile(_Model):
    """CRI SecurityProfile: seccomp or AppArmor. `localhost_ref` is the profile for Localhost."""

    # The rule between the two fields, stated in the JSON schema as _ref checks it, so that a
    # client (and schemathesis) generated from the document only sends what is accepted.
    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"required": ["profile_type", "localhost_ref"],
         "properties": {"profile_type": {"enum": ["Localhost", int(ProfileType.Localhost)]},
                        "localhost_ref": {"minLength": 1}}},
        {"properties": {"profile_type": {"enum": [
            x for m in ProfileType if m is not ProfileType.Localhost for x in (m.name, int(m))]},
                        "localhost_ref": {"maxLength": 0}}},
    ]})

    profile_type: Profile = ProfileType.RuntimeDefault
    localhost_ref: str = Field(default="", max_length=4096, pattern=TEXT, description=(
        "Localhost only. seccomp: the absolute path of a profile on the daemon's host, a "
        "regular file of at most 1 MiB holding a valid OCI seccomp profile in JSON without "
        "listenerPath; else 422"))

    @model_validator(mode="after")
    def _ref(self) -> SecurityProfile:
        if self.profile_type is ProfileType.Localhost:
            if not self.localhost_ref:
                raise ValueError("profile_type Localhost needs a localhost_ref")
        elif self.localhost_ref:
            raise ValueError(
                f"localhost_ref is only used with profile_type Localhost, not "
                f"{self.profile_type.name}"
            )
        return self


class LinuxSandboxSecurityContext(_Model):
    # _user's rule in the JSON schema: run_as_group (not null) only beside a run_as_user; and
    # _namespaces': privileged only without a pod user namespace
    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"properties": {"run_as_group": {"type": "null"}}},
        {"required": ["run_as_user"], "properties": {"run_as_user": {"type": "object"}}},
    ], "allOf": [
        {"if": {"required": ["privileged"], "properties": {"privileged": {"const": True}}},
         "then": {"properties": {"namespace_options": {"properties": {
             "userns_options": {"not": _POD_USERNS}}}}}},
    ]})

    namespace_options: NamespaceOption = Field(default_factory=NamespaceOption)
    selinux_options: SELinuxOption | None = Field(default=None,
                                                  description=_LSM.format("SELinux"))
    run_as_user: Int64Value | None = Field(default=None, description=_MAPPED.format("uids"))
    run_as_group: Int64Value | None = Field(default=None, description=_MAPPED.format("gids"))
    readonly_rootfs: bool = False
    supplemental_groups: list[Annotated[int, Field(ge=0, le=MAX_ID)]] = Field(
        default_factory=list, max_length=64, description=_MAPPED.format("gids"))
    privileged: bool = False
    #: deprecated in the CRI: "", "unconfined", "runtime/default", "docker/default" or
    #: "localhost/<absolute path>"
    seccomp_profile_path: str = Field(
        default="", max_length=4096,
        pattern=r"^(|unconfined|runtime/default|docker/default|localhost/"
                rf"/[^{UNSAFE}]*)\Z")
    seccomp: SecurityProfile | None = None
    apparmor: SecurityProfile | None = Field(default=None, description=(
        "any profile but Unconfined is " + _LSM.format("AppArmor")))
    supplemental_groups_policy: GroupsPolicy = SupplementalGroupsPolicy.Merge

    @model_validator(mode="after")
    def _user(self) -> LinuxSandboxSecurityContext:
        # The CRI: "run_as_group should only be specified when run_as_user is specified;
        # otherwise, the runtime MUST error."
        if self.run_as_group is not None and self.run_as_user is None:
            raise ValueError("run_as_group is set without run_as_user (the CRI says the runtime "
                             "must refuse it)")
        return self

    def seccomp_profile(self) -> SecurityProfile | None:
        """The seccomp profile asked for: `seccomp`, else the deprecated path; None: none."""
        if self.seccomp is not None:
            return self.seccomp
        path = self.seccomp_profile_path
        if path in ("runtime/default", "docker/default"):
            return SecurityProfile(profile_type=ProfileType.RuntimeDefault)
        if path.startswith("localhost/"):
            return SecurityProfile(profile_type=ProfileType.Localhost,
                                   localhost_ref=path.removeprefix("localhost/"))
        return None


class HugepageLimit(_Model):
    page_size: str = Field(default="", max_length=16, pattern=r"^[0-9]*[KMGkmg]?B?\Z")
    limit: int = Field(default=0, ge=0)


class LinuxContainerResources(_Model):
    """CRI LinuxContainerResources, as kubelet sends for a sandbox (resources, overhead)."""

    cpu_period: int = Field(default=0, ge=0, le=1_000_000)
    cpu_quota: int = Field(default=0, ge=-1)
    cpu_shares: int = Field(default=0, ge=0, le=262144)
    memory_limit_in_bytes: int = Field(default=0, ge=0)
    oom_score_adj: int = Field(default=0, ge=-1000, le=1000)
    cpuset_cpus: str = Field(default="", max_length=1024, pattern=CPUSET)
    cpuset_mems: str = Field(default="", max_length=1024, pattern=CPUSET)
    hugepage_limits: list[HugepageLimit] = Field(default_factory=list, max_length=16)
    unified: dict[Annotated[str, Field(max_length=256, pattern=r"^[a-z0-9_.]+\Z")], Text] = Field(
        default_factory=dict, max_length=64)
    memory_swap_limit_in_bytes: int = Field(default=0, ge=0)


class LinuxPodSandboxConfig(_Model):
    # _namespaces' sysctl rules in the JSON schema: none of a namespace the pod shares with
    # the host
    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"if": _mode_is("network", NamespaceMode.NODE),
         "then": {"properties": {"sysctls": {"propertyNames": {"not": {"pattern": r"^net\."}}}}}},
        {"if": _mode_is("ipc", NamespaceMode.NODE),
         "then": {"properties": {"sysctls": {"propertyNames": {
             "not": {"pattern": rf"^({_IPC_SYSCTL_TEXT})\Z"}}}}}},
    ]})

    cgroup_parent: str = Field(default="", max_length=1024, pattern=CGROUP_PARENT,
                               description=_PATH_BYTES)
    security_context: LinuxSandboxSecurityContext = Field(
        default_factory=LinuxSandboxSecurityContext
    )
    sysctls: dict[Annotated[str, Field(max_length=256)], Text] = Field(
        default_factory=dict, max_length=128, description=(
            "each one must exist in the daemon's kernel (else 422) and take the value given "
            "(else the runtime's create fails: 500, the run unwound)"),
        json_schema_extra={"propertyNames": {"maxLength": 256, "pattern": SYSCTL_NAME}})
    overhead: LinuxContainerResources | None = None
    resources: LinuxContainerResources | None = None

    @field_validator("cgroup_parent", mode="before")
    @classmethod
    def _cgroup_parent(cls, v: Any) -> Any:
        # before the pattern, which says the same less readably
        return paths.check_host_path(v, "linux.cgroup_parent", 1024) if isinstance(v, str) else v

    @field_validator("sysctls")
    @classmethod
    def _sysctls(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not _SYSCTL_NAME.fullmatch(name):
                raise ValueError(f"sysctl {name!r} is not a sysctl name")
            if not (is_ipc_sysctl(name) or name.startswith("net.")):
                raise ValueError(
                    f"sysctl {name!r} is not namespaced (allowed: net.*, fs.mqueue.*, "
                    "kernel.shm*/msg*/sem)"
                )
        return v


class PodSandboxMetadata(_Model):
    # The CRI puts no rule on names (critest uses capitals); podfsm refuses only what would
    # break a terminal, a log line or CNI_ARGS (K8S_POD_NAME=...;...). A name never becomes a
    # file name.
    name: str = Field(min_length=1, max_length=253, pattern=CNI_ARG_TEXT)
    uid: str = Field(default="", max_length=128,
                     pattern=rf"^[^{_UNPRINTABLE};=/]*\Z")
    namespace: str = Field(default="default", min_length=1, max_length=253, pattern=CNI_ARG_TEXT)
    attempt: int = Field(default=0, ge=0, le=(1 << 32) - 1)

    @field_validator("name", "namespace", mode="before")
    @classmethod
    def _printable(cls, v: Any, info: ValidationInfo) -> Any:
        # The same rule as the pattern, said in words: what str.isprintable refuses but
        # unassigned and private-use code points, which are no control, format or separator
        # character (and which a JSON schema could not list).
        if not isinstance(v, str):
            return v
        where = f"metadata.{info.field_name}"
        if not v:
            raise ValueError(f"{where} must not be empty")
        if len(v) > 253:
            raise ValueError(f"{where} is longer than 253 characters")
        if _UNPRINTABLE_RE.search(v):
            raise ValueError(f"{where} {v!r} has a control or unprintable character")
        if ";" in v or "=" in v:
            raise ValueError(f"{where} {v!r} has ';' or '=', which CNI_ARGS cannot carry")
        return v

    @field_validator("uid", mode="before")
    @classmethod
    def _uid(cls, v: Any) -> Any:
        if isinstance(v, str) and (_UNPRINTABLE_RE.search(v) or any(c in v for c in ";=/")):
            raise ValueError(f"metadata.uid {_shown(v)} has a control character or one of "
                             "'/', ';', '=' (CNI_ARGS carries it)")
        return v


class DNSConfig(_Model):
    # glibc reads at most 3 nameservers (MAXNS); kubelet allows 32 search domains.
    servers: list[Annotated[str, Field(max_length=45, json_schema_extra=_IP_FORMATS)]] = Field(
        default_factory=list, max_length=3)
    searches: list[Annotated[str, Field(min_length=1, max_length=253, pattern=DOMAIN)]] = Field(
        default_factory=list, max_length=32)
    options: list[Annotated[str, Field(min_length=1, max_length=64, pattern=RESOLV_OPTION)]] = (
        Field(default_factory=list, max_length=16))

    @field_validator("servers")
    @classmethod
    def _servers(cls, v: list[str]) -> list[str]:
        return [_ip(s, "dns_config.servers entry") for s in v]

    @field_validator("searches")
    @classmethod
    def _searches(cls, v: list[str]) -> list[str]:
        if len(" ".join(v)) > 2048:
            raise ValueError("dns_config.searches is longer than 2048 characters in all")
        return v


class PortMapping(_Model):
    # _ports' rule in the JSON schema
    model_config = ConfigDict(json_schema_extra={
        "if": {"required": ["host_port"], "properties": {"host_port": {"minimum": 1}}},
        "then": {"required": ["container_port"], "properties": {"container_port": {"minimum": 1}}}})

    protocol: Proto = Protocol.TCP
    container_port: int = Field(default=0, ge=0, le=65535)
    host_port: int = Field(default=0, ge=0, le=65535)
    # Exactly what _host_ip accepts, stated as the formats JSON Schema has for it (a pattern
    # looser than the check let schemathesis send "1:2" and see it refused); no multicast or
    # broadcast address (the daemon's document narrows it to the host's own addresses).
    host_ip: str = Field(default="", max_length=45, description=HOST_IP_RULE,
                         json_schema_extra={
                             "anyOf": [{"type": "string", "maxLength": 0}, *_IP_ADDRESS],
                             "not": {"anyOf": [{"pattern": p} for p in _NOT_HOST_IP]}})

    @field_validator("host_ip")
    @classmethod
    def _host_ip(cls, v: str) -> str:
        if not v:
            return v
        ip = ipaddress.ip_address(_ip(v, "port_mappings host_ip"))
        if ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255"):
            kind = "multicast" if ip.is_multicast else "broadcast"
            raise ValueError(f"port_mappings host_ip {v!r} is a {kind} address: a host port is "
                             "reached at an address of this host (or all of them: empty)")
        return str(ip)

    @property
    def key(self) -> tuple[str, int, str]:
        """What a host port is told apart by: the address, the port and the protocol."""
        return self.host_ip, self.host_port, self.protocol.name

    @model_validator(mode="after")
    def _ports(self) -> PortMapping:
        if self.host_port and not self.container_port:
            raise ValueError(f"host_port {self.host_port} needs a container_port")
        return self


class PodSandboxConfig(_Model):
    """The CRI PodSandboxConfig. Validation here is the only gate before the system is touched
    (with the few checks of the host and the configuration the controller adds at admission)."""

    # _namespaces' port rule in the JSON schema: no host_port with the host's network
    model_config = ConfigDict(json_schema_extra={
        "if": {"required": ["linux"], "properties": {
            "linux": _mode_is("network", NamespaceMode.NODE)}},
        "then": {"properties": {"port_mappings": {"items": {"properties": {
            "host_port": {"const": 0}}}}}}})

    metadata: PodSandboxMetadata
    hostname: str = Field(default="", max_length=63, pattern=rf"^({_DNS_LABEL})?\Z")
    log_directory: str = Field(default="", max_length=LOG_DIRECTORY_MAX, pattern=LOG_DIRECTORY,
                               description=_PATH_BYTES + _LOG_PLACES)
    dns_config: DNSConfig | None = None
    port_mappings: list[PortMapping] = Field(default_factory=list, max_length=256)
    labels: dict[LabelKey, Annotated[str, Field(max_length=1024, pattern=TEXT)]] = Field(
        default_factory=dict, max_length=256, description=_MAP_BYTES)
    annotations: dict[LabelKey, Annotated[str, Field(max_length=65536, pattern=TEXT)]] = Field(
        default_factory=dict, max_length=256, description=_MAP_BYTES)
    linux: LinuxPodSandboxConfig = Field(default_factory=LinuxPodSandboxConfig)
    windows: Annotated[dict[str, Any] | None, AfterValidator(_no_windows)] = Field(
        default=None, json_schema_extra={"maxProperties": 0})

    @field_validator("labels", "annotations")
    @classmethod
    def _map_bytes(cls, v: dict[str, str]) -> dict[str, str]:
        total = sum(len(f"{k}{x}".encode("utf-8", "surrogatepass")) for k, x in v.items())
        if total > MAP_BYTES_MAX:
            raise ValueError(f"{total} bytes of keys and values in all, more than "
                             f"{MAP_BYTES_MAX} (256 KiB, Kubernetes' cap on an object's "
                             "annotations)")
        return v

    @field_validator("log_directory", mode="before")
    @classmethod
    def _log_directory(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        v = paths.check_host_path(v, "log_directory", LOG_DIRECTORY_MAX)
        if v.count("/") > paths.LOG_DIRECTORY_SEGMENTS:
            raise ValueError(f"log_directory has more than {paths.LOG_DIRECTORY_SEGMENTS} "
                             "segments")
        for top in paths.SYSTEM_DIRS:
            if v and paths.within(v, top):
                raise ValueError(f"log_directory {_shown(v)} is inside {top}, a kernel "
                                 "pseudo-filesystem: no place for logs")
        return v

    @model_validator(mode="after")
    def _namespaces(self) -> PodSandboxConfig:
        sc = self.linux.security_context
        opts = sc.namespace_options
        if opts.network not in (NamespaceMode.POD, NamespaceMode.NODE):
            raise ValueError(
                f"namespace_options.network {opts.network.name} is not supported (POD or NODE)"
            )
        if opts.pid is NamespaceMode.TARGET:
            raise ValueError("namespace_options.pid TARGET is not supported for a pod")
        if opts.ipc not in (NamespaceMode.POD, NamespaceMode.NODE):
            raise ValueError(
                f"namespace_options.ipc {opts.ipc.name} is not supported (POD or NODE)")
        for name in self.linux.sysctls:
            if name.startswith("net.") and opts.network is NamespaceMode.NODE:
                raise ValueError(f"sysctl {name!r} would change the host's network namespace "
                                 "(namespace_options.network is NODE)")
            if is_ipc_sysctl(name) and opts.ipc is NamespaceMode.NODE:
                raise ValueError(f"sysctl {name!r} would change the host's ipc namespace "
                                 "(namespace_options.ipc is NODE)")
        if opts.network is NamespaceMode.NODE and any(p.host_port for p in self.port_mappings):
            raise ValueError("port_mappings need the pod's own network (namespace_options."
                             "network is NODE: the pod's ports are the host's already)")
        seen: dict[tuple[str, int, str], int] = {}
        for i, pm in enumerate(self.port_mappings):
            if pm.host_port <= 0:
                continue
            if pm.key in seen:  # portmap would add a second rule that never matches
                raise ValueError(
                    f"port_mappings[{i}] repeats port_mappings[{seen[pm.key]}]: host_ip "
                    f"{pm.host_ip!r}, host_port {pm.host_port}, {pm.protocol.name} (one host "
                    "port goes to one container port)")
            seen[pm.key] = i
        us = opts.userns_options
        if sc.privileged and us is not None and us.mode is NamespaceMode.POD:
            raise ValueError(
                "security_context.privileged contradicts userns_options mode POD: a privileged "
                "pod gets host privileges, which a pod user namespace exists to withhold "
                "(Kubernetes refuses privileged with hostUsers: false too)")
        if us is not None and us.mode is NamespaceMode.POD:
            for kind, mode in (("pid", opts.pid), ("ipc", opts.ipc)):
                if mode is NamespaceMode.NODE:
                    raise ValueError(
                        f"namespace_options.{kind} NODE contradicts userns_options mode POD: "
                        f"the host's {kind} namespace is not the pod user namespace's to use "
                        f"(Kubernetes refuses host{kind.upper()} with hostUsers: false too)")
        if us is None:
            return self
        if us.mode not in (NamespaceMode.POD, NamespaceMode.NODE):
            raise ValueError(
                f"userns_options.mode {us.mode.name} is not supported (POD or NODE)"
            )
        if us.mode is NamespaceMode.NODE:
            if us.uids or us.gids:
                raise ValueError("userns_options.mode NODE takes no uid or gid mappings")
            return self
        if bool(us.uids) != bool(us.gids):
            raise ValueError("userns_options mode POD needs both uids and gids, or neither")
        for kind, maps in (("uids", us.uids), ("gids", us.gids)):
            if not maps:
                continue
            if len(maps) != 1:
                raise ValueError(
                    f"userns_options.{kind} must hold exactly one mapping, got {len(maps)}"
                )
            m = maps[0]
            if m.container_id != 0:
                raise ValueError(
                    f"userns_options.{kind}[0].container_id must be 0, got {m.container_id}"
                )
            if m.length <= 0:
                raise ValueError(f"userns_options.{kind}[0].length must be > 0")
            # 4294967295 is (uid_t)-1, "no id": the kernel refuses to map it
            if m.host_end > ID_SPACE - 1:
                raise ValueError(f"userns_options.{kind}[0] runs past the last id")
            if m.host_id == 0:
                raise ValueError(
                    f"userns_options.{kind}[0].host_id 0 would map the host's root into the pod"
                )
        return self

    # Derived views the orchestrator uses.
    @property
    def pod_userns(self) -> bool:
        """True when the pod gets its own user namespace."""
        us = self.linux.security_context.namespace_options.userns_options
        return us is not None and us.mode is NamespaceMode.POD

    @property
    def pod_netns(self) -> bool:
        """True when the pod gets its own network namespace."""
        return self.linux.security_context.namespace_options.network is NamespaceMode.POD

    @property
    def host_pid(self) -> bool:
        """True when the pause runs in the host's pid namespace."""
        return self.linux.security_context.namespace_options.pid is NamespaceMode.NODE

    @property
    def host_ipc(self) -> bool:
        """True when the pause runs in the host's ipc namespace (and uses its /dev/shm)."""
        return self.linux.security_context.namespace_options.ipc is NamespaceMode.NODE

    @property
    def requested_uid_mapping(self) -> IDMapping | None:
        us = self.linux.security_context.namespace_options.userns_options
        return us.uids[0] if us is not None and us.uids else None

    @property
    def requested_gid_mapping(self) -> IDMapping | None:
        us = self.linux.security_context.namespace_options.userns_options
        return us.gids[0] if us is not None and us.gids else None

    @property
    def effective_hostname(self) -> str:
        """The pod's hostname: the one asked for, else a DNS label derived from the name."""
        if self.hostname:
            return self.hostname
        label = re.sub(r"[^a-z0-9-]+", "-", self.metadata.name.split(".")[0].lower())
        return label[:63].strip("-") or "pod"

    @property
    def reserved_name(self) -> tuple[str, str, str, int]:
        """What must be unique among sandboxes: (name, namespace, uid, attempt), the parts
        containerd joins with '_' into its reservation key. Kept a tuple: joined, `{name:
        x_y, namespace: z}` and `{name: x, namespace: y_z}` would be one key."""
        m = self.metadata
        return (m.name, m.namespace, m.uid, m.attempt)


def parse_pod_config(data: Any) -> PodSandboxConfig:
    """Validate a decoded pod-config JSON object; raise InvalidPodConfig naming every problem."""
    if not isinstance(data, dict):
        raise InvalidPodConfig(f"pod config must be a JSON object, not {type(data).__name__}")
    try:
        return PodSandboxConfig.model_validate(data)
    except ValidationError as exc:
        raise InvalidPodConfig(describe_validation_error(exc)) from None

