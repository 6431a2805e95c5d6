"""`podfsm bench`: its arguments made ready, and the kind of bench they ask for (the lifecycle
bench of podfsm.tools.bench, or --chaos, --containers, --unpack, --pull). The dispatcher sits
above every kind, so that a kind may use the lifecycle bench's parts without a circle."""

from __future__ import annotations

import argparse
import os
import sys

from podfsm.tools import bench, containerbench, pullbench, unpackbench


def prepare(args: argparse.Namespace) -> None:
    """Fill in the options a caller may leave out, and split the lists (`runc,crun`, `1,4,16`)."""
    args.runtime = bench._split(args.runtime, str) or ["runc", "crun"]
    args.concurrency = bench._split(args.concurrency, int) or [1, 4, 16]
    args.exit_samples = getattr(args, "exit_samples", None) or 20
    args.ready = getattr(args, "ready", 0) or 0
    args.soak = getattr(args, "soak", 0) or 0
    args.cri = getattr(args, "cri", False)
    args.run_on_disk = getattr(args, "run_on_disk", False)


def main(args: argparse.Namespace) -> int:
    """Entry point of `podfsm bench`."""
    prepare(args)
    if os.geteuid() != 0:
        print("podfsm bench: must run as root", file=sys.stderr)
        return 2
    if getattr(args, "chaos", 0):
        return bench.chaos_main(args.runtime, args.chaos, as_json=args.json,
                                containers=getattr(args, "containers", False))
    if getattr(args, "containers", False):
        return containerbench.main(args)
    if getattr(args, "unpack", False):
        return unpackbench.main(args)
    if getattr(args, "pull", False):
        return pullbench.main(args)
    return bench.main(args)
