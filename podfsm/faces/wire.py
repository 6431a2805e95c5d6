"""The bodies of the HTTP API that are not core records: what `podfsm serve` sends and what its
client parses, one definition for both ends."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from podfsm.core.containerrecords import ContainerStatus
from podfsm.core.containerspec import ContainerConfig
from podfsm.core.containerstates import ContainerState
from podfsm.core.images import ImageRecord
from podfsm.core.records import SandboxStatus

DEFAULT_SOCKET = "/run/podfsm/podfsm.sock"
#: the diagram formats of faces/graph.py (a test keeps the two in step)
GraphFormat = Literal["mmd", "dot", "svg", "png"]
#: event sequence numbers are counted from 1 and never reach this
MAX_SEQ = (1 << 53) - 1
#: a sandbox id as the server takes it: 64 lower-case hex digits (the CLI expands prefixes)
SANDBOX_ID_PATTERN = "^[0-9a-f]{64}$"
#: an image id in a path, with or without `sha256:` (the CLI resolves names and prefixes)
IMAGE_ID_PATTERN = "^(sha256:)?[0-9a-f]{64}$"
#: a container id as the server takes it (the CLI expands prefixes)
CONTAINER_ID_PATTERN = "^[0-9a-f]{64}$"
#: exec_sync's timeout, at most a day (0: none)
MAX_EXEC_TIMEOUT = 86400
#: a command line exec_sync takes: at most this many arguments
MAX_EXEC_ARGS = 4096


class ErrorBody(BaseModel):
    """Every error response. `step` and `leftovers` come with a failed run only."""

    error: str
    kind: str
    step: str | None = None
    leftovers: list[str] = []


class SandboxList(BaseModel):
    """GET /v1/sandboxes. `last_event_seq` lets a client resume /v1/events from this list."""

    items: list[SandboxStatus]
    last_event_seq: int


class ImageList(BaseModel):
    """GET /v1/images."""

    items: list[ImageRecord]


_LABEL = "[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_PORT = "(?:[0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
#: what an image reference looks like in the document: [domain/]path[:tag][@sha256:hex], the
#: domain holding a dot or a port, the path's first component without dots (so that it is never
#: taken for a domain); the daemon takes a little more (IPv6 domains, see core/imageref.py)
IMAGE_REFERENCE_PATTERN = (
    f"^(?:(?:{_LABEL}(?:\\.{_LABEL})+(?::{_PORT})?|{_LABEL}:{_PORT})/)?"
    "[a-z0-9]+(?:(?:_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    "(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$")
_BASE64 = "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
_TOKEN = "^[\\x21-\\x7e]*$"


class RegistryAuthBody(BaseModel):
    """Credentials for a pull, as the CRI's AuthConfig carries them."""

    model_config = ConfigDict(extra="forbid")

    username: str = Field(default="", max_length=4096)
    password: str = Field(default="", max_length=4096)
    auth: str = Field(default="", max_length=8192, pattern=_BASE64,
                      description="base64 of user:password")
    identity_token: str = Field(default="", max_length=8192, pattern=_TOKEN, description=(
        "an OAuth2 refresh token for the registry's token server"))
    registry_token: str = Field(default="", max_length=8192, pattern=_TOKEN, description=(
        "a bearer token sent to the registry as it is"))


class PullBody(BaseModel):
    """POST /v1/images: what to pull."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(min_length=1, max_length=255, pattern=IMAGE_REFERENCE_PATTERN,
                       description=(
        "an image reference: `busybox`, `name:tag`, `name@sha256:<hex>`, as Docker "
        "normalizes it"))
    auth: RegistryAuthBody | None = None


class ContainerList(BaseModel):
    """GET /v1/containers."""

    items: list[ContainerStatus]


class CreateContainerBody(BaseModel):
    """POST /v1/containers: the sandbox the container goes in and its config."""

    model_config = ConfigDict(extra="forbid")

    sandbox_id: str = Field(pattern=SANDBOX_ID_PATTERN, description=(
        "the sandbox's id (64 hex digits; the CLI expands prefixes)"))
    config: ContainerConfig = Field(description=(
        "the CRI ContainerConfig as `crictl create` reads it"))


class ExecBody(BaseModel):
    """POST /v1/containers/{container_id}/exec: a command to run to its end."""

    model_config = ConfigDict(extra="forbid")

    cmd: list[str] = Field(min_length=1, max_length=MAX_EXEC_ARGS, description=(
        "the command and its arguments (run as the container's process runs: user, env, "
        "working dir, capabilities)"))
    timeout: int = Field(default=0, ge=0, le=MAX_EXEC_TIMEOUT, description=(
        "seconds until the command is killed and the call answers 504 (0: no timeout)"))


class ExecResponse(BaseModel):
    """What an exec's process did: its exit code and its whole output."""

    exit_code: int
    stdout: str
    stderr: str


