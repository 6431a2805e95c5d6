"""Calls that their caller's cancellation cannot cut short in the middle of a step.

The controller's steps whose work goes on elsewhere once begun (a namespace worker's fork, a
command in the reaper, a record's write) are shielded with anyio cancel scopes, and the
unwinding of a failed run is shielded too. Those shields hold against anyio's cancellation (a
cancelled scope or task group, `move_on_after`), but not against a native `Task.cancel()`,
which asyncio throws into whatever the task awaits, shield or not. That is how grpc.aio ends a
handler whose client's deadline passed, and how `asyncio.timeout` and `asyncio.wait_for` end
what they wrap: the step was abandoned while its command ran on, and the unwinding ran beside
it (a portmap ADD and its DEL at once; a `crun create` whose container appeared after its
delete).

So a call runs in a task of its own, which nothing but its CallGroup cancels. The caller's
cancellation, of either kind, becomes the cancellation of that task's anyio scope, which the
shields inside honour: the step in progress finishes, the next step is not begun, and a run
unwinds exactly as a failed run does (what containerd does: its RunPodSandbox's steps take the
client's context, its deferred clean-ups a context detached from it). The caller then waits,
shielded, for the call to end, and raises its cancellation: when it is gone, what the call
started is finished or undone, never half-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

log = logging.getLogger(__name__)

R = TypeVar("R")


class CallGroup:
    """The calls in flight of one owner (the Controller, a face), each in its own task."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._calls: dict[asyncio.Task[Any], anyio.CancelScope] = {}

    def __len__(self) -> int:
        return len(self._calls)

    async def run(self, fn: Callable[..., Awaitable[R]], *args: Any) -> R:
        """`await fn(*args)` in a task the caller's cancellation cannot reach; see the module.

        Returns its result or raises its error; when the caller is cancelled meanwhile, the
        call is cancelled through its scope, waited for, and the caller's cancellation raised.
        """
        scope = anyio.CancelScope()

        async def call() -> R:
            with scope:
                return await fn(*args)
            # only when the scope stopped it: its caller raises its own cancellation
            raise anyio.get_cancelled_exc_class()("cancelled by its caller")

        task = asyncio.get_running_loop().create_task(call())
        self._calls[task] = scope
        task.add_done_callback(self._discard)
        try:
            return await asyncio.shield(task)
        except BaseException:
            if task.done():
                raise  # the call's own outcome (shield passes it on)
            scope.cancel()
            await _wait_out(task)
            if not task.cancelled() and task.exception() is not None:
                log.warning("%s: a call whose caller was cancelled ended with: %s",
                            self.name, task.exception())
            raise

    async def aclose(self) -> None:
        """Cancel every call in flight (through its scope: the shields inside hold) and wait
        until each has ended."""
        for scope in self._calls.values():
            scope.cancel()
        while self._calls:
            await _wait_out(next(iter(self._calls)))

    def _discard(self, task: asyncio.Task[Any]) -> None:
        self._calls.pop(task, None)
        if not task.cancelled():
            task.exception()  # retrieved: its caller has it, or it was logged


async def _wait_out(task: asyncio.Task[Any]) -> None:
    """Wait until `task` is done, whatever cancellation reaches the waiter meanwhile (the
    call's own timeouts bound it: every command and the unwinding have one)."""
    with anyio.CancelScope(shield=True):
        while not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([task])
