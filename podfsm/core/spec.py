"""The pod config: the CRI PodSandboxConfig as `crictl runp` reads it from JSON.

Keys may be snake_case or lowerCamelCase and enums may be names or numbers, as protobuf JSON
allows. Every refusal happens here, before anything is created on the system.
"""

from __future__ import annotations

import enum
import re
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from podfsm.core.errors import InvalidPodConfig

# A hostname is a DNS-1123 label.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
ID_SPACE = 1 << 32  # uid_t range


class NamespaceMode(enum.IntEnum):
    """CRI NamespaceMode, with the protobuf numbers."""

    POD = 0
    CONTAINER = 1
    NODE = 2
    TARGET = 3


class Protocol(enum.IntEnum):
    """CRI Protocol of a port mapping."""

    TCP = 0
    UDP = 1
    SCTP = 2


def _enum_parser(kind: type[enum.IntEnum]) -> Any:
    def parse(value: Any) -> Any:
        if isinstance(value, kind):
            return value
        if isinstance(value, str):
            try:
                return kind[value.strip().upper()]
            except KeyError:
                names = ", ".join(m.name for m in kind)
                raise ValueError(f"unknown {kind.__name__} {value!r} (one of {names})") from None
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                return kind(value)
            except ValueError:
                raise ValueError(f"unknown {kind.__name__} number {value}") from None
        raise ValueError(f"{kind.__name__} must be a name or a number, not {value!r}")

    return BeforeValidator(parse)


Mode = Annotated[NamespaceMode, _enum_parser(NamespaceMode)]
Proto = Annotated[Protocol, _enum_parser(Protocol)]


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        frozen=True,
    )


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


class UserNamespace(_Model):
    mode: Mode = NamespaceMode.POD
    uids: list[IDMapping] = Field(default_factory=list)
    gids: list[IDMapping] = Field(default_factory=list)


class NamespaceOption(_Model):
    network: Mode = NamespaceMode.POD
    pid: Mode = NamespaceMode.POD
    ipc: Mode = NamespaceMode.POD
    target_id: str = ""
    userns_options: UserNamespace | None = None


class LinuxSandboxSecurityContext(_Model):
    namespace_options: NamespaceOption = Field(default_factory=NamespaceOption)


# Sysctls a pod may set: the ones namespaced by the kernel (ipc and net), as runc accepts them
# for a container with its own ipc and network namespaces.
_SYSCTL_NAME = re.compile(r"^[a-z0-9_]+(\.[a-zA-Z0-9_-]+)+$")
_IPC_SYSCTLS = ("kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.sem",
                "kernel.shmall", "kernel.shmmax", "kernel.shmmni", "kernel.shm_rmid_forced")


class LinuxPodSandboxConfig(_Model):
    cgroup_parent: str = ""
    security_context: LinuxSandboxSecurityContext = Field(
        default_factory=LinuxSandboxSecurityContext
    )
    sysctls: dict[str, str] = Field(default_factory=dict)

    @field_validator("cgroup_parent")
    @classmethod
    def _cgroup_parent(cls, v: str) -> str:
        parts = v.split("/")
        if ".." in parts or "\0" in v or len(v) > 1024:
            raise ValueError(f"linux.cgroup_parent {v!r} must not contain '..' components")
        return v

    @field_validator("sysctls")
    @classmethod
    def _sysctls(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not _SYSCTL_NAME.match(name):
                raise ValueError(f"sysctl {name!r} is not a sysctl name")
            if not (name in _IPC_SYSCTLS or name.startswith(("fs.mqueue.", "net."))):
                raise ValueError(
                    f"sysctl {name!r} is not namespaced (allowed: net.*, fs.mqueue.*, "
                    "kernel.shm*/msg*/sem)"
                )
            if "\n" in value or "\0" in value:
                raise ValueError(f"sysctl {name!r} value has a newline or NUL")
        return v


class PodSandboxMetadata(_Model):
    name: str
    uid: str = ""
    namespace: str = "default"
    attempt: int = Field(default=0, ge=0)

    @field_validator("name", "namespace")
    @classmethod
    def _printable(cls, v: str, info: ValidationInfo) -> str:
        # The CRI puts no rule on names (critest uses capitals); podfsm refuses only what would
        # break a terminal, a log line or CNI_ARGS (K8S_POD_NAME=...;...). A name never
        # becomes a file name.
        where = f"metadata.{info.field_name}"
        if not v:
            raise ValueError(f"{where} must not be empty")
        if len(v) > 253:
            raise ValueError(f"{where} is longer than 253 characters")
        if not v.isprintable():
            raise ValueError(f"{where} {v!r} has a control or unprintable character")
        if ";" in v or "=" in v:
            raise ValueError(f"{where} {v!r} has ';' or '=', which CNI_ARGS cannot carry")
        return v

    @field_validator("uid")
    @classmethod
    def _uid(cls, v: str) -> str:
        if len(v) > 128 or any(c in v for c in "/\0\n"):
            raise ValueError(f"metadata.uid {v!r} is too long or has '/', NUL or newline")
        return v


class DNSConfig(_Model):
    servers: list[str] = Field(default_factory=list)
    searches: list[str] = Field(default_factory=list)
    options: list[str] = Field(default_factory=list)


class PortMapping(_Model):
    protocol: Proto = Protocol.TCP
    container_port: int = Field(default=0, ge=0, le=65535)
    host_port: int = Field(default=0, ge=0, le=65535)
    host_ip: str = ""


class PodSandboxConfig(_Model):
    """The CRI PodSandboxConfig. Validation here is the only gate before the system is touched."""

    metadata: PodSandboxMetadata
    hostname: str = ""
    log_directory: str = ""
    dns_config: DNSConfig | None = None
    port_mappings: list[PortMapping] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    linux: LinuxPodSandboxConfig = Field(default_factory=LinuxPodSandboxConfig)

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, v: str) -> str:
        if v and (len(v) > 63 or not _DNS_LABEL.match(v)):
            raise ValueError(f"hostname {v!r} is not a DNS-1123 label")
        return v

    @model_validator(mode="after")
    def _namespaces(self) -> PodSandboxConfig:
        opts = self.linux.security_context.namespace_options
        if opts.network not in (NamespaceMode.POD, NamespaceMode.NODE):
            raise ValueError(
                f"namespace_options.network {opts.network.name} is not supported (POD or NODE)"
            )
        if opts.pid not in (NamespaceMode.POD, NamespaceMode.CONTAINER):
            raise ValueError(f"namespace_options.pid {opts.pid.name} is not supported for a pod")
        if opts.ipc not in (NamespaceMode.POD,):
            raise ValueError(f"namespace_options.ipc {opts.ipc.name} is not supported (POD)")
        us = opts.userns_options
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
    def reserved_name(self) -> str:
        """The name that must be unique among sandboxes, as containerd forms it."""
        m = self.metadata
        return f"{m.name}_{m.namespace}_{m.uid}_{m.attempt}"


def parse_pod_config(data: Any) -> PodSandboxConfig:
    """Validate a decoded pod-config JSON object; raise InvalidPodConfig naming every problem."""
    if not isinstance(data, dict):
        raise InvalidPodConfig(f"pod config must be a JSON object, not {type(data).__name__}")
    try:
        return PodSandboxConfig.model_validate(data)
    except ValidationError as exc:
        raise InvalidPodConfig(describe_validation_error(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "pod config"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "invalid pod config: " + "; ".join(parts)
