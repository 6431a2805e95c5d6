"""Where the examples keep their state: a private directory and CNI network, so running an
example never touches the host's podfsm or CNI configuration. Override with PODFSM_EXAMPLE_DIR,
PODFSM_EXAMPLE_NETWORK, PODFSM_EXAMPLE_BRIDGE and PODFSM_EXAMPLE_SUBNET."""

from __future__ import annotations

import os
import sys
import tempfile

import podfsm

HERE = os.path.dirname(os.path.abspath(__file__))


def config(runtime: str = "runc") -> podfsm.ControllerConfig:
    base = os.environ.get("PODFSM_EXAMPLE_DIR") or tempfile.mkdtemp(prefix="podfsm-example-")
    os.chmod(base, 0o711)  # the pod's mapped root must reach the pause rootfs below it
    conf = os.path.join(base, "net.d")
    os.makedirs(conf, exist_ok=True)
    return podfsm.ControllerConfig(
        state_dir=os.path.join(base, "state"),
        run_dir=os.path.join(base, "run"),
        netns_dir=os.path.join(base, "netns"),
        runtime=runtime,  # type: ignore[arg-type]
        cni_conf_dir=conf,
        default_network_name=os.environ.get("PODFSM_EXAMPLE_NETWORK", "podfsm-example"),
        default_bridge=os.environ.get("PODFSM_EXAMPLE_BRIDGE", "podfsm-ex0"),
        default_subnet=os.environ.get("PODFSM_EXAMPLE_SUBNET", "10.209.250.0/24"),
    )


def pod_file(name: str) -> str:
    return os.path.join(HERE, "pods", name)


def runtime_arg() -> str:
    return sys.argv[1] if len(sys.argv) > 1 else "runc"
