"""The Starlette application of the HTTP face: its routes over one Controller."""

from __future__ import annotations

import contextlib
import http
import json
import logging
from collections.abc import Iterator
from importlib import resources
from typing import Any, Literal

import anyio
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from podfsm.controller import Controller
from podfsm.core.errors import InvalidPodConfig, PodfsmError, SandboxRunError
from podfsm.core.spec import parse_pod_config
from podfsm.faces import graph
from podfsm.faces.http.errors import (
    BadRequest,
    PayloadTooLarge,
    ServiceUnavailable,
    error_response,
    json_response,
    number,
)
from podfsm.faces.http.events import EventStream
from podfsm.faces.http.openapi import openapi_document
from podfsm.faces.wire import ErrorBody, Health, SandboxList

log = logging.getLogger(__name__)

#: a pod config is a few kilobytes; refuse anything this big before parsing it
MAX_BODY = 1 << 20
DEFAULT_HEARTBEAT = 15.0
#: the live web page, a static file of this package
PAGE = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")


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
                Route("/v1/events", EventStream(self), methods=["GET"]),
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
        return json_response(ErrorBody(error=f"internal error: {type(exc).__name__}: {exc}",
                               kind="InternalError"), 500)

    async def _on_http_exception(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = http.HTTPStatus(exc.status_code).phrase.replace(" ", "")
        return json_response(ErrorBody(error=f"{request.method} {request.url.path}: {exc.detail}",
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
        return json_response(body, 200 if status == "ok" else 503)

    async def openapi(self, request: Request) -> Response:
        return Response(json.dumps(self._openapi), media_type="application/json")

    async def list_sandboxes(self, request: Request) -> Response:
        ctl = self.controller()
        seq = ctl.last_event_seq
        return json_response(SandboxList(items=await ctl.list_sandboxes(), last_event_seq=seq))

    async def run_sandbox(self, request: Request) -> Response:
        ctl = self.controller()
        pod = parse_pod_config(_decode_json(await _read_body(request)))
        handler = request.query_params.get("runtime_handler") or None
        st = await ctl.run_sandbox(pod, runtime_handler=handler)
        return json_response(st, 201, {"location": f"/v1/sandboxes/{st.id}"})

    async def sandbox_status(self, request: Request) -> Response:
        sandbox_id = request.path_params["sandbox_id"]
        return json_response(await self.controller().sandbox_status(sandbox_id))

    async def stop_sandbox(self, request: Request) -> Response:
        ctl = self.controller()
        sandbox_id = request.path_params["sandbox_id"]
        await ctl.sandbox_status(sandbox_id)  # 404 for an unknown id
        await ctl.stop_sandbox(sandbox_id)
        return json_response(await ctl.sandbox_status(sandbox_id))

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


async def _read_body(request: Request) -> bytes:
    declared = number(request.headers.get("content-length"))
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



def create_app(ctl: Controller, *, heartbeat: float = DEFAULT_HEARTBEAT) -> Starlette:
    """The HTTP shim over `ctl`, which the caller has entered (`async with ctl`)."""
    return Shim(ctl, heartbeat=heartbeat).app

