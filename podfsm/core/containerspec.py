"""The container config: the CRI ContainerConfig, as `crictl create` reads it from JSON and as
the CRI face hands it over (through its protobuf-JSON form).

Every field is honoured the way containerd 2.x honours it, or refused naming it, before
anything is created (docs/container-config.md lists each; tests/unit/test_container_config.py
keeps that table in step with this model).
"""

from __future__ import annotations

import enum
import posixpath
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator, model_validator

from podfsm.core.errors import InvalidContainerConfig
from podfsm.core.spec import (
    MAX_ID,
    TEXT,
    Int64Value,
    LabelKey,
    LinuxContainerResources,
    Mode,
    NamespaceMode,
    SecurityProfile,
    SELinuxOption,
    Text,
    _enum_parser,
    _Model,
    describe_validation_error,
)


class MountPropagation(enum.IntEnum):
    """CRI MountPropagation."""

    PROPAGATION_PRIVATE = 0
    PROPAGATION_HOST_TO_CONTAINER = 1
    PROPAGATION_BIDIRECTIONAL = 2


Propagation = Annotated[MountPropagation, _enum_parser(MountPropagation)]
AbsPath = Annotated[str, Field(max_length=4095, pattern=TEXT)]


def _absolute(v: str, where: str) -> str:
    if not v.startswith("/"):
        raise ValueError(f"{where} {v!r} must be an absolute path")
    if ".." in v.split("/"):
        raise ValueError(f"{where} {v!r} must not contain '..' components")
    return v


class ContainerMetadata(_Model):
    name: str = Field(min_length=1, max_length=253, pattern=TEXT)
    attempt: int = Field(default=0, ge=0, le=(1 << 32) - 1)


class ImageSpec(_Model):
    image: str = Field(min_length=1, max_length=4096, pattern=TEXT)
    annotations: dict[LabelKey, Text] = Field(default_factory=dict)
    user_specified_image: str = Field(default="", max_length=4096, pattern=TEXT)
    runtime_handler: str = Field(default="", max_length=0, description=(
        "a per-image runtime handler (KEP-4216) is refused: the container runs with its "
        "sandbox's handler"))


class KeyValue(_Model):
    key: str = Field(min_length=1, max_length=4096, pattern=r"^[^=\x00]*\Z")
    value: Text = ""


class Mount(_Model):
    container_path: AbsPath
    host_path: AbsPath
    readonly: bool = False
    selinux_relabel: bool = Field(default=False, description=(
        "ignored where SELinux is not enabled, as containerd does"))
    propagation: Propagation = MountPropagation.PROPAGATION_PRIVATE
    uid_mappings: list[dict[str, Any]] = Field(default_factory=list, max_length=0, description=(
        "idmapped mounts come with user-namespaced containers (a later issue)"))
    gid_mappings: list[dict[str, Any]] = Field(default_factory=list, max_length=0, description=(
        "idmapped mounts come with user-namespaced containers (a later issue)"))
    recursive_read_only: bool = Field(default=False, description=(
        "refused: runc 1.1.5 and crun 1.8.1 have no rro mount option"))
    image: dict[str, Any] | None = Field(default=None, description=(
        "image volumes (KEP-4639) are refused"))
    image_sub_path: str = Field(default="", max_length=0, description="image volumes: refused")

    @field_validator("container_path", "host_path")
    @classmethod
    def _paths(cls, v: str, info: Any) -> str:
        return _absolute(v, f"mount {info.field_name}")

    @model_validator(mode="after")
    def _refusals(self) -> Mount:
        if self.recursive_read_only:
            raise ValueError("recursive_read_only is not supported: the runtimes here (runc "
                             "1.1.5, crun 1.8.1) have no recursive read-only mounts")
        if self.image is not None:
            raise ValueError("image volumes (mount.image) are not supported")
        return self


class Device(_Model):
    container_path: AbsPath
    host_path: AbsPath
    permissions: str = Field(default="rwm", pattern=r"^[rwm]{0,3}\Z")

    @field_validator("container_path", "host_path")
    @classmethod
    def _paths(cls, v: str, info: Any) -> str:
        return _absolute(v, f"device {info.field_name}")


class Capability(_Model):
    add_capabilities: list[Annotated[str, Field(pattern=r"^[A-Za-z_]{1,40}\Z")]] = Field(
        default_factory=list, max_length=64)
    drop_capabilities: list[Annotated[str, Field(pattern=r"^[A-Za-z_]{1,40}\Z")]] = Field(
        default_factory=list, max_length=64)
    add_ambient_capabilities: list[str] = Field(default_factory=list, max_length=0,
                                                description="ambient capabilities: refused")


class ContainerNamespaceOption(_Model):
    network: Mode = NamespaceMode.POD
    pid: Mode = NamespaceMode.POD
    ipc: Mode = NamespaceMode.POD
    target_id: str = Field(default="", max_length=0,
                           description="pid TARGET (another container's) is refused")
    userns_options: dict[str, Any] | None = Field(default=None, description=(
        "as kubelet sends them: the pod's (mode and mappings); anything else is refused"))

    @model_validator(mode="after")
    def _modes(self) -> ContainerNamespaceOption:
        if self.pid is NamespaceMode.TARGET:
            raise ValueError("namespace_options.pid TARGET (another container's pid "
                             "namespace) is not supported")
        for name in ("network", "ipc"):
            if getattr(self, name) in (NamespaceMode.CONTAINER, NamespaceMode.TARGET):
                raise ValueError(f"namespace_options.{name} must be POD or NODE")
        return self


