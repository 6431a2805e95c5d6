"""GET /v1/events: the controller's transitions as Server-Sent Events.

Bounded: at most `Shim.max_streams` streams at once (503 past it), and each has a queue of
QUEUE events between the controller and the client's connection. A client that falls that far
behind has its stream ended rather than queued for; it reconnects with Last-Event-ID (browsers'
EventSource does so by itself) and is given what it missed from the controller's backlog.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, cast

import anyio
from anyio.streams.memory import MemoryObjectSendStream
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from podfsm.controller import Controller
from podfsm.core.records import TransitionEvent
from podfsm.faces.http.errors import ServiceUnavailable, number, parse_query
from podfsm.faces.wire import EventsQuery

if TYPE_CHECKING:
    from podfsm.faces.http.app import Shim

_SSE_RETRY_MS = 2000
#: events held for one slow client before its stream is ended (it resumes from the backlog)
QUEUE = 256
#: event streams open at once; more are refused with 503
DEFAULT_MAX_STREAMS = 64


def _since(request: Request, ctl: Controller) -> int | None:
    """Where a stream resumes: the Last-Event-ID a reconnecting EventSource sends, else
    ?since=. A seq the controller has not reached (it restarted since) starts afresh."""
    query = parse_query(EventsQuery, request)
    since = number(request.headers.get("last-event-id", "").strip())
    if since is None:
        since = query.since
    return since if since is not None and since <= ctl.last_event_seq else None


class EventStream:
    """GET /v1/events: every transition as a Server-Sent Event (`id:` its seq, `data:` the
    TransitionEvent JSON), a comment as heartbeat, until the client leaves, falls QUEUE events
    behind, the server shuts down or the controller closes."""

    def __init__(self, shim: Shim) -> None:
        self._shim = shim

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        ctl = self._shim.controller()
        since = _since(request, ctl)
        if len(self._shim.streams) >= self._shim.max_streams:
            raise ServiceUnavailable(
                f"{self._shim.max_streams} event streams are open already: try again later")
        with self._shim.stream_scope():
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-store"),
                (b"x-accel-buffering", b"no"),
            ]})
            if scope["method"] == "HEAD":
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await send({"type": "http.response.body",
                        "body": f"retry: {_SSE_RETRY_MS}\n\n".encode(), "more_body": True})
            async with anyio.create_task_group() as tg:
                tg.start_soon(_until_disconnect, receive, tg.cancel_scope)
                await self._relay(ctl, since, send)
                tg.cancel_scope.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _relay(self, ctl: Controller, since: int | None, send: Send) -> None:
        sender, receiver = anyio.create_memory_object_stream[TransitionEvent](QUEUE)
        async with anyio.create_task_group() as tg, receiver:
            tg.start_soon(_pump, ctl, since, sender)
            while True:
                chunk = b": heartbeat\n\n"
                with anyio.move_on_after(self._shim.heartbeat):
                    try:
                        ev = await receiver.receive()
                    except anyio.EndOfStream:
                        tg.cancel_scope.cancel()
                        return  # the controller closed, or this client fell behind
                    chunk = f"id: {ev.seq}\ndata: {ev.model_dump_json()}\n\n".encode()
                await send({"type": "http.response.body", "body": chunk, "more_body": True})


async def _pump(ctl: Controller, since: int | None,
                sender: MemoryObjectSendStream[TransitionEvent]) -> None:
    # Controller.events is an async generator: close it here, in the task that iterates it.
    # What the backlog replays is paced by the client (it is held by the controller anyway);
    # a live event never waits for it: a full queue ends the stream (see the module's note).
    replayed = ctl.last_event_seq
    events = cast(AsyncGenerator[TransitionEvent, None], ctl.events(since=since))
    async with sender, contextlib.aclosing(events):
        async for ev in events:
            if ev.seq <= replayed:
                await sender.send(ev)
                continue
            try:
                sender.send_nowait(ev)
            except anyio.WouldBlock:
                return


async def _until_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()
