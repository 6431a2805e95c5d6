"""Rendering state diagrams with podfsm.faces.graph: the machine as Mermaid text and as SVG, and,
given a running `podfsm serve`, one sandbox's diagram (its current state highlighted, the path
its history took drawn on it).

    python examples/render_diagram.py [OUTDIR]                    # states.mmd, states.svg
    python examples/render_diagram.py OUTDIR --socket S [--id ID] # and sandbox-<id>.mmd/.svg

The machine needs no root and no daemon, only Graphviz's `dot` for the SVG. Without --id the
first sandbox the daemon lists is drawn.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from podfsm.faces import graph
from podfsm.faces.client import Client


def write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
    print(f"wrote {path} ({len(data)} bytes)")


async def sandbox_diagrams(outdir: str, socket_path: str, sandbox_id: str | None) -> None:
    async with Client(socket_path) as client:
        if sandbox_id is None:
            listed = await client.list_sandboxes()
            if not listed:
                raise SystemExit("the daemon has no sandbox to draw")
            sandbox_id = listed[0].id
        status = await client.sandbox_status(await client.resolve_id(sandbox_id))
    print(f"sandbox {status.id[:13]} ({status.namespace}/{status.name}) is {status.state}")
    for fmt in ("mmd", "svg"):
        # the same as GET /v1/sandboxes/{id}/graph?format=..., drawn here from the status
        write(os.path.join(outdir, f"sandbox-{status.id[:13]}.{fmt}"), graph.render(fmt, status))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", nargs="?", default=".", help="where to write (default: .)")
    parser.add_argument("--socket", help="a running daemon's socket: also draw a sandbox")
    parser.add_argument("--id", help="the sandbox (id or unique prefix; default: the first)")
    args = parser.parse_args()
    os.makedirs(args.outdir, exist_ok=True)
    write(os.path.join(args.outdir, "states.mmd"), graph.render("mmd"))
    write(os.path.join(args.outdir, "states.svg"), graph.render("svg"))
    if args.socket:
        asyncio.run(sandbox_diagrams(args.outdir, args.socket, args.id))


if __name__ == "__main__":
    main()
