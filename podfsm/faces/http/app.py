"""The Starlette application of the HTTP face: its routes over one Controller.

The routes come from openapi.OPERATIONS, the table the document is built from: one route per
path, whose methods are exactly the document's, so a 405's `Allow` lists every method of the
resource. On TCP, guard.TcpGuard wraps the application (token, Host, Origin).
"""

from __future__ import annotations

import contextlib
import http
import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Iterator
from importlib import resources
from typing import Any, Literal

import anyio
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route, request_response
from starlette.types import ASGIApp, Receive, Scope, Send

from podfsm.controller import Controller
from podfsm.core.errors import (
    ExecTimeout,
    ImagePullError,
    InvalidImageReference,
    InvalidPodConfig,
    PodfsmError,
    SandboxNotFound,
    SandboxRunError,
    StepFailed,
    UnpackError,
)
from podfsm.core.registryhosts import auth_from_cri
from podfsm.core.spec import describe_validation_error, parse_pod_config
from podfsm.faces import graph, podgraph
from podfsm.faces.http.containers import ContainerRoutes, MalformedContainerId
from podfsm.faces.http.errors import (
    BadRequest,
    Forbidden,
    PayloadTooLarge,
    ServiceUnavailable,
    Unauthorized,
    UnsupportedMediaType,
    error_response,
    json_response,
    number,
    parse_query,
)
from podfsm.faces.http.events import DEFAULT_MAX_STREAMS, EventStream
from podfsm.faces.http.guard import TcpGuard
from podfsm.faces.http.openapi import ALLOWED, OPERATIONS, openapi_document
from podfsm.faces.wire import (
    IMAGE_ID_PATTERN,
    SANDBOX_ID_PATTERN,
    ErrorBody,
    GraphQuery,
    Health,
    ImageList,
    ImagesQuery,
    MachineGraphQuery,
    PullBody,
    RunQuery,
    SandboxList,
)

log = logging.getLogger(__name__)

#: a pod config is a few kilobytes; refuse anything this big before parsing it
MAX_BODY = 1 << 20
DEFAULT_HEARTBEAT = 15.0
#: the live web page, a static file of this package
PAGE = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")


