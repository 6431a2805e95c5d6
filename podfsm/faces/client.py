"""A small async client of `podfsm serve` over its unix socket; the CLI verbs use it.

    async with Client("/run/podfsm/podfsm.sock") as c:
        st = await c.run_sandbox(pod_json)
        async for ev in c.events(since=0): ...

Failures are two kinds: DaemonUnreachable (nothing answers on the socket, or the connection
broke) and ApiError (the daemon answered with an error; `status`, `kind` and `message` are its).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any

import anyio
import httpx
from pydantic import ValidationError

from podfsm.core.containerrecords import ContainerStatus
from podfsm.core.errors import PodfsmError, id_problem
from podfsm.core.images import ImageRecord
from podfsm.core.records import SandboxStatus, TransitionEvent
from podfsm.faces.wire import (
    DEFAULT_SOCKET,
    ContainerList,
    ContainerStatsBody,
    ErrorBody,
    ExecResponse,
    ImageList,
    SandboxList,
)

__all__ = ["DEFAULT_SOCKET", "ApiError", "Client", "DaemonUnreachable", "resolve_socket"]
SOCKET_ENV = "PODFSM_SOCKET"
_FULL_ID_LEN = 64


def resolve_socket(explicit: str | None = None) -> str:
    """The daemon's socket: `explicit` (--socket), else $PODFSM_SOCKET, else the default."""
    return explicit or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


class DaemonUnreachable(PodfsmError):
    """Nothing answers on the socket (or the connection broke)."""

    def __init__(self, socket_path: str, reason: str) -> None:
        super().__init__(f"no podfsm daemon answers on {socket_path} ({reason}): "
                         "start one with `podfsm serve`")
        self.socket_path = socket_path
        self.reason = reason


