"""Failpoints: `PODFSM_FAILPOINTS="name=action;..."` parsed into a plan (pure).

Actions: `error` (the step raises), `crash` (the process dies at once, as if SIGKILLed),
`delay(ms)`; each optionally counted, `2*error` firing on the first two hits only. A failpoint sits
before and after every step that touches the system; NAMES lists them all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The steps that touch the system, in the order a run (then a stop) meets them.
STEPS: tuple[str, ...] = (
    "save_record",
    "pin_namespaces",
    "cni_add",
    "runtime_create",
    "runtime_start",
    "runtime_kill",
    "runtime_delete",
    "cni_del",
    "unpin_namespaces",
)
#: The image store's steps that touch the system, in the order a pull meets them: each blob's
#: download (before: nothing written; after: the blob is in the store; fired by the
#: controller), each layer's unpacking (fired in a worker thread by the driver that owns it:
#: see podfsm/drivers/layers.py), the image record's write (the controller). Image steps go
#: here, not in STEPS: the sandbox durability and chaos runs take theirs from STEPS.
IMAGE_STEPS: tuple[str, ...] = (
    "fetch_blob",
    "unpack_layer",
    "save_image",
)
#: A container's steps that touch the system: create's (the overlay mounted, the bundle
#: written, conmon started with the runtime's create), then start, stop and remove. Apart
#: from STEPS too, for the same reason.
CONTAINER_STEPS: tuple[str, ...] = (
    "container_mount_rootfs",
    "container_write_bundle",
    "container_start_monitor",
    "container_start",
    "container_stop",
    "container_remove",
)
NAMES: tuple[str, ...] = tuple(
    f"{step}.{when}" for step in STEPS + IMAGE_STEPS + CONTAINER_STEPS
    for when in ("before", "after"))
#: The failpoints a sandbox's lifecycle meets.
SANDBOX_NAMES: tuple[str, ...] = NAMES[:2 * len(STEPS)]
#: The steps a successful run meets (the first record write, then the forward steps) and the
#: ones only a stop, a remove or an unwinding meets (the compensating steps).
RUN_STEPS: tuple[str, ...] = STEPS[:5]
STOP_STEPS: tuple[str, ...] = STEPS[5:]

_ACTION = re.compile(r"^(?:(?P<count>\d+)\*)?(?P<kind>error|crash|delay\((?P<ms>\d+)\))$")


@dataclass
class Failpoint:
    name: str
    kind: str  # "error" | "crash" | "delay"
    delay_ms: int = 0
    remaining: int | None = None  # None: every hit

    def take(self) -> bool:
        """Count one hit; True if it fires."""
        if self.remaining is None:
            return True
        if self.remaining <= 0:
            return False
        self.remaining -= 1
        return True


def parse(spec: str) -> dict[str, Failpoint]:
    """Parse a PODFSM_FAILPOINTS value; ValueError names a bad entry or an unknown failpoint."""
    plan: dict[str, Failpoint] = {}
    for raw in spec.split(";"):
        entry = raw.strip()
        if not entry:
            continue
        name, sep, action = entry.partition("=")
        name, action = name.strip(), action.strip()
        if not sep:
            raise ValueError(f"failpoint entry {entry!r} is not name=action")
        if name not in NAMES:
            raise ValueError(f"unknown failpoint {name!r} (see `podfsm debug failpoints`)")
        m = _ACTION.match(action)
        if m is None:
            raise ValueError(
                f"failpoint {name}: bad action {action!r} (error, crash, delay(ms), N*action)"
            )
        kind = m["kind"].split("(")[0]
        count = int(m["count"]) if m["count"] else None
        plan[name] = Failpoint(name, kind, int(m["ms"] or 0), count)
    return plan