class LinuxContainerSecurityContext(_Model):
    capabilities: Capability | None = None
    privileged: bool = Field(default=False, description=(
        "every capability podfsm holds, every host device, no seccomp, no masked or read-only "
        "paths, /sys read-write; only in a privileged sandbox without a user namespace"))
    namespace_options: ContainerNamespaceOption = Field(
        default_factory=ContainerNamespaceOption)
    selinux_options: SELinuxOption | None = None
    run_as_user: Int64Value | None = None
    run_as_group: Int64Value | None = None
    run_as_username: str = Field(default="", max_length=256, pattern=r"^[^:/\x00-\x1f]*\Z")
    readonly_rootfs: bool = False
    supplemental_groups: list[Annotated[int, Field(ge=0, le=MAX_ID)]] = Field(
        default_factory=list, max_length=64)
    supplemental_groups_policy: int = Field(default=0, ge=0, le=1, description=(
        "0 Merge (the image's /etc/group memberships with supplemental_groups), 1 Strict "
        "(supplemental_groups only)"))
    no_new_privs: bool = False
    masked_paths: list[AbsPath] = Field(default_factory=list, max_length=256)
    readonly_paths: list[AbsPath] = Field(default_factory=list, max_length=256)
    seccomp: SecurityProfile | None = None
    apparmor: SecurityProfile | None = None
    apparmor_profile: str = Field(default="", max_length=4096, pattern=TEXT)
    seccomp_profile_path: str = Field(default="", max_length=4096, pattern=TEXT)

    @model_validator(mode="after")
    def _rules(self) -> LinuxContainerSecurityContext:
        if self.run_as_group is not None and self.run_as_user is None \
                and not self.run_as_username:
            raise ValueError("run_as_group is set without run_as_user or run_as_username "
                             "(the CRI says the runtime must refuse it)")
        if self.run_as_user is not None and self.run_as_username:
            raise ValueError("run_as_user and run_as_username are both set")
        return self


class LinuxContainerConfig(_Model):
    resources: LinuxContainerResources | None = None
    security_context: LinuxContainerSecurityContext = Field(
        default_factory=LinuxContainerSecurityContext)


class ContainerConfig(_Model):
    """The CRI ContainerConfig."""

    metadata: ContainerMetadata
    image: ImageSpec
    command: list[Text] = Field(default_factory=list, max_length=4096)
    args: list[Text] = Field(default_factory=list, max_length=4096)
    working_dir: str = Field(default="", max_length=4095, pattern=TEXT)
    envs: list[KeyValue] = Field(default_factory=list, max_length=4096)
    mounts: list[Mount] = Field(default_factory=list, max_length=256)
    devices: list[Device] = Field(default_factory=list, max_length=256, description=(
        "host character or block devices (a symlink resolved), made in the container and "
        "allowed in its device cgroup with `permissions`"))
    labels: dict[LabelKey, Text] = Field(default_factory=dict)
    annotations: dict[LabelKey, Text] = Field(default_factory=dict)
    log_path: str = Field(default="", max_length=4095, pattern=TEXT)
    stdin: bool = False
    stdin_once: bool = False
    tty: bool = False
    linux: LinuxContainerConfig = Field(default_factory=LinuxContainerConfig)
    windows: dict[str, Any] | None = Field(default=None, description="refused on Linux")
    cdi_devices: list[dict[str, Any]] = Field(default_factory=list, max_length=0,
                                              description="CDI devices: refused")
    stop_signal: str = Field(default="", pattern=r"^(|RUNTIMEDEFAULT|SIG[A-Z0-9+]{2,12})\Z")

    @field_validator("working_dir")
    @classmethod
    def _workdir(cls, v: str) -> str:
        return _absolute(v, "working_dir") if v else v

    @field_validator("log_path")
    @classmethod
    def _log_path(cls, v: str) -> str:
        if v.startswith("/") or ".." in v.split("/"):
            raise ValueError(f"log_path {v!r} must be relative to the pod's log_directory, "
                             "without '..'")
        return posixpath.normpath(v) if v else v

    @field_validator("windows")
    @classmethod
    def _no_windows(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v:
            raise ValueError("windows settings are refused on a Linux node")
        return None

    @model_validator(mode="after")
    def _stdin(self) -> ContainerConfig:
        if self.stdin_once and not self.stdin:
            raise ValueError("stdin_once needs stdin")
        return self


def parse_container_config(data: Any) -> ContainerConfig:
    """Validate a decoded container-config JSON object; InvalidContainerConfig naming every
    problem."""
    if not isinstance(data, dict):
        raise InvalidContainerConfig(
            f"container config must be a JSON object, not {type(data).__name__}")
    data = dict(data)
    if "CDI_devices" in data:  # the proto's own spelling
        data["cdi_devices"] = data.pop("CDI_devices")
    try:
        return ContainerConfig.model_validate(data)
    except ValidationError as exc:
        text = describe_validation_error(exc).replace("invalid pod config",
                                                      "invalid container config")
        raise InvalidContainerConfig(text.replace("CRI PodSandboxConfig",
                                                  "CRI ContainerConfig")) from None