class ContainerStatsBody(BaseModel):
    """GET /v1/containers/{container_id}/stats: as the CRI's ContainerStats. The cgroup's
    figures are None when the container is not running."""

    id: str
    name: str
    timestamp_ns: int
    cpu_usage_ns: int | None = None
    memory_working_set_bytes: int | None = None
    memory_usage_bytes: int | None = None
    writable_bytes: int
    writable_inodes: int


class Health(BaseModel):
    """GET /healthz. It answers without a token, so it says no more than this (recovery
    problems go to the daemon's log)."""

    status: Literal["ok", "starting", "recovering"]


# ---------------------------------------------------------------------- query parameters
# Each operation's query parameters are one model: the server validates a request's query
# string with it and the OpenAPI document lists its fields, so a new parameter is one field.


class _Query(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class RunQuery(_Query):
    """POST /v1/sandboxes."""

    runtime_handler: str = Field(default="", max_length=256, description=(
        "the OCI runtime of this sandbox (runc or crun; empty: the daemon's); unknown: 422"))


class GraphQuery(_Query):
    """GET /v1/graph and GET /v1/sandboxes/{sandbox_id}/graph."""

    format: GraphFormat = Field(default="svg", description="the diagram's format")


class MachineGraphQuery(GraphQuery):
    """GET /v1/graph."""

    machine: Literal["sandbox", "container"] = Field(default="sandbox", description=(
        "which machine, the sandbox's or the container's (a sandbox's diagram shows its "
        "containers' machines beside its own)"))


class ImagesQuery(_Query):
    """GET /v1/images."""

    image: str = Field(default="", max_length=4096, description=(
        "only the image this names (a tag, a digest, a short name, an id or id prefix)"))


class ContainersQuery(_Query):
    """GET /v1/containers: the CRI's ContainerFilter."""

    id: str = Field(default="", max_length=64, pattern="^[0-9a-f]*$", description=(
        "only containers whose id starts with this"))
    sandbox_id: str = Field(default="", max_length=64, pattern="^[0-9a-f]*$", description=(
        "only the containers of the sandbox whose id starts with this"))
    state: ContainerState | None = Field(default=None, description="only containers in this "
                                         "state")
    label: str = Field(default="", max_length=4096,
                       pattern=r"^([^=,]+=[^,]*(,[^=,]+=[^,]*)*)?$", description=(
        "only containers with these labels: `key=value`, several joined by commas"))


class StopQuery(_Query):
    """POST /v1/containers/{container_id}/stop."""

    timeout: int = Field(default=0, ge=0, le=MAX_EXEC_TIMEOUT, description=(
        "seconds between the stop signal and SIGKILL (0: SIGKILL at once)"))


class LogsQuery(_Query):
    """GET /v1/containers/{container_id}/logs."""

    follow: bool = Field(default=False, description=(
        "keep the answer open and send new lines until the container has exited"))
    tail: int = Field(default=-1, ge=-1, le=1 << 31, description=(
        "only the last this many lines of what is there (-1: all)"))


class EventsQuery(_Query):
    """GET /v1/events."""

    since: int | None = Field(default=None, ge=0, le=MAX_SEQ, description=(
        "resume after this event seq, as Last-Event-ID does (the header wins when both are "
        "given); a seq the daemon has not reached starts afresh"))
