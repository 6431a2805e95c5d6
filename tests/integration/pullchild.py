"""A controller (fake sandbox drivers, the real image driver) that pulls one image and exits:
the crash tests run it under PODFSM_FAILPOINTS or SIGKILL it mid-download.

    python -m tests.integration.pullchild STATE_DIR RUN_DIR REGISTRY_CONFIG_DIR REFERENCE
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anyio

from podfsm import Controller, ControllerConfig
from tests.fakes import FakeNamespaces, FakeNetwork, FakeRuntime, Faults, MemoryStore


def controller(state_dir: str, run_dir: str, config_dir: str, failpoints: str | None = None,
               ) -> Controller:
    from podfsm.core import failpoints as fp
    from podfsm.drivers import factory

    cfg = ControllerConfig(state_dir=state_dir, run_dir=run_dir,
                           netns_dir=str(Path(run_dir) / "netns"),
                           registry_config_dir=config_dir)
    faults = Faults()
    spec = os.environ.get("PODFSM_FAILPOINTS", "") if failpoints is None else failpoints
    return Controller(cfg, namespaces=FakeNamespaces(faults), network=FakeNetwork(faults),
                      runtime=FakeRuntime(faults), store=MemoryStore(),
                      images=factory.images(cfg, fp.parse(spec)), failpoints=spec)


async def main(state_dir: str, run_dir: str, config_dir: str, ref: str) -> None:
    async with controller(state_dir, run_dir, config_dir) as ctl:
        img = await ctl.pull_image(ref)
        print(img.id, flush=True)


if __name__ == "__main__":
    anyio.run(main, *sys.argv[1:5])
