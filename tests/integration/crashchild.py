"""A controller in a child process, for the crash tests: `python -m tests.integration.crashchild
SPEC` where SPEC is JSON:

    {"cfg": ControllerConfig as JSON,
     "before": [pod, ...],  # run first by a controller WITHOUT failpoints, left running
     "pods": [pod, ...],    # then run by a controller with PODFSM_FAILPOINTS
     "then": null | "stop" | "remove"}  # done to each of `pods` once Ready

It prints one line per event ("ready <id>", "failed <error>", "done") and, when a `crash`
failpoint fires, dies by SIGKILL in the middle of it, as a node daemon that is OOM-killed.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio

from podfsm import Controller, ControllerConfig, SandboxRunError


def say(*words: object) -> None:
    print(*words, flush=True)


async def main(spec: dict[str, Any]) -> None:
    cfg = ControllerConfig.model_validate(spec["cfg"])
    if spec.get("before"):
        async with Controller(cfg, failpoints="") as ctl:
            for p in spec["before"]:
                st = await ctl.run_sandbox(p)
                say("ready", st.id)
    async with Controller(cfg) as ctl:  # failpoints from PODFSM_FAILPOINTS
        for p in spec.get("pods", []):
            try:
                st = await ctl.run_sandbox(p)
            except SandboxRunError as exc:
                say("failed", exc)
                continue
            say("ready", st.id)
            if spec.get("then") == "stop":
                await ctl.stop_sandbox(st.id)
                say("stopped", st.id)
            elif spec.get("then") == "remove":
                await ctl.remove_sandbox(st.id)
                say("removed", st.id)
    say("done")


if __name__ == "__main__":
    anyio.run(main, json.loads(sys.argv[1]))
