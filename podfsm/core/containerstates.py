"""The single source of truth for a container's states and transitions.

A container belongs to one sandbox and has a machine of its own, in the style of the sandbox's
(podfsm.core.states): states `Unknown -> Created -> Running -> Exited`, the CRI's
CONTAINER_UNKNOWN, CONTAINER_CREATED, CONTAINER_RUNNING and CONTAINER_EXITED.

Creating a container is several steps that touch the system (the rootfs mounted, the bundle
written, the monitor started with the runtime's `create`); they are one transition
(Unknown -> Created) whose partial work the record's `done` list names, so that a failure or a
crash in the middle unwinds exactly what was done (COMPENSATIONS, in reverse). Start is one
step (runtime `start`). The process's exit, a stop, or a start that failed make Exited; remove
makes the container disappear (back to Unknown, then forgotten).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ContainerState(enum.StrEnum):
    UNKNOWN = "Unknown"
    CREATED = "Created"
    RUNNING = "Running"
    EXITED = "Exited"


class ContainerTrigger(enum.StrEnum):
    CREATE = "create"
    START = "start"
    EXIT = "exit"
    STOP = "stop"
    FAIL = "fail"
    REMOVE = "remove"


class CreateStep(enum.StrEnum):
    """The steps of CREATE, in order; each has a compensating step (COMPENSATIONS)."""

    MOUNT_ROOTFS = "mount_rootfs"
    WRITE_BUNDLE = "write_bundle"
    START_MONITOR = "start_monitor"


S, T = ContainerState, ContainerTrigger


@dataclass(frozen=True)
class Transition:
    trigger: ContainerTrigger
    source: ContainerState
    dest: ContainerState
    doc: str


TRANSITIONS: tuple[Transition, ...] = (
    Transition(T.CREATE, S.UNKNOWN, S.CREATED,
               "mount the overlay rootfs, write the bundle, start the monitor (conmon), which "
               "runs the runtime's create: the process exists, not started"),
    Transition(T.START, S.CREATED, S.RUNNING,
               "runtime start: the container's process runs the image's command"),
    Transition(T.FAIL, S.CREATED, S.EXITED,
               "start failed: the process never ran the command (exit code 128 and why)"),
    Transition(T.EXIT, S.RUNNING, S.EXITED,
               "the process exited; the monitor wrote its exit code (and an OOM kill)"),
    Transition(T.STOP, S.RUNNING, S.EXITED,
               "the stop signal (the image's StopSignal, else SIGTERM), SIGKILL after the "
               "timeout, until the monitor records the exit"),
    Transition(T.STOP, S.CREATED, S.EXITED,
               "stop of a container never started: its process is killed, it is Exited"),
    Transition(T.STOP, S.EXITED, S.EXITED, "stop of an exited container: nothing to do"),
    Transition(T.REMOVE, S.CREATED, S.UNKNOWN,
               "kill if needed, runtime delete, stop the monitor, unmount the rootfs, remove "
               "the bundle and the writable layer; the container disappears"),
    Transition(T.REMOVE, S.EXITED, S.UNKNOWN,
               "runtime delete, unmount the rootfs, remove the bundle and the writable layer; "
               "the container disappears"),
    Transition(T.REMOVE, S.UNKNOWN, S.UNKNOWN,
               "undo a create that failed or was cut short by a crash: each step done, in "
               "reverse (COMPENSATIONS)"),
)

STATES: tuple[ContainerState, ...] = tuple(ContainerState)
INITIAL = S.UNKNOWN

#: For each step of CREATE, what undoes it (run in reverse order of the steps done).
COMPENSATIONS: dict[CreateStep, str] = {
    CreateStep.MOUNT_ROOTFS: "unmount the overlay, remove the upper and work directories",
    CreateStep.WRITE_BUNDLE: "remove the bundle directory",
    CreateStep.START_MONITOR: "runtime delete --force (kills the process; conmon then exits)",
}


def next_state(state: ContainerState, trigger: ContainerTrigger) -> ContainerState:
    """The state `trigger` leads to from `state`; ValueError if the table has no such move."""
    for t in TRANSITIONS:
        if t.trigger is trigger and t.source is state:
            return t.dest
    raise ValueError(f"a container in state {state.value} cannot {trigger.value}")


def lifecycle_kind(trigger: ContainerTrigger, source: ContainerState,
                   dest: ContainerState) -> str | None:
    """The CRI container event a transition makes: created, started, stopped or deleted."""
    if trigger is T.CREATE:
        return "created"
    if trigger is T.START:
        return "started"
    if trigger is T.REMOVE:
        return "deleted" if source is not S.UNKNOWN else None
    if dest is S.EXITED and source is not S.EXITED:
        return "stopped"
    return None


def markdown_table() -> str:
    """The table as docs/containers.md shows it (a unit test keeps the two the same)."""
    rows = ["| trigger | from | to | what it does |", "| --- | --- | --- | --- |"]
    rows += [f"| {t.trigger.value} | {t.source.value} | {t.dest.value} | {t.doc} |"
             for t in TRANSITIONS]
    return "\n".join(rows) + "\n"


def mermaid() -> str:
    """A mermaid state diagram of the table (docs/containers.md carries it)."""
    lines = ["stateDiagram-v2", f"    [*] --> {INITIAL.value}"]
    lines += [f"    {t.source.value} --> {t.dest.value}: {t.trigger.value}" for t in TRANSITIONS]
    return "\n".join(lines) + "\n"
