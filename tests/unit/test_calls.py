"""CallGroup: a caller's cancellation, native (grpc.aio, asyncio.timeout) or anyio's, reaches a
call only through an anyio scope, so the call's shielded steps finish (issue 17, item 1)."""

from __future__ import annotations

import asyncio
import contextlib

import anyio
import pytest

from podfsm.controller.calls import CallGroup


class Steps:
    """A call of two shielded steps with an unshielded boundary between them, as a run is."""

    def __init__(self) -> None:
        self.done: list[str] = []

    async def __call__(self, wait: float) -> str:
        for name in ("first", "second"):
            await anyio.lowlevel.checkpoint_if_cancelled()
            with anyio.CancelScope(shield=True):
                await asyncio.sleep(wait)
                self.done.append(name)
        return "finished"


def test_a_native_cancel_cuts_a_bare_shielded_step_short() -> None:
    """Why CallGroup exists: anyio's shield does not hold against Task.cancel()."""
    steps = Steps()

    async def main() -> None:
        task = asyncio.create_task(steps(0.05))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert steps.done == []


@pytest.mark.parametrize("how", ["task.cancel", "asyncio.timeout", "anyio scope"])
def test_a_cancelled_caller_lets_the_step_in_progress_finish_and_no_next_one_begin(
        how: str) -> None:
    steps = Steps()
    group = CallGroup("test")
    took: list[float] = []

    async def caller() -> None:
        t0 = asyncio.get_running_loop().time()
        try:
            if how == "asyncio.timeout":
                async with asyncio.timeout(0.01):
                    await group.run(steps, 0.05)
            elif how == "anyio scope":
                with anyio.move_on_after(0.01):
                    await group.run(steps, 0.05)
            else:
                await group.run(steps, 0.05)
        finally:
            took.append(asyncio.get_running_loop().time() - t0)

    async def main() -> None:
        task = asyncio.create_task(caller())
        if how == "task.cancel":
            await asyncio.sleep(0.01)
            task.cancel()
            await asyncio.sleep(0)
            task.cancel()  # twice: the caller still waits for the call's end
        expected = (contextlib.nullcontext() if how == "anyio scope"
                    else pytest.raises((asyncio.CancelledError, TimeoutError)))
        with expected:
            await task
        assert len(group) == 0

    asyncio.run(main())
    assert steps.done == ["first"]  # finished, and the second never began
    assert took[0] >= 0.045  # the caller returned only once the call had ended


def test_results_and_errors_pass_through_and_aclose_ends_calls_in_flight() -> None:
    group = CallGroup("test")
    steps = Steps()

    async def fails() -> None:
        raise ValueError("the call's own error")

    async def main() -> None:
        assert await group.run(steps, 0) == "finished"
        with pytest.raises(ValueError, match="own error"):
            await group.run(fails)
        later = Steps()
        task = asyncio.create_task(group.run(later, 0.05))
        await asyncio.sleep(0.01)
        await group.aclose()  # the step in progress finishes, the next is not begun
        assert later.done == ["first"] and len(group) == 0
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
