"""The bodies of the HTTP API that are not core records: what `podfsm serve` sends and what its
client parses, one definition for both ends."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from podfsm.core.records import SandboxStatus

DEFAULT_SOCKET = "/run/podfsm/podfsm.sock"


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


class Health(BaseModel):
    """GET /healthz."""

    status: Literal["ok", "starting", "recovering"]
    sandboxes: int
    recovery_problems: list[str]

