"""The HTTP shim: a Starlette app over a Controller, and `podfsm serve` running it on uvicorn.

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
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import os
import re
import signal
import socket
import stat
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any, Literal, cast

import anyio
import uvicorn
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from podfsm import __version__
from podfsm.config import ControllerConfig
from podfsm.controller import Controller
from podfsm.core.errors import (
    InvalidPodConfig,
    NameReserved,
    PodfsmError,
    SandboxNotFound,
    SandboxRunError,
)
from podfsm.core.records import SandboxStatus, TransitionEvent
from podfsm.core.spec import PodSandboxConfig, describe_validation_error, parse_pod_config
from podfsm.faces import graph
from podfsm.faces.client import DEFAULT_SOCKET

log = logging.getLogger(__name__)

#: a pod config is a few kilobytes; refuse anything this big before parsing it
MAX_BODY = 1 << 20
SOCKET_MODE = 0o660
DEFAULT_HEARTBEAT = 15.0
DEFAULT_GRACEFUL_TIMEOUT = 30
_SSE_RETRY_MS = 2000


class ServiceUnavailable(PodfsmError):
    """The controller is not serving yet: it is starting or recovering persisted sandboxes."""


class BadRequest(PodfsmError):
    """A request parameter other than the pod config is malformed."""


class PayloadTooLarge(PodfsmError):
    """The request body is larger than MAX_BODY."""


class DaemonError(PodfsmError):
    """`serve` cannot listen where it was asked to."""


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


_STATUSES: tuple[tuple[type[Exception], int], ...] = (
    (SandboxNotFound, 404),
    (NameReserved, 409),
    (InvalidPodConfig, 422),
    (ValidationError, 422),
    (BadRequest, 400),
    (PayloadTooLarge, 413),
    (ServiceUnavailable, 503),
    (PodfsmError, 500),  # SandboxRunError and every other real failure of the system
)


def error_response(exc: Exception) -> Response:
    """The JSON error response for `exc` (an error of podfsm's or pydantic's)."""
    status = next((code for kind, code in _STATUSES if isinstance(exc, kind)), 500)
    if isinstance(exc, ValidationError):
        body = ErrorBody(error=describe_validation_error(exc), kind="InvalidPodConfig")
    elif isinstance(exc, SandboxRunError):
        body = ErrorBody(error=str(exc), kind=type(exc).__name__, step=exc.step,
                         leftovers=list(exc.leftovers))
    else:
        body = ErrorBody(error=str(exc), kind=type(exc).__name__)
    headers = {"retry-after": "1"} if status == 503 else None
    return _json(body, status, headers)


def _json(model: BaseModel, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(model.model_dump_json(exclude_defaults=isinstance(model, ErrorBody)),
                    status_code=status, headers=headers, media_type="application/json")


class Shim:
    """The HTTP face of one Controller. `app` is the Starlette application.

    `ready` False answers 503 to everything that needs the controller (as does a controller
    that is recovering); `serve` sets it once the Controller is entered.
    """

    def __init__(self, ctl: Controller, *, ready: bool = True,
                 heartbeat: float = DEFAULT_HEARTBEAT) -> None:
        self.ctl = ctl
        self.ready = ready
        self.heartbeat = heartbeat
        self._streams: set[anyio.CancelScope] = set()
        self._closing = False
        self._machine_graphs: dict[str, bytes] = {}
        self._openapi = openapi_document()
        self.app = Starlette(
            routes=[
                Route("/", self.page, methods=["GET"]),
                Route("/healthz", self.healthz, methods=["GET"]),
                Route("/openapi.json", self.openapi, methods=["GET"]),
                Route("/v1/sandboxes", self.list_sandboxes, methods=["GET"]),
                Route("/v1/sandboxes", self.run_sandbox, methods=["POST"]),
                Route("/v1/sandboxes/{sandbox_id}", self.sandbox_status, methods=["GET"]),
                Route("/v1/sandboxes/{sandbox_id}", self.remove_sandbox, methods=["DELETE"]),
                Route("/v1/sandboxes/{sandbox_id}/stop", self.stop_sandbox, methods=["POST"]),
                Route("/v1/sandboxes/{sandbox_id}/graph", self.sandbox_graph, methods=["GET"]),
                Route("/v1/graph", self.machine_graph, methods=["GET"]),
                Route("/v1/events", _EventStream(self), methods=["GET"]),
            ],
            exception_handlers={
                PodfsmError: self._on_error,
                ValidationError: self._on_error,
                HTTPException: self._on_http_exception,
                Exception: self._on_crash,  # a bug: answer JSON too (uvicorn logs the trace)
            },
        )
        # "/v1/sandboxes/%2F" and the like are unknown sandboxes (404), not redirects
        self.app.router.redirect_slashes = False

    # ------------------------------------------------------------------ plumbing

    def controller(self) -> Controller:
        """The controller, or ServiceUnavailable while it starts, recovers or shuts down."""
        if self._closing:
            raise ServiceUnavailable("podfsm is shutting down")
        if not self.ready:
            raise ServiceUnavailable("podfsm is starting: try again in a moment")
        if self.ctl.recovering:
            raise ServiceUnavailable(
                "podfsm is recovering persisted sandboxes: try again in a moment")
        return self.ctl

    def close_streams(self) -> None:
        """End every event stream now and refuse new ones (graceful shutdown)."""
        self._closing = True
        for scope in list(self._streams):
            scope.cancel()

    @contextlib.contextmanager
    def stream_scope(self) -> Iterator[anyio.CancelScope]:
        """A cancel scope that close_streams() cancels."""
        with anyio.CancelScope() as scope:
            self._streams.add(scope)
            try:
                yield scope
            finally:
                self._streams.discard(scope)

    async def _on_error(self, request: Request, exc: Exception) -> Response:
        if isinstance(exc, PodfsmError) and not isinstance(exc, ServiceUnavailable | BadRequest):
            log.log(logging.ERROR if isinstance(exc, SandboxRunError) else logging.INFO,
                    "%s %s: %s", request.method, request.url.path, exc)
        return error_response(exc)

    async def _on_crash(self, request: Request, exc: Exception) -> Response:
        return _json(ErrorBody(error=f"internal error: {type(exc).__name__}: {exc}",
                               kind="InternalError"), 500)

    async def _on_http_exception(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = http.HTTPStatus(exc.status_code).phrase.replace(" ", "")
        return _json(ErrorBody(error=f"{request.method} {request.url.path}: {exc.detail}",
                               kind=kind), exc.status_code, dict(exc.headers or {}))

    # ------------------------------------------------------------------ endpoints

    async def page(self, request: Request) -> Response:
        return HTMLResponse(PAGE, headers={"cache-control": "no-cache"})

    async def healthz(self, request: Request) -> Response:
        status: Literal["ok", "starting", "recovering"] = (
            "starting" if not self.ready else "recovering" if self.ctl.recovering else "ok")
        sandboxes = len(await self.ctl.list_sandboxes()) if status == "ok" else 0
        body = Health(status=status, sandboxes=sandboxes,
                      recovery_problems=list(self.ctl.recovery_problems))
        return _json(body, 200 if status == "ok" else 503)

    async def openapi(self, request: Request) -> Response:
        return Response(json.dumps(self._openapi), media_type="application/json")

    async def list_sandboxes(self, request: Request) -> Response:
        ctl = self.controller()
        seq = ctl.last_event_seq
        return _json(SandboxList(items=await ctl.list_sandboxes(), last_event_seq=seq))

    async def run_sandbox(self, request: Request) -> Response:
        ctl = self.controller()
        pod = parse_pod_config(_decode_json(await _read_body(request)))
        st = await ctl.run_sandbox(pod)
        return _json(st, 201, {"location": f"/v1/sandboxes/{st.id}"})

    async def sandbox_status(self, request: Request) -> Response:
        return _json(await self.controller().sandbox_status(request.path_params["sandbox_id"]))

    async def stop_sandbox(self, request: Request) -> Response:
        ctl = self.controller()
        sandbox_id = request.path_params["sandbox_id"]
        await ctl.sandbox_status(sandbox_id)  # 404 for an unknown id
        await ctl.stop_sandbox(sandbox_id)
        return _json(await ctl.sandbox_status(sandbox_id))

    async def remove_sandbox(self, request: Request) -> Response:
        ctl = self.controller()
        sandbox_id = request.path_params["sandbox_id"]
        await ctl.sandbox_status(sandbox_id)  # 404 for an unknown id
        await ctl.remove_sandbox(sandbox_id)
        return Response(status_code=204)

    async def sandbox_graph(self, request: Request) -> Response:
        fmt = _graph_format(request)
        st = await self.controller().sandbox_status(request.path_params["sandbox_id"])
        body = await anyio.to_thread.run_sync(graph.render, fmt, st)
        return Response(body, media_type=graph.MEDIA_TYPES[fmt],
                        headers={"cache-control": "no-store"})

    async def machine_graph(self, request: Request) -> Response:
        fmt = _graph_format(request)
        body = self._machine_graphs.get(fmt)
        if body is None:
            body = self._machine_graphs[fmt] = await anyio.to_thread.run_sync(graph.render, fmt)
        return Response(body, media_type=graph.MEDIA_TYPES[fmt])


def _number(text: str | None) -> int | None:
    """`text` as a non-negative integer in ASCII digits, else None."""
    return int(text) if text is not None and re.fullmatch(r"[0-9]{1,18}", text) else None


async def _read_body(request: Request) -> bytes:
    declared = _number(request.headers.get("content-length"))
    if declared is not None and declared > MAX_BODY:
        raise PayloadTooLarge(f"request body of {declared} bytes is over {MAX_BODY}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise PayloadTooLarge(f"request body is over {MAX_BODY} bytes")
    return bytes(body)


def _decode_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise InvalidPodConfig(f"the request body is not a JSON pod config: {exc}") from None


def _graph_format(request: Request) -> str:
    fmt = request.query_params.get("format", "svg")
    if fmt not in graph.FORMATS:
        raise BadRequest(f"format {fmt!r} is not one of {', '.join(graph.FORMATS)}")
    return fmt


def _since(request: Request, ctl: Controller) -> int | None:
    """Where a stream resumes: the Last-Event-ID a reconnecting EventSource sends, else
    ?since=. A seq the controller has not reached (it restarted since) starts afresh."""
    query = request.query_params.get("since")
    since = _number(request.headers.get("last-event-id", "").strip())
    if since is None and query is not None:
        since = _number(query)
        if since is None:
            raise BadRequest(f"since={query!r} is not an event sequence number")
    return since if since is not None and since <= ctl.last_event_seq else None


class _EventStream:
    """GET /v1/events: every transition as a Server-Sent Event (`id:` its seq, `data:` the
    TransitionEvent JSON), a comment as heartbeat, until the client leaves, the server shuts
    down or the controller closes."""

    def __init__(self, shim: Shim) -> None:
        self._shim = shim

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        ctl = self._shim.controller()
        since = _since(request, ctl)
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-store"),
            (b"x-accel-buffering", b"no"),
        ]})
        if scope["method"] == "HEAD":
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        await send({"type": "http.response.body", "body": f"retry: {_SSE_RETRY_MS}\n\n".encode(),
                    "more_body": True})
        with self._shim.stream_scope():
            async with anyio.create_task_group() as tg:
                tg.start_soon(_until_disconnect, receive, tg.cancel_scope)
                await self._relay(ctl, since, send)
                tg.cancel_scope.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _relay(self, ctl: Controller, since: int | None, send: Send) -> None:
        sender, receiver = anyio.create_memory_object_stream[TransitionEvent](64)
        async with anyio.create_task_group() as tg, receiver:
            tg.start_soon(_pump, ctl, since, sender)
            while True:
                chunk = b": heartbeat\n\n"
                with anyio.move_on_after(self._shim.heartbeat):
                    try:
                        ev = await receiver.receive()
                    except anyio.EndOfStream:
                        return  # the controller closed
                    chunk = f"id: {ev.seq}\ndata: {ev.model_dump_json()}\n\n".encode()
                await send({"type": "http.response.body", "body": chunk, "more_body": True})


async def _pump(ctl: Controller, since: int | None,
                sender: anyio.abc.ObjectSendStream[TransitionEvent]) -> None:
    # Controller.events is an async generator: close it here, in the task that iterates it.
    events = cast(AsyncGenerator[TransitionEvent, None], ctl.events(since=since))
    async with sender, contextlib.aclosing(events):
        async for ev in events:
            await sender.send(ev)


async def _until_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


def create_app(ctl: Controller, *, heartbeat: float = DEFAULT_HEARTBEAT) -> Starlette:
    """The HTTP shim over `ctl`, which the caller has entered (`async with ctl`)."""
    return Shim(ctl, heartbeat=heartbeat).app


# ---------------------------------------------------------------------- OpenAPI

def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the shim; schemas come from the pydantic models."""
    ref_template = "#/components/schemas/{model}"
    _, top = models_json_schema(
        [(PodSandboxConfig, "validation"), (SandboxStatus, "serialization"),
         (SandboxList, "serialization"), (TransitionEvent, "serialization"),
         (ErrorBody, "serialization"), (Health, "serialization")],
        ref_template=ref_template, by_alias=False,
    )

    def ref(name: str) -> dict[str, Any]:
        return {"$ref": ref_template.format(model=name)}

    def json_body(name: str, description: str) -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": ref(name)}}}

    def errors(*codes: int) -> dict[str, Any]:
        meaning = {
            400: "a malformed parameter", 404: "no sandbox with that id",
            409: "a sandbox with that name, namespace, uid and attempt exists",
            413: "the body is over 1 MiB",
            422: "the pod config is refused (nothing was created)",
            500: "the run failed: `step` says which step, `leftovers` what unwinding left",
            503: "the controller is starting or recovering; retry",
        }
        return {str(c): json_body("ErrorBody", meaning[c]) for c in codes}

    sandbox_id = {"name": "sandbox_id", "in": "path", "required": True,
                  "description": "the sandbox's id (64 hex digits)", "schema": {"type": "string"}}
    fmt = {"name": "format", "in": "query", "required": False,
           "schema": {"type": "string", "enum": list(graph.FORMATS), "default": "svg"}}
    diagram = {"200": {"description": "the diagram", "content": {
        media: {"schema": {"type": "string"}} for media in graph.MEDIA_TYPES.values()}}}
    paths: dict[str, Any] = {
        "/healthz": {"get": {
            "operationId": "healthz", "summary": "Is the controller serving?",
            "responses": {"200": json_body("Health", "serving"),
                          "503": json_body("Health", "starting or recovering")}}},
        "/v1/sandboxes": {
            "get": {"operationId": "listSandboxes", "summary": "Every sandbox, oldest first",
                    "responses": {"200": json_body("SandboxList", "the sandboxes"),
                                  **errors(503)}},
            "post": {"operationId": "runSandbox",
                     "summary": "Run a sandbox from a crictl pod config, up to Ready",
                     "requestBody": {"required": True, "description": (
                         "the CRI PodSandboxConfig as `crictl runp` reads it: snake_case or "
                         "lowerCamelCase keys, enums as names or numbers"),
                         "content": {"application/json": {"schema": ref("PodSandboxConfig")}}},
                     "responses": {"201": json_body("SandboxStatus", "Ready"),
                                   **errors(409, 413, 422, 500, 503)}}},
        "/v1/sandboxes/{sandbox_id}": {
            "parameters": [sandbox_id],
            "get": {"operationId": "sandboxStatus", "summary": "One sandbox's status",
                    "responses": {"200": json_body("SandboxStatus", "its status"),
                                  **errors(404, 503)}},
            "delete": {"operationId": "removeSandbox",
                       "summary": "Stop if needed, delete everything: the sandbox disappears",
                       "responses": {"204": {"description": "removed"},
                                     **errors(404, 500, 503)}}},
        "/v1/sandboxes/{sandbox_id}/stop": {
            "parameters": [sandbox_id],
            "post": {"operationId": "stopSandbox",
                     "summary": "Kill the task, CNI DEL, unpin: NotReady (idempotent)",
                     "responses": {"200": json_body("SandboxStatus", "its status, NotReady"),
                                   **errors(404, 500, 503)}}},
        "/v1/sandboxes/{sandbox_id}/graph": {
            "parameters": [sandbox_id],
            "get": {"operationId": "sandboxGraph",
                    "summary": "The machine with this sandbox's state and path drawn on it",
                    "parameters": [fmt], "responses": {**diagram, **errors(400, 404, 503)}}},
        "/v1/graph": {"get": {
            "operationId": "machineGraph", "summary": "The state machine's diagram",
            "parameters": [fmt], "responses": {**diagram, **errors(400)}}},
        "/v1/events": {"get": {
            "operationId": "events",
            "summary": "Transitions as Server-Sent Events; `data:` is a TransitionEvent",
            "parameters": [
                {"name": "since", "in": "query", "required": False,
                 "description": "resume after this event seq (as Last-Event-ID does)",
                 "schema": {"type": "integer", "minimum": 0}},
                {"name": "Last-Event-ID", "in": "header", "required": False,
                 "schema": {"type": "string"}}],
            "responses": {"200": {"description": "the event stream", "content": {
                "text/event-stream": {"schema": {"type": "string"}}}}, **errors(400, 503)}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "podfsm", "version": __version__,
                 "description": "Pod sandboxes as finite-state machines: the HTTP shim of "
                                "`podfsm serve`, on its unix socket."},
        "paths": paths,
        "components": {"schemas": top["$defs"]},
    }


# ---------------------------------------------------------------------- serve

class _Server(uvicorn.Server):
    """uvicorn, told when shutdown begins (so event streams end instead of holding the
    graceful shutdown open), and without its own signal handling: uvicorn re-raises a caught
    signal after shutting down, which would kill the process before the Controller is left."""

    def __init__(self, config: uvicorn.Config, shim: Shim) -> None:
        super().__init__(config)
        self._shim = shim

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._shim.close_streams()
        await super().shutdown(sockets)


class Daemon:
    """`podfsm serve`: a Controller and the HTTP shim on a unix socket, and on TCP if a port is
    given. `run()` returns after a graceful shutdown (SIGTERM/SIGINT in the main thread, or
    `request_exit()` from anywhere); the sandboxes keep running.

    `controller` replaces the Controller built from `cfg` (tests pass one with fake drivers).
    """

    def __init__(self, cfg: ControllerConfig, socket_path: str | None = None,
                 host: str | None = None, port: int | None = None, *,
                 controller: Controller | None = None,
                 heartbeat: float = DEFAULT_HEARTBEAT,
                 graceful_timeout: int = DEFAULT_GRACEFUL_TIMEOUT,
                 cri_socket: str | None = None) -> None:
        if host is not None and port is None:
            raise DaemonError("a host to listen on needs a port (--port)")
        self.cfg = cfg
        self.socket_path = socket_path or DEFAULT_SOCKET
        self.host = host or "127.0.0.1"
        self.port = port
        self._ctl = controller
        #: where the CRI face listens (podfsm.faces.cri), from recovery done until shutdown;
        #: None: no CRI socket
        self.cri_socket = cri_socket
        self._heartbeat = heartbeat
        self._graceful_timeout = graceful_timeout
        #: set once the listeners accept connections (they answer 503 until the
        #: Controller has recovered)
        self.listening = threading.Event()
        #: the TCP address bound, when a port was given (port 0 picks one)
        self.tcp_address: tuple[str, int] | None = None
        self._server: _Server | None = None
        self._exit_requested = False

    def request_exit(self) -> None:
        """Begin a graceful shutdown. Safe from any thread and from a signal handler."""
        self._exit_requested = True
        if self._server is not None:
            self._server.should_exit = True

    async def run(self) -> None:
        """Listen, enter the Controller, serve until asked to exit, leave the Controller."""
        ctl = self._ctl or Controller(self.cfg)
        shim = Shim(ctl, ready=False, heartbeat=self._heartbeat)
        config = uvicorn.Config(shim.app, http="h11", ws="none", lifespan="off",
                                log_config=None, timeout_graceful_shutdown=self._graceful_timeout)
        server = self._server = _Server(config, shim)
        server.should_exit = self._exit_requested
        listeners = [bind_unix_socket(self.socket_path)]
        inode = os.lstat(self.socket_path).st_ino
        failure: list[BaseException] = []
        try:
            if self.port is not None:
                listeners.append(bind_tcp_socket(self.host, self.port))
                self.tcp_address = listeners[-1].getsockname()[:2]
            self._log_listeners()
            done = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._hold_controller, ctl, shim, done, failure)
                try:
                    with self._signals():
                        self.listening.set()
                        await server.serve(sockets=listeners)
                finally:
                    done.set()
        finally:
            _unlink_socket(self.socket_path, inode)
            for sock in listeners:
                sock.close()
            self.listening.clear()
        if failure:
            raise failure[0]

    async def _hold_controller(self, ctl: Controller, shim: Shim, done: anyio.Event,
                               failure: list[BaseException]) -> None:
        try:
            async with ctl, self._cri(ctl):
                shim.ready = True
                n = len(await ctl.list_sandboxes())
                log.info("controller ready: %d sandbox(es) recovered%s", n,
                         f", problems: {ctl.recovery_problems}" if ctl.recovery_problems else "")
                await done.wait()
                shim.ready = False
                log.info("leaving the controller; sandboxes keep running")
        except Exception as exc:
            failure.append(exc)
            self.request_exit()

    @contextlib.asynccontextmanager
    async def _cri(self, ctl: Controller) -> AsyncIterator[None]:
        """The CRI socket, there only while the recovered controller is."""
        if self.cri_socket is None:
            yield
            return
        from podfsm.faces.cri import CriServer

        server = CriServer(ctl, self.cri_socket)
        await server.start()
        try:
            yield
        finally:
            await server.stop()

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            yield
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        log.info("%s: shutting down gracefully", signal.Signals(sig).name)
        if self._server is not None and self._server.should_exit and sig == signal.SIGINT:
            self._server.force_exit = True
        self.request_exit()

    def _log_listeners(self) -> None:
        log.info("podfsm %s listening on unix socket %s (mode %o)", __version__,
                 self.socket_path, SOCKET_MODE)
        if self.tcp_address is not None:
            host, port = self.tcp_address
            shown = f"[{host}]" if ":" in host else host
            log.info("and on http://%s:%d/ (the web page is there)", shown, port)


