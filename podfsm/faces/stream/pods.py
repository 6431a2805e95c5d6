"""Where a port-forward connects: the sandbox's pinned network namespace, through the netns
dialer (podfsm.drivers.netnsdial); the host's loopback for a host-network pod. Looked up at
each connection, so a sandbox stopped meanwhile gets no connection (and never the host's)."""

from __future__ import annotations

import asyncio

from podfsm.controller import Controller
from podfsm.core.errors import SandboxNotFound
from podfsm.core.spec import NamespaceMode
from podfsm.core.states import State
from podfsm.drivers.netnsdial import NetnsDialer


class SandboxDial:
    """`(sandbox id, port) -> connection`, for StreamServer."""

    def __init__(self, ctl: Controller, dialer: NetnsDialer) -> None:
        self.ctl = ctl
        self.dialer = dialer

    async def netns_of(self, sandbox_id: str) -> str | None:
        """The sandbox's netns pin; None for a host-network pod. OSError if it is not
        running (or has no pin)."""
        try:
            st = await self.ctl.sandbox_status(sandbox_id)
            config = await self.ctl.sandbox_config(sandbox_id)
        except SandboxNotFound:
            raise OSError(f"sandbox {sandbox_id} not found") from None
        if st.state is not State.READY:
            raise OSError(f"sandbox {sandbox_id} is {st.state.value}, not running")
        if config.linux.security_context.namespace_options.network is NamespaceMode.NODE:
            return None
        if not st.netns_path:
            raise OSError(f"sandbox {sandbox_id} has no network namespace pin")
        return st.netns_path

    async def __call__(self, sandbox_id: str, port: int
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await self.dialer.connect(await self.netns_of(sandbox_id), port)
