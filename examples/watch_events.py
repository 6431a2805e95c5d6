"""Watching transitions: every move of every sandbox's state machine, as it happens.
Run as root: python examples/watch_events.py [runc|crun]"""

from __future__ import annotations

import asyncio
import json

import _world

import podfsm


async def main(runtime: str, pod: dict[str, object]) -> None:
    async with podfsm.Controller(_world.config(runtime)) as ctl:

        async def watch() -> None:
            async for ev in ctl.events():
                note = f"  ({ev.error})" if ev.error else ""
                print(f"{ev.at:%H:%M:%S.%f} {ev.sandbox_id[:12]} "
                      f"{ev.source} --{ev.trigger}--> {ev.dest}{note}")
                if ev.trigger == "remove":
                    return

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0)  # let the watcher subscribe before anything happens
        st = await ctl.run_sandbox(pod)
        await ctl.remove_sandbox(st.id)
        await watcher


if __name__ == "__main__":
    with open(_world.pod_file("userns-allocated.json")) as f:
        config = json.load(f)
    asyncio.run(main(_world.runtime_arg(), config))