async def serve(cfg: ControllerConfig, socket_path: str | None, host: str | None,
                port: int | None, cri_socket: str | None = None) -> None:
    """Run `podfsm serve` until SIGTERM/SIGINT: see Daemon."""
    await Daemon(cfg, socket_path, host, port, cri_socket=cri_socket).run()


def bind_unix_socket(path: str) -> socket.socket:
    """A listening unix socket at `path`, mode 0660 from the moment it exists. A stale socket
    file is replaced; a live one (another daemon answers) or any other file is refused."""
    if len(os.fsencode(path)) > 107:
        raise DaemonError(f"unix socket path {path!r} is over 107 bytes")
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
    _clear_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # bind() gives the file the socket inode's mode less the umask: narrow it first.
        os.fchmod(sock.fileno(), SOCKET_MODE)
        sock.bind(path)
        os.chmod(path, SOCKET_MODE)
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise DaemonError(f"cannot listen on unix socket {path}: {exc.strerror}") from None
    return sock


def _clear_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise DaemonError(f"{path} exists and is not a socket: refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody answers: a daemon that died left it
        return
    finally:
        probe.close()
    raise DaemonError(f"another podfsm daemon already answers on {path}")


def _unlink_socket(path: str, inode: int) -> None:
    """Remove the socket file if it is still the one we bound."""
    with contextlib.suppress(OSError):
        if os.lstat(path).st_ino == inode:
            os.unlink(path)


def bind_tcp_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port)."""
    try:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                   flags=socket.AI_PASSIVE)[0]
        return socket.create_server(addr[:2], family=family)
    except OSError as exc:
        raise DaemonError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------- the web page

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>podfsm</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; background: #fafafa; color: #212121; }
header { display: flex; gap: 1.2em; align-items: baseline; padding: .7em 1.2em;
         background: #263238; color: #eceff1; }
header h1 { font-size: 1.2em; margin: 0; }
#conn::before { content: "\\25cf  "; color: #ef5350; }
#conn.live::before { color: #66bb6a; }
main { padding: 1em 1.2em; }
#empty { color: #757575; }
#pods { display: grid; grid-template-columns: repeat(auto-fill, minmax(440px, 1fr)); gap: 1em; }
.pod { background: #fff; border: 1px solid #e0e0e0; border-radius: 8px; padding: .8em; }
.pod h2 { font-size: 1.05em; margin: 0 0 .4em; display: flex; gap: .6em; align-items: center; }
.meta { display: grid; grid-template-columns: max-content 1fr; gap: .1em .8em; font-size: .9em; }
.meta dt { color: #757575; } .meta dd { margin: 0; font-family: ui-monospace, monospace; }
.state { font-weight: bold; padding: .05em .6em; border-radius: 1em; background: #eceff1;
         font-size: .85em; }
.state[data-state="Ready"] { background: #c8e6c9; }
.state[data-state="NotReady"] { background: #ffcdd2; }
.error { color: #c62828; font-size: .85em; white-space: pre-wrap; }
.diagram svg { max-width: 100%; height: auto; }
#log { font: 12px ui-monospace, monospace; max-height: 14em; overflow: auto; background: #fff;
       border: 1px solid #e0e0e0; padding: .4em; white-space: pre; }
</style>
</head>
<body>
<header><h1>podfsm</h1><span id="conn">connecting</span><span id="count"></span></header>
<main>
<p id="empty">No sandboxes.</p>
<div id="pods"></div>
<h3>Transitions</h3>
<div id="log"></div>
<details><summary>The state machine</summary><div id="machine" class="diagram"></div></details>
</main>
<script>
"use strict";
const pods = new Map();  // sandbox id -> {el, status, drawn, ticket}
let since = null;
let source = null;
let tickets = 0;

const $ = (id) => document.getElementById(id);

function age(iso) {
  let s = Math.max(0, Math.floor((Date.now() - Date.parse(iso)) / 1000));
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + (s % 60) + "s";
  if (s < 86400) return Math.floor(s / 3600) + "h" + Math.floor((s % 3600) / 60) + "m";
  return Math.floor(s / 86400) + "d" + Math.floor((s % 86400) / 3600) + "h";
}

function field(dl, label, cls) {
  const dt = document.createElement("dt");
  dt.textContent = label;
  const dd = document.createElement("dd");
  dd.className = cls;
  dl.append(dt, dd);
}

function card(id) {
  const el = document.createElement("section");
  el.className = "pod";
  el.dataset.id = id;
  const h = document.createElement("h2");
  const name = document.createElement("span");
  name.className = "name";
  const state = document.createElement("span");
  state.className = "state";
  h.append(name, state);
  const dl = document.createElement("dl");
  dl.className = "meta";
  field(dl, "id", "id");
  field(dl, "IP", "ip");
  field(dl, "age", "age");
  field(dl, "pid", "pid");
  field(dl, "runtime", "runtime");
  const err = document.createElement("div");
  err.className = "error";
  const diagram = document.createElement("div");
  diagram.className = "diagram";
  el.append(h, dl, err, diagram);
  return el;
}

const gone = new Set();  // removed sandboxes: an answer still in flight must not bring one back

function show(st) {
  if (gone.has(st.id)) return;
  let p = pods.get(st.id);
  if (!p) {
    p = {el: card(st.id), drawn: "", ticket: 0};
    pods.set(st.id, p);
    $("pods").append(p.el);
  }
  p.status = st;
  const q = (c) => p.el.querySelector("." + c);
  q("name").textContent = st.namespace + "/" + st.name;
  q("state").textContent = st.state;
  q("state").dataset.state = st.state;
  q("id").textContent = st.id.slice(0, 13);
  q("id").title = st.id;
  q("ip").textContent = [st.ip, ...st.additional_ips].filter(Boolean).join(", ") || "-";
  q("age").textContent = age(st.created_at);
  q("pid").textContent = st.pid === null ? "-" : String(st.pid);
  q("runtime").textContent = st.runtime;
  q("error").textContent = st.last_error || "";
  const key = st.state + "/" + st.history.length;
  if (p.drawn !== key) {
    p.drawn = key;
    draw(q("diagram"), "/v1/sandboxes/" + st.id + "/graph?format=svg").catch(() => {});
  }
}

async function draw(el, url) {
  // answers may come back out of order: only the latest drawing asked for is shown
  const ticket = el.drawTicket = (el.drawTicket || 0) + 1;
  const r = await fetch(url);
  if (!r.ok) return;
  const text = await r.text();
  if (el.drawTicket !== ticket) return;
  el.innerHTML = text.slice(text.indexOf("<svg"));
}

function drop(id) {
  const p = pods.get(id);
  if (p) { p.el.remove(); pods.delete(id); }
}

function counts() {
  $("empty").hidden = pods.size > 0;
  $("count").textContent = pods.size + " sandbox" + (pods.size === 1 ? "" : "es");
}

async function refresh() {
  let r;
  try { r = await fetch("/v1/sandboxes"); } catch (e) { return false; }
  if (!r.ok) return false;
  const body = await r.json();
  since = body.last_event_seq;
  const seen = new Set();
  for (const st of body.items) { show(st); seen.add(st.id); }
  for (const id of [...pods.keys()]) if (!seen.has(id)) drop(id);
  counts();
  return true;
}

async function update(id) {
  const ticket = ++tickets;
  const r = await fetch("/v1/sandboxes/" + id);
  const p = pods.get(id);
  if (p && p.ticket > ticket) return;  // a newer answer is already shown
  if (p) p.ticket = ticket;
  if (r.status === 404) drop(id);
  else if (r.ok) show(await r.json());
  counts();
}

function note(ev) {
  const line = ev.at.slice(11, 23) + "  " + ev.sandbox_id.slice(0, 13) + "  " + ev.source +
    " -> " + ev.dest + "  (" + ev.trigger + ")" + (ev.error ? "  error: " + ev.error : "");
  const log = $("log");
  log.textContent = line + "\\n" + log.textContent.split("\\n").slice(0, 199).join("\\n");
}

function live(on, text) {
  $("conn").className = on ? "live" : "";
  $("conn").textContent = text;
}

function connect() {
  source = new EventSource("/v1/events" + (since === null ? "" : "?since=" + since));
  source.onopen = () => { live(true, "live"); refresh(); };
  source.onmessage = (m) => {
    const ev = JSON.parse(m.data);
    note(ev);
    // gone for good: the record may outlive its remove event for a moment, so do not fetch it
    if (ev.trigger === "remove") { gone.add(ev.sandbox_id); drop(ev.sandbox_id); counts(); }
    else update(ev.sandbox_id);
  };
  source.onerror = () => {
    live(false, "reconnecting");
    if (source.readyState === EventSource.CLOSED) { source.close(); setTimeout(start, 2000); }
  };
}

async function start() {
  if (await refresh()) connect();
  else { live(false, "waiting for podfsm"); setTimeout(start, 2000); }
}

setInterval(() => {
  for (const p of pods.values()) p.el.querySelector(".age").textContent = age(p.status.created_at);
}, 1000);
draw($("machine"), "/v1/graph?format=svg").catch(() => {});
start();
</script>
</body>
</html>
"""
