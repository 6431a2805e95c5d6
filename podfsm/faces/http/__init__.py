"""The HTTP face: a Starlette app over a Controller, and `podfsm serve` running it on uvicorn.

Endpoints (all JSON unless said otherwise; errors are {"error": ..., "kind": ...}):

    GET    /                                the live web page
    GET    /healthz                         200 serving, 503 starting or recovering
    GET    /openapi.json                    the OpenAPI 3.1 document of all this
    POST   /v1/sandboxes                    run a sandbox from a pod config: 201 + its status
    GET    /v1/sandboxes                    {"items": [status...], "last_event_seq": n}
    GET    /v1/sandboxes/{id}               its status
    POST   /v1/sandboxes/{id}/stop          stop it: its status, NotReady
    DELETE /v1/sandboxes/{id}               remove it: 204
    GET    /v1/sandboxes/{id}/graph         its diagram (?format=svg|png|mmd|dot)
    GET    /v1/graph                        the machine's diagram (?format=...)
    GET    /v1/events                       transitions as Server-Sent Events, `id:` = seq;
                                            Last-Event-ID (or ?since=) resumes after that seq

Statuses: 404 unknown sandbox, 409 name reserved, 422 invalid pod config, 500 a run that failed
(the error says which step and what is left), 503 while the controller starts or recovers.

`serve` listens on a unix socket (mode 0660, never wider, even for an instant) and on TCP only
when a port is given, on loopback unless a host is given. SIGTERM or SIGINT shut down
gracefully: event streams end, requests in flight finish, the Controller is left, and the
sandboxes keep running for the next `serve` to re-attach.

The modules: `app` (routes), `errors` (statuses and the error body), `events` (the SSE stream),
`openapi` (the document), `daemon` (uvicorn, sockets, signals); the page is static/index.html.
"""

from podfsm.faces.http.app import DEFAULT_HEARTBEAT, MAX_BODY, PAGE, Shim, create_app
from podfsm.faces.http.daemon import (
    DEFAULT_GRACEFUL_TIMEOUT,
    SOCKET_MODE,
    TOKEN_FILE,
    Daemon,
    bind_tcp_socket,
    bind_unix_socket,
    serve,
)
from podfsm.faces.http.errors import (
    BadRequest,
    DaemonError,
    PayloadTooLarge,
    ServiceUnavailable,
    error_response,
)
from podfsm.faces.http.openapi import openapi_document
from podfsm.faces.wire import ErrorBody, Health, SandboxList

__all__ = [
    "DEFAULT_GRACEFUL_TIMEOUT",
    "DEFAULT_HEARTBEAT",
    "MAX_BODY",
    "PAGE",
    "SOCKET_MODE",
    "TOKEN_FILE",
    "BadRequest",
    "Daemon",
    "DaemonError",
    "ErrorBody",
    "Health",
    "PayloadTooLarge",
    "SandboxList",
    "ServiceUnavailable",
    "Shim",
    "bind_tcp_socket",
    "bind_unix_socket",
    "create_app",
    "error_response",
    "openapi_document",
    "serve",
]
