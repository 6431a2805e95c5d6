"""A controller in a child process, for the containers' crash tests: `python -m
tests.integration.containerchild SPEC`, SPEC JSON {"cfg": ControllerConfig, "image": ref,
"pod": pod config, "then": null | "stop" | "remove", "volume": null | a host path both
containers mount (idmapped in a user-namespaced pod)}.

A controller without failpoints pulls the image, runs the pod and a "survivor" container; then a
controller with PODFSM_FAILPOINTS creates and starts a "victim" container (and stops or removes
it). It prints "pod <id>", "survivor <id>", "victim <id>", "done"; a `crash` failpoint kills it
by SIGKILL in the middle."""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio

from podfsm import Controller, ControllerConfig


def say(*words: object) -> None:
    print(*words, flush=True)


def container(name: str, image: str, volume: str | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "metadata": {"name": name}, "image": {"image": image},
        "command": ["sh", "-c", "while true; do echo tick; sleep 0.1; done"],
        "log_path": f"{name}.log"}
    if volume:
        cfg["mounts"] = [{"container_path": "/vol", "host_path": volume}]
    return cfg


async def main(spec: dict[str, Any]) -> None:
    cfg = ControllerConfig.model_validate(spec["cfg"])
    image = spec["image"]
    async with Controller(cfg, failpoints="") as ctl:
        await ctl.pull_image(image)
        st = await ctl.run_sandbox(spec["pod"])
        say("pod", st.id)
        survivor = await ctl.create_container(
            st.id, container("survivor", image, spec.get("volume")))
        await ctl.start_container(survivor)
        say("survivor", survivor)
    async with Controller(cfg) as ctl:  # failpoints from PODFSM_FAILPOINTS
        victim = await ctl.create_container(st.id, container("victim", image, spec.get("volume")))
        say("victim", victim)
        await ctl.start_container(victim)
        if spec.get("then") == "stop":
            await ctl.stop_container(victim, 0)
        elif spec.get("then") == "remove":
            await ctl.remove_container(victim)
    say("done")


if __name__ == "__main__":
    anyio.run(main, json.loads(sys.argv[1]))