class ApiError(PodfsmError):
    """The daemon answered with an error."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


class Client:
    """The HTTP API of `podfsm serve`, over its unix socket.

    While the daemon answers 503 (it is starting or recovering), requests are retried for up
    to `wait_ready` seconds; nothing was done by a request that got 503, so this is safe.
    """

    def __init__(self, socket_path: str | None = None, *, timeout: float = 120.0,
                 wait_ready: float = 10.0) -> None:
        self.socket_path = resolve_socket(socket_path)
        self._wait_ready = wait_ready
        self._http = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(uds=self.socket_path),
            base_url="http://podfsm",
            timeout=httpx.Timeout(timeout, connect=5.0),
        )

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ------------------------------------------------------------------ the API

    async def run_sandbox(self, pod: Mapping[str, Any], *,
                          runtime_handler: str | None = None) -> SandboxStatus:
        """Run a sandbox from a pod config (decoded JSON) and return its status (Ready);
        `runtime_handler` ("runc", "crun") overrides the daemon's default runtime."""
        params = {"runtime_handler": runtime_handler} if runtime_handler else None
        resp = await self._send("POST", "/v1/sandboxes", json=dict(pod), params=params)
        return SandboxStatus.model_validate_json(resp.content)

    async def list_sandboxes(self) -> list[SandboxStatus]:
        resp = await self._send("GET", "/v1/sandboxes")
        return SandboxList.model_validate_json(resp.content).items

    async def sandbox_status(self, sandbox_id: str) -> SandboxStatus:
        resp = await self._send("GET", f"/v1/sandboxes/{sandbox_id}")
        return SandboxStatus.model_validate_json(resp.content)

    async def stop_sandbox(self, sandbox_id: str) -> SandboxStatus | None:
        """Stop it: its status (NotReady), or None when there is no such sandbox (stopping
        is idempotent, as the CRI's StopPodSandbox)."""
        resp = await self._send("POST", f"/v1/sandboxes/{sandbox_id}/stop")
        return None if resp.status_code == 204 else SandboxStatus.model_validate_json(
            resp.content)

    async def remove_sandbox(self, sandbox_id: str) -> None:
        """Remove it; an unknown id is removed already (idempotent, as RemovePodSandbox)."""
        await self._send("DELETE", f"/v1/sandboxes/{sandbox_id}")

    async def graph(self, fmt: str, sandbox_id: str | None = None) -> bytes:
        """The machine's diagram, or the sandbox's, in `fmt` (mmd, dot, svg or png)."""
        path = "/v1/graph" if sandbox_id is None else f"/v1/sandboxes/{sandbox_id}/graph"
        resp = await self._send("GET", path, params={"format": fmt})
        return resp.content

    async def events(self, since: int | None = None) -> AsyncIterator[TransitionEvent]:
        """Every transition from now on (after seq `since`, when given), until the daemon
        ends the stream."""
        params = {} if since is None else {"since": str(since)}
        await self._ready()
        try:
            async with self._http.stream("GET", "/v1/events", params=params,
                                         timeout=httpx.Timeout(None, connect=5.0)) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    raise _api_error(resp)
                data: list[str] = []
                async for line in resp.aiter_lines():
                    if line:
                        name, _, value = line.partition(":")
                        if name == "data":
                            data.append(value.removeprefix(" "))
                    elif data:
                        yield TransitionEvent.model_validate_json("\n".join(data))
                        data = []
        except httpx.TransportError as exc:
            raise DaemonUnreachable(self.socket_path, _reason(exc)) from None

    async def pull_image(self, reference: str, auth: Mapping[str, str] | None = None,
                         ) -> ImageRecord:
        """Pull an image; its record. `auth`: the CRI AuthConfig's fields (username,
        password, auth, identity_token, registry_token)."""
        body: dict[str, Any] = {"image": reference}
        if auth:
            body["auth"] = dict(auth)
        resp = await self._send("POST", "/v1/images", json=body)
        return ImageRecord.model_validate_json(resp.content)

    async def list_images(self, reference: str | None = None) -> list[ImageRecord]:
        """Every image, or only the one `reference` names (any name, id or id prefix)."""
        params = {"image": reference} if reference else None
        resp = await self._send("GET", "/v1/images", params=params)
        return ImageList.model_validate_json(resp.content).items

    async def image_status(self, image_id: str) -> ImageRecord:
        resp = await self._send("GET", f"/v1/images/{image_id}")
        return ImageRecord.model_validate_json(resp.content)

    async def remove_image(self, image_id: str) -> None:
        """Remove it (every name); an unknown id is removed already."""
        await self._send("DELETE", f"/v1/images/{image_id}")

    async def resolve_id(self, id_or_prefix: str) -> str:
        """A full sandbox id from a unique prefix of one (as crictl takes them). What is no
        id nor a prefix of one is refused before any request (ApiError 400), never echoed."""
        problem = id_problem(id_or_prefix)
        if problem is not None:
            raise ApiError(400, "BadRequest", f"the id given is {problem}")
        if len(id_or_prefix) == _FULL_ID_LEN:
            return id_or_prefix
        matches = [st.id for st in await self.list_sandboxes() if st.id.startswith(id_or_prefix)]
        if not matches:
            raise ApiError(404, "SandboxNotFound", f"pod sandbox {id_or_prefix!r} not found")
        if len(matches) > 1:
            raise ApiError(409, "AmbiguousId",
                           f"{id_or_prefix!r} is the start of {len(matches)} sandbox ids")
        return matches[0]

    # ------------------------------------------------------------------ containers

    async def create_container(self, sandbox_id: str, config: Mapping[str, Any]
                               ) -> ContainerStatus:
        """Create a container (a CRI ContainerConfig, decoded JSON) in the sandbox; its
        status, Created."""
        resp = await self._send("POST", "/v1/containers",
                                json={"sandbox_id": sandbox_id, "config": dict(config)})
        return ContainerStatus.model_validate_json(resp.content)

    async def list_containers(self, *, id_prefix: str = "", sandbox_id: str = "",
                              state: str | None = None,
                              labels: Mapping[str, str] | None = None
                              ) -> list[ContainerStatus]:
        """The containers, oldest first, filtered as the CRI's ContainerFilter."""
        params = {k: v for k, v in (("id", id_prefix), ("sandbox_id", sandbox_id),
                                    ("state", state or ""),
                                    ("label", ",".join(f"{k}={v}" for k, v in
                                                       (labels or {}).items()))) if v}
        resp = await self._send("GET", "/v1/containers", params=params)
        return ContainerList.model_validate_json(resp.content).items

    async def container_status(self, container_id: str) -> ContainerStatus:
        resp = await self._send("GET", f"/v1/containers/{container_id}")
        return ContainerStatus.model_validate_json(resp.content)

    async def container_info(self, container_id: str) -> dict[str, Any]:
        """The verbose status's info: pid, the OCI spec, the record's history."""
        resp = await self._send("GET", f"/v1/containers/{container_id}/info")
        info: dict[str, Any] = resp.json()
        return info

    async def start_container(self, container_id: str) -> ContainerStatus:
        resp = await self._send("POST", f"/v1/containers/{container_id}/start")
        return ContainerStatus.model_validate_json(resp.content)

    async def stop_container(self, container_id: str, timeout: int = 0) -> ContainerStatus:
        """Stop it: the stop signal, SIGKILL after `timeout` s; its status, Exited."""
        resp = await self._send("POST", f"/v1/containers/{container_id}/stop",
                                params={"timeout": str(timeout)})
        return ContainerStatus.model_validate_json(resp.content)

    async def remove_container(self, container_id: str) -> None:
        """Remove it (a running one is killed); an unknown id is removed already."""
        await self._send("DELETE", f"/v1/containers/{container_id}")

    async def exec_sync(self, container_id: str, cmd: list[str], timeout: int = 0
                        ) -> ExecResponse:
        """Run `cmd` in the container to its end: its exit code, stdout and stderr."""
        resp = await self._send("POST", f"/v1/containers/{container_id}/exec",
                                json={"cmd": cmd, "timeout": timeout},
                                timeout=httpx.Timeout(None if timeout == 0 else timeout + 30,
                                                      connect=5.0))
        return ExecResponse.model_validate_json(resp.content)

    async def container_stats(self, container_id: str) -> ContainerStatsBody:
        resp = await self._send("GET", f"/v1/containers/{container_id}/stats")
        return ContainerStatsBody.model_validate_json(resp.content)

    async def container_logs(self, container_id: str, *, follow: bool = False,
                             tail: int = -1) -> AsyncIterator[str]:
        """The lines of the container's CRI log (`<time> <stream> <P|F> <text>`); with
        `follow`, new ones until the container has exited."""
        await self._ready()
        params = {"follow": "true" if follow else "false", "tail": str(tail)}
        try:
            async with self._http.stream("GET", f"/v1/containers/{container_id}/logs",
                                         params=params,
                                         timeout=httpx.Timeout(None, connect=5.0)) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    raise _api_error(resp)
                async for line in resp.aiter_lines():
                    yield line
        except httpx.TransportError as exc:
            raise DaemonUnreachable(self.socket_path, _reason(exc)) from None

    async def resolve_container_id(self, id_or_prefix: str) -> str:
        """A full container id from a unique prefix of one (as crictl takes them)."""
        if len(id_or_prefix) == _FULL_ID_LEN:
            return id_or_prefix
        matches = [st.id for st in await self.list_containers(id_prefix=id_or_prefix)] \
            if id_or_prefix and all(ch in "0123456789abcdef" for ch in id_or_prefix) else []
        if not matches:
            raise ApiError(404, "ContainerNotFound", f"container {id_or_prefix!r} not found")
        if len(matches) > 1:
            raise ApiError(409, "AmbiguousId",
                           f"{id_or_prefix!r} is the start of {len(matches)} container ids")
        return matches[0]

    # ------------------------------------------------------------------ plumbing

    async def _ready(self) -> None:
        """Wait while the daemon answers 503 (starting, recovering)."""
        await self._send("GET", "/healthz")

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        deadline = anyio.current_time() + self._wait_ready
        while True:
            try:
                resp = await self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                raise DaemonUnreachable(self.socket_path, _reason(exc)) from None
            if resp.is_success:
                return resp
            if resp.status_code != 503 or anyio.current_time() >= deadline:
                raise _api_error(resp)
            await anyio.sleep(_retry_after(resp))


def _api_error(resp: httpx.Response) -> ApiError:
    try:
        body = ErrorBody.model_validate_json(resp.content)
        return ApiError(resp.status_code, body.kind, body.error)
    except ValidationError:
        text = resp.text.strip() or resp.reason_phrase
        return ApiError(resp.status_code, "HTTPError", f"HTTP {resp.status_code}: {text}")


def _retry_after(resp: httpx.Response) -> float:
    value = resp.headers.get("retry-after", "")
    return min(float(value), 1.0) if value.isdigit() else 0.2


def _reason(exc: httpx.TransportError) -> str:
    """The OS's words for a failed connection (e.g. "No such file or directory")."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    return str(exc) or type(exc).__name__