class Shim(ContainerRoutes):
    """The HTTP face of one Controller. `app` is the ASGI application.

    `ready` False answers 503 to everything that needs the controller (as does a controller
    that is recovering); `serve` sets it once the Controller is entered. `guard` (TCP's
    token, Host and Origin checks) applies to requests that arrive on a TCP listener.
    """

    def __init__(self, ctl: Controller, *, ready: bool = True,
                 heartbeat: float = DEFAULT_HEARTBEAT,
                 max_streams: int = DEFAULT_MAX_STREAMS) -> None:
        self.ctl = ctl
        self.ready = ready
        self.heartbeat = heartbeat
        self.max_streams = max_streams
        #: the cancel scopes of the open event streams
        self.streams: set[anyio.CancelScope] = set()
        self._closing = False
        self._machine_graphs: dict[str, bytes] = {}
        #: the document, and the host facts it was made with (made again when they change)
        self._openapi: tuple[Any, bytes] | None = None
        routes = [Route("/", self.page, methods=["GET"]),
                  Route("/openapi.json", self.openapi, methods=["GET"])]
        routes += [Route(path, _Resource(path, {op.method.upper(): self._endpoint(op.handler)
                                                for op in OPERATIONS if op.path == path}))
                   for path in ALLOWED]
        # what no route above takes under /v1/sandboxes/ ("%2F", "a/b", "") has a malformed id
        routes.append(Route("/v1/sandboxes/{sandbox_id:path}", _MalformedId()))
        routes.append(Route("/v1/images/{image_id:path}", _MalformedImageId()))
        routes.append(Route("/v1/containers/{container_id:path}", MalformedContainerId()))
        self.starlette = Starlette(
            routes=routes,
            exception_handlers={
                PodfsmError: self._on_error,
                ValidationError: self._on_error,
                HTTPException: self._on_http_exception,
                Exception: self._on_crash,  # a bug: answer JSON too, log the trace
            },
        )
        # "/v1/sandboxes/%2F" and the like are malformed ids (400), not redirects
        self.starlette.router.redirect_slashes = False
        #: None on the unix socket only; `Daemon` sets it when it listens on TCP
        self.guard: TcpGuard | None = None
        self.app: ASGIApp = self._app

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server")
        if self.guard is not None and scope["type"] == "http" and server and server[1]:
            try:
                await self.guard(scope, receive, send, self.starlette)
            except (Unauthorized, Forbidden) as exc:
                await error_response(exc)(scope, receive, send)
            return
        await self.starlette(scope, receive, send)

    def _endpoint(self, name: str) -> ASGIApp:
        if name == "events":
            return EventStream(self)
        handler: Callable[[Request], Awaitable[Response]] = getattr(self, name)
        return request_response(handler)

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
        for scope in list(self.streams):
            scope.cancel()

    @contextlib.contextmanager
    def stream_scope(self) -> Iterator[anyio.CancelScope]:
        """A cancel scope that close_streams() cancels."""
        with anyio.CancelScope() as scope:
            self.streams.add(scope)
            try:
                yield scope
            finally:
                self.streams.discard(scope)

    async def _on_error(self, request: Request, exc: Exception) -> Response:
        if isinstance(exc, PodfsmError) and error_response(exc).status_code >= 500 and not (
                isinstance(exc, SandboxRunError | ServiceUnavailable | ImagePullError
                           | UnpackError | StepFailed | ExecTimeout)):
            return await self._on_crash(request, exc)
        if isinstance(exc, PodfsmError) and not isinstance(exc, ServiceUnavailable | BadRequest):
            log.log(logging.ERROR if isinstance(exc, SandboxRunError) else logging.INFO,
                    "%s %s: %s", request.method, _shown_path(request), exc)
        return error_response(exc)

    async def _on_crash(self, request: Request, exc: Exception) -> Response:
        # The text of an unexpected exception may name host paths and internals: it goes to
        # the log, under an incident number that the answer gives.
        incident = secrets.token_hex(4)
        log.error("%s %s: incident %s", request.method, _shown_path(request), incident,
                  exc_info=exc)
        return json_response(ErrorBody(
            error=f"internal error (incident {incident}: the daemon's log has the details)",
            kind="InternalError"), 500)

    async def _on_http_exception(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = http.HTTPStatus(exc.status_code).phrase.replace(" ", "")
        return json_response(ErrorBody(error=f"{request.method} {_shown_path(request)}: "
                                       f"{exc.detail}", kind=kind),
                             exc.status_code, dict(exc.headers or {}))

    # ------------------------------------------------------------------ endpoints

    async def read_json(self, request: Request) -> Any:
        """The request's body, decoded JSON (application/json, at most MAX_BODY)."""
        _require_json(request, empty_too=True)
        body = await _read_body(request)
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise BadRequest(f"the request body is not JSON: {exc}") from None

    async def page(self, request: Request) -> Response:
        return HTMLResponse(PAGE, headers={"cache-control": "no-cache"})

    async def healthz(self, request: Request) -> Response:
        status: Literal["ok", "starting", "recovering"] = (
            "starting" if not self.ready or self._closing
            else "recovering" if self.ctl.recovering else "ok")
        return json_response(Health(status=status), 200 if status == "ok" else 503)

    async def openapi(self, request: Request) -> Response:
        host_facts = getattr(self.ctl, "host_facts", None)
        facts = await host_facts() if host_facts is not None and self.ready else None
        if self._openapi is None or self._openapi[0] != facts:
            doc = openapi_document(getattr(self.ctl, "runtime_handlers", None),
                                   getattr(self.ctl, "config", None), facts)
            self._openapi = (facts, json.dumps(doc).encode())
        return Response(self._openapi[1], media_type="application/json")

    async def list_sandboxes(self, request: Request) -> Response:
        ctl = self.controller()
        seq = ctl.last_event_seq
        return json_response(SandboxList(items=await ctl.list_sandboxes(), last_event_seq=seq))

    async def run_sandbox(self, request: Request) -> Response:
        ctl = self.controller()
        _require_json(request, empty_too=True)
        pod = parse_pod_config(_decode_json(await _read_body(request)))
        query = parse_query(RunQuery, request)
        st = await ctl.run_sandbox(pod, runtime_handler=query.runtime_handler or None)
        return json_response(st, 201, {"location": f"/v1/sandboxes/{st.id}"})

    async def sandbox_status(self, request: Request) -> Response:
        ctl = self.controller()
        return json_response(await ctl.sandbox_status(_sandbox_id(request)))

    async def stop_sandbox(self, request: Request) -> Response:
        # As the CRI's StopPodSandbox (and crictl stopp): stopping what is not there succeeds.
        ctl = self.controller()
        sandbox_id = _sandbox_id(request)
        try:
            await ctl.stop_sandbox(sandbox_id)
            return json_response(await ctl.sandbox_status(sandbox_id))
        except SandboxNotFound:
            return Response(status_code=204)

    async def remove_sandbox(self, request: Request) -> Response:
        # As the CRI's RemovePodSandbox: removing what is not there succeeds.
        ctl = self.controller()
        await ctl.remove_sandbox(_sandbox_id(request))
        return Response(status_code=204)

    async def sandbox_graph(self, request: Request) -> Response:
        ctl = self.controller()
        fmt = parse_query(GraphQuery, request).format
        st = await ctl.sandbox_status(_sandbox_id(request))
        ctrs = await ctl.list_containers(sandbox_id=st.id)
        body = await (anyio.to_thread.run_sync(podgraph.render_pod, fmt, st, ctrs) if ctrs
                      else anyio.to_thread.run_sync(graph.render, fmt, st))
        return Response(body, media_type=graph.MEDIA_TYPES[fmt],
                        headers={"cache-control": "no-store"})

    async def machine_graph(self, request: Request) -> Response:
        query = parse_query(MachineGraphQuery, request)
        fmt, key = query.format, f"{query.format}/{query.machine}"
        body = self._machine_graphs.get(key)
        if body is None:
            render = podgraph.render_containers if query.machine == "container" else graph.render
            body = self._machine_graphs[key] = await anyio.to_thread.run_sync(render, fmt)
        return Response(body, media_type=graph.MEDIA_TYPES[fmt])


    async def list_images(self, request: Request) -> Response:
        ctl = self.controller()
        query = parse_query(ImagesQuery, request)
        try:
            items = await ctl.list_images(query.image or None)
        except InvalidImageReference:
            items = []
        return json_response(ImageList(items=items))

    async def pull_image(self, request: Request) -> Response:
        ctl = self.controller()
        _require_json(request, empty_too=True)
        try:
            body = PullBody.model_validate(_decode_json(await _read_body(request)))
        except ValidationError as exc:
            raise InvalidImageReference(f"bad pull request: {describe_validation_error(exc)}"
                                        ) from None
        a = body.auth
        auth = auth_from_cri(a.username, a.password, a.auth, a.identity_token,
                             a.registry_token) if a else None
        img = await ctl.pull_image(body.image, auth)
        return json_response(img, 201, {"location": f"/v1/images/{img.id}"})

    async def image_status(self, request: Request) -> Response:
        ctl = self.controller()
        return json_response(await ctl.image_status(_image_id(request)))

    async def remove_image(self, request: Request) -> Response:
        ctl = self.controller()
        await ctl.remove_image(_image_id(request))
        return Response(status_code=204)


class _Resource:
    """One path's methods; any other method is 405 with an `Allow` listing all of them."""

    def __init__(self, path: str, methods: dict[str, ASGIApp]) -> None:
        if "GET" in methods:
            methods.setdefault("HEAD", methods["GET"])
        self._methods = methods
        self._allow = ", ".join(ALLOWED[path])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = self._methods.get(scope["method"])
        if app is None:
            raise HTTPException(405, headers={"allow": self._allow})
        if scope["method"] == "POST":
            _require_json(Request(scope), empty_too=False)
        await app(scope, receive, send)


class _MalformedId:
    """Any method on a path under /v1/sandboxes/ that no resource takes: a 400."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        _sandbox_id(Request(scope))
        raise HTTPException(404)  # an id with no slash never gets here


class _MalformedImageId:
    """Any method on a path under /v1/images/ that no resource takes: a 400."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        _image_id(Request(scope))
        raise HTTPException(404)


def _sandbox_id(request: Request) -> str:
    sandbox_id: str = request.path_params["sandbox_id"]
    if not re.fullmatch(SANDBOX_ID_PATTERN.strip("^$"), sandbox_id):
        # never echoed: it may be of any length (up to what h11 takes) and hold anything
        what = "empty" if not sandbox_id else f"{len(sandbox_id)} characters"
        raise BadRequest(f"the id in the path is not a sandbox id ({what}; an id is 64 "
                         "lower-case hex digits)")
    return sandbox_id


#: the longest request path an error or a log line shows whole
SHOWN_PATH_MAX = 160


def _shown_path(request: Request) -> str:
    """The request's path for an error or a log line: cut after SHOWN_PATH_MAX characters
    (a path may be as long as h11 takes, ~16 KiB), saying how long it was."""
    path = request.url.path
    if len(path) <= SHOWN_PATH_MAX:
        return path
    return f"{path[:SHOWN_PATH_MAX]}... ({len(path)} characters)"


def _image_id(request: Request) -> str:
    image_id: str = request.path_params["image_id"]
    if not re.fullmatch(IMAGE_ID_PATTERN.strip("^$"), image_id):
        raise BadRequest(f"{image_id[:80]!r} is not an image id (sha256: and 64 lower-case hex "
                         "digits, or the digits alone)")
    return image_id if image_id.startswith("sha256:") else f"sha256:{image_id}"


def _require_json(request: Request, *, empty_too: bool) -> None:
    """Refuse a POST body that is not application/json (a cross-site form or text/plain
    request cannot send one without a CORS preflight, which podfsm never grants)."""
    headers = request.headers
    has_body = number(headers.get("content-length")) not in (None, 0) or (
        "transfer-encoding" in headers)
    if not (has_body or empty_too):
        return
    media = headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise UnsupportedMediaType(
            f"the request body must be application/json, not {media or 'untyped'}")


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


def create_app(ctl: Controller, *, heartbeat: float = DEFAULT_HEARTBEAT) -> ASGIApp:
    """The HTTP shim over `ctl`, which the caller has entered (`async with ctl`)."""
    return Shim(ctl, heartbeat=heartbeat).app
