"""The streaming face: exec, attach and port-forward sessions over SPDY/3.1 and WebSocket, at
the single-use URLs that CRI Exec, Attach and PortForward answer (see docs/streaming.md)."""

from podfsm.faces.stream.server import StreamServer
from podfsm.faces.stream.tokens import (
    AttachRequest,
    ExecRequest,
    PortForwardRequest,
    RequestCache,
)

__all__ = ["AttachRequest", "ExecRequest", "PortForwardRequest", "RequestCache",
           "StreamServer"]
