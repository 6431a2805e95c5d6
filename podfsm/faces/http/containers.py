"""The container routes of the HTTP face (/v1/containers), a mixin of app.Shim: each one
Controller call, the bodies of wire.py.

    POST   /v1/containers                       create: 201 + its status (Created)
    GET    /v1/containers                       {"items": [...]}, ?id= ?sandbox_id= ?state= ?label=
    GET    /v1/containers/{id}                  its status
    GET    /v1/containers/{id}/info             the verbose info (pid, OCI spec, history)
    POST   /v1/containers/{id}/start            start: its status (Running)
    POST   /v1/containers/{id}/stop?timeout=S   stop: its status (Exited)
    DELETE /v1/containers/{id}                  remove: 204 (idempotent)
    POST   /v1/containers/{id}/exec             {"cmd": [...], "timeout": S}: exit code + output
    GET    /v1/containers/{id}/logs             the CRI log's lines (text/plain); ?follow=true
                                                streams until the container has exited; ?tail=N
    GET    /v1/containers/{id}/stats            cpu, memory working set, writable layer
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from podfsm.core.containerspec import parse_container_config
from podfsm.core.errors import ContainerPrecondition, InvalidContainerConfig
from podfsm.faces.http.errors import BadRequest, json_response, parse_query
from podfsm.faces.wire import (
    CONTAINER_ID_PATTERN,
    SANDBOX_ID_PATTERN,
    ContainerList,
    ContainersQuery,
    ContainerStatsBody,
    ExecBody,
    ExecResponse,
    LogsQuery,
    StopQuery,
)

if TYPE_CHECKING:
    from podfsm.controller import Controller

#: the keys a create body takes
_CREATE_KEYS = {"sandbox_id", "config"}


class ContainerRoutes:
    """The container endpoints; `controller()`, `stream_scope()` and the body readers are
    Shim's."""

    if TYPE_CHECKING:
        from contextlib import AbstractContextManager

        import anyio

        def controller(self) -> Controller: ...
        def stream_scope(self) -> AbstractContextManager[anyio.CancelScope]: ...
        async def read_json(self, request: Request) -> Any: ...

    async def create_container(self, request: Request) -> Response:
        ctl = self.controller()
        body = await self.read_json(request)
        if not isinstance(body, dict):
            raise InvalidContainerConfig("the body must be a JSON object with `sandbox_id` "
                                         "and `config`")
        unknown = sorted(set(body) - _CREATE_KEYS)
        missing = sorted(_CREATE_KEYS - set(body))
        if unknown or missing:
            raise InvalidContainerConfig(
                "; ".join([*(f"{k}: unknown field" for k in unknown),
                           *(f"{k}: missing" for k in missing)]))
        sandbox_id = body["sandbox_id"]
        if not isinstance(sandbox_id, str) or not re.fullmatch(SANDBOX_ID_PATTERN.strip("^$"),
                                                                sandbox_id):
            raise InvalidContainerConfig("sandbox_id: not a sandbox id (64 lower-case hex "
                                         "digits)")
        await ctl.sandbox_status(sandbox_id)  # no such sandbox: 404 whatever the config says
        cfg = parse_container_config(body["config"])
        cid = await ctl.create_container(sandbox_id, cfg)
        return json_response(await ctl.container_status(cid), 201,
                             {"location": f"/v1/containers/{cid}"})

    async def list_containers(self, request: Request) -> Response:
        ctl = self.controller()
        q = parse_query(ContainersQuery, request)
        labels: dict[str, str] = {}
        for part in filter(None, q.label.split(",")):
            key, _, value = part.partition("=")  # the query model's pattern: key=value,...
            labels[key] = value
        items = await ctl.list_containers(
            id_prefix=q.id or None, sandbox_id=q.sandbox_id or None,
            state=None if q.state is None else [q.state], labels=labels or None)
        return json_response(ContainerList(items=items))

    async def container_status(self, request: Request) -> Response:
        ctl = self.controller()
        return json_response(await ctl.container_status(container_id(request)))

    async def container_info(self, request: Request) -> Response:
        ctl = self.controller()
        info = await ctl.container_info(container_id(request))
        return Response(json.dumps(info), media_type="application/json")

    async def start_container(self, request: Request) -> Response:
        ctl = self.controller()
        cid = container_id(request)
        await ctl.start_container(cid)
        return json_response(await ctl.container_status(cid))

    async def stop_container(self, request: Request) -> Response:
        ctl = self.controller()
        cid = container_id(request)
        q = parse_query(StopQuery, request)
        await ctl.stop_container(cid, float(q.timeout))
        return json_response(await ctl.container_status(cid))

    async def remove_container(self, request: Request) -> Response:
        ctl = self.controller()
        await ctl.remove_container(container_id(request))
        return Response(status_code=204)

    async def exec_sync(self, request: Request) -> Response:
        ctl = self.controller()
        cid = container_id(request)
        try:
            body = ExecBody.model_validate(await self.read_json(request))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}"
                                 for e in exc.errors())
            raise BadRequest(f"bad exec request: {problems}") from None
        res = await ctl.exec_sync(cid, body.cmd, float(body.timeout))
        return json_response(ExecResponse(exit_code=res.exit_code, stdout=res.stdout,
                                          stderr=res.stderr))

    async def container_stats(self, request: Request) -> Response:
        ctl = self.controller()
        s = await ctl.container_stats(container_id(request))
        cg = s.cgroup
        return json_response(ContainerStatsBody(
            id=s.status.id, name=s.status.name, timestamp_ns=s.timestamp_ns,
            cpu_usage_ns=cg.cpu_usage_ns if cg else None,
            memory_working_set_bytes=cg.memory_working_set_bytes if cg else None,
            memory_usage_bytes=cg.memory_usage_bytes if cg else None,
            writable_bytes=s.writable_bytes, writable_inodes=s.writable_inodes))

    async def container_logs(self, request: Request) -> Response:
        ctl = self.controller()
        q = parse_query(LogsQuery, request)
        st = await ctl.container_status(container_id(request))
        if not st.log_path:
            raise ContainerPrecondition(f"container {st.id} has no log_path (its config "
                                        "named none)")
        skip = 0
        tail: collections.deque[str] | None = None
        if q.tail >= 0:  # the last lines of what is there now, then (following) what comes
            tail = collections.deque(maxlen=q.tail)
            async for line in ctl.container_logs(st.id):
                tail.append(line)
                skip += 1

        async def lines() -> AsyncIterator[bytes]:
            with self.stream_scope():
                if tail is not None:
                    for line in tail:
                        yield (line + "\n").encode()
                    if not q.follow:
                        return
                seen = 0
                async for line in ctl.container_logs(st.id, follow=q.follow):
                    seen += 1
                    if seen > skip:
                        yield (line + "\n").encode()

        return StreamingResponse(lines(), media_type="text/plain; charset=utf-8",
                                 headers={"cache-control": "no-store",
                                          "x-content-type-options": "nosniff"})


def container_id(request: Request) -> str:
    cid: str = request.path_params["container_id"]
    if not re.fullmatch(CONTAINER_ID_PATTERN.strip("^$"), cid):
        raise BadRequest(f"{cid!r} is not a container id (64 lower-case hex digits)")
    return cid


class MalformedContainerId:
    """Any method on a path under /v1/containers/ that no resource takes: a 400."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        from starlette.exceptions import HTTPException

        container_id(Request(scope))
        raise HTTPException(404)
