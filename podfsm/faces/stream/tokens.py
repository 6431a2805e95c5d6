"""The streaming server's request cache: an Exec, Attach or PortForward call leaves its request
here under an unguessable token, and the URL it answers carries that token. As in kubelet's
streaming server (pkg/kubelet/cri/streaming/request_cache.go), a token is good once and for
`TTL` seconds; the cache holds at most `MAX_ENTRIES`, and a full cache refuses new requests
rather than dropping live ones."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

#: seconds a token stays good (kubelet: 1 minute)
TTL = 60.0
#: outstanding tokens at most (kubelet: 1000)
MAX_ENTRIES = 1000
#: 8 random bytes in kubelet; 32 here, URL-safe base64 (43 characters)
TOKEN_BYTES = 32


@dataclass(frozen=True)
class ExecRequest:
    container_id: str
    cmd: tuple[str, ...]
    tty: bool = False
    stdin: bool = False
    stdout: bool = True
    stderr: bool = True


@dataclass(frozen=True)
class AttachRequest:
    container_id: str
    tty: bool = False
    stdin: bool = False
    stdout: bool = True
    stderr: bool = True


@dataclass(frozen=True)
class PortForwardRequest:
    sandbox_id: str
    #: ports the CRI call named (empty: any port the stream headers ask for, as in CRI)
    ports: tuple[int, ...] = ()


StreamRequest = ExecRequest | AttachRequest | PortForwardRequest


class CacheFull(RuntimeError):
    """Too many outstanding tokens."""


class RequestCache:
    """Tokens to requests: `insert()` a request and get its token; `consume()` it once."""

    def __init__(self, ttl: float = TTL, max_entries: int = MAX_ENTRIES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._entries: dict[str, tuple[float, StreamRequest]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def insert(self, request: StreamRequest) -> str:
        self._expire()
        if len(self._entries) >= self.max_entries:
            raise CacheFull(f"{len(self._entries)} streaming requests are waiting for their "
                            "clients: try again in a minute")
        token = secrets.token_urlsafe(TOKEN_BYTES)
        self._entries[token] = (self._clock() + self.ttl, request)
        return token

    def consume(self, token: str) -> StreamRequest | None:
        """The request of a good token, which is then gone; None for an unknown, used or
        expired one (the caller cannot tell which: a forged token learns nothing)."""
        self._expire()
        entry = self._entries.pop(token, None)
        return entry[1] if entry is not None else None

    def _expire(self) -> None:
        now = self._clock()
        for token in [t for t, (deadline, _) in self._entries.items() if deadline <= now]:
            del self._entries[token]
