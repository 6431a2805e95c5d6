"""Embedding podfsm in an asyncio program: run a pod with its own user namespace, look at it,
remove it. Run as root: python examples/embed.py [runc|crun]"""

from __future__ import annotations

import asyncio
import json

import _world

import podfsm


async def main(runtime: str, pod: podfsm.PodSandboxConfig) -> None:
    async with podfsm.Controller(_world.config(runtime)) as ctl:
        st = await ctl.run_sandbox(pod)
        print(f"{st.name}: {st.state} ip={st.ip} pid={st.pid}")
        print(f"uid map: {st.uid_mappings[0].line()}  netns: {st.netns_path}")
        for iface in await ctl.sandbox_interfaces(st.id):
            print(f"  {iface.name} {' '.join(iface.addresses)}")
        await ctl.stop_sandbox(st.id)
        await ctl.remove_sandbox(st.id)
        print(f"removed; sandboxes left: {len(await ctl.list_sandboxes())}")


if __name__ == "__main__":
    with open(_world.pod_file("userns-allocated.json")) as f:
        config = podfsm.PodSandboxConfig.model_validate(json.load(f))
    asyncio.run(main(_world.runtime_arg(), config))
