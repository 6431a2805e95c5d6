"""What podfsm knows about each container, persisted, and what it reports. Frozen models, no
I/O. The record is written before each step that touches the system (`pending` names it) and
after it (`done` lists the create steps finished), so a restart knows what may be half done.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from podfsm.core.containerspec import ContainerConfig
from podfsm.core.containerstates import ContainerState
from podfsm.core.records import HistoryEntry, TaskInfo

SCHEMA_VERSION = 1


class ContainerRecord(BaseModel):
    """Everything persisted about one container (`<state_dir>/containers/<id>.json`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = SCHEMA_VERSION
    id: str
    sandbox_id: str
    config: ContainerConfig
    state: ContainerState = ContainerState.UNKNOWN
    #: the forward step under way when the record was written (a CreateStep, "start", "stop",
    #: "remove"), if any
    pending: str | None = None
    #: the CreateSteps done, in order (what an unwinding undoes)
    done: list[str] = Field(default_factory=list)
    runtime: str
    image_id: str
    image_ref: str
    #: the image as the config named it
    image_name: str
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    exit_code: int | None = None
    reason: str = ""
    message: str = ""
    #: the container's directory (bundle, rootfs, upper and work) and its log file
    dir: str
    log_path: str = ""
    stop_signal: str = "SIGTERM"
    #: the container's init process, and its monitor (conmon)
    task: TaskInfo | None = None
    monitor: TaskInfo | None = None
    last_error: str | None = None
    history: list[HistoryEntry] = Field(default_factory=list)

    def evolve(self, **changes: Any) -> ContainerRecord:
        return self.model_copy(update=changes)


class ContainerStatus(BaseModel):
    """What container_status and list_containers report."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    sandbox_id: str
    name: str
    attempt: int
    state: ContainerState
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    exit_code: int | None = None
    reason: str = ""
    message: str = ""
    image: str
    image_id: str
    image_ref: str
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    log_path: str = ""
    pid: int | None = None
    runtime: str
    mounts: list[dict[str, Any]] = Field(default_factory=list)
    history: list[HistoryEntry] = Field(default_factory=list)

    @classmethod
    def from_record(cls, rec: ContainerRecord) -> ContainerStatus:
        md = rec.config.metadata
        return cls(
            id=rec.id, sandbox_id=rec.sandbox_id, name=md.name, attempt=md.attempt,
            state=rec.state, created_at=rec.created_at, started_at=rec.started_at,
            finished_at=rec.finished_at, exit_code=rec.exit_code, reason=rec.reason,
            message=rec.message, image=rec.image_name, image_id=rec.image_id,
            image_ref=rec.image_ref, labels=dict(rec.config.labels),
            annotations=dict(rec.config.annotations), log_path=rec.log_path,
            pid=rec.task.pid if rec.task and rec.state is ContainerState.RUNNING else None,
            runtime=rec.runtime,
            mounts=[m.model_dump() for m in rec.config.mounts], history=list(rec.history),
        )


@dataclass(frozen=True)
class Exit:
    """A container's exit as its monitor recorded it."""

    code: int
    at: datetime
    oom: bool


def exit_reason(code: int, oom: bool) -> str:
    """The CRI reason of an exit: OOMKilled, Completed (0) or Error."""
    if oom:
        return "OOMKilled"
    return "Completed" if code == 0 else "Error"
