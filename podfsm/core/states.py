"""The single source of truth for a sandbox's states and transitions.

Rules of this table:
- A sandbox is in exactly one of STATES. The forward path is
  Unknown -> NamespacesReady -> ContainerCreated -> TaskRunning -> Ready.
- Every forward step has a compensating step that goes back exactly one state and undoes exactly
  what the forward step did (COMPENSATIONS). A failed run unwinds LIFO through them.
- A task that exits, a stop, or an unwinding that could not finish lands in NotReady; from there
  only stop (idempotent) and remove go on.
- The engine (podfsm.engine), the docs and the diagrams all read TRANSITIONS; nothing else
  decides what may follow what.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class State(enum.StrEnum):
    UNKNOWN = "Unknown"
    NAMESPACES_READY = "NamespacesReady"
    CONTAINER_CREATED = "ContainerCreated"
    TASK_RUNNING = "TaskRunning"
    READY = "Ready"
    NOT_READY = "NotReady"


class Trigger(enum.StrEnum):
    # forward steps
    SETUP_NAMESPACES = "setup_namespaces"
    CREATE_CONTAINER = "create_container"
    START_TASK = "start_task"
    MARK_READY = "mark_ready"
    # compensating steps
    TEARDOWN_NAMESPACES = "teardown_namespaces"
    DELETE_CONTAINER = "delete_container"
    KILL_TASK = "kill_task"
    # everything else
    TASK_EXIT = "task_exit"
    FAIL = "fail"
    STOP = "stop"
    REMOVE = "remove"


S, T = State, Trigger


@dataclass(frozen=True)
class Transition:
    trigger: Trigger
    source: State
    dest: State
    doc: str


_ALL_BUT_NOT_READY = (S.UNKNOWN, S.NAMESPACES_READY, S.CONTAINER_CREATED, S.TASK_RUNNING, S.READY)

TRANSITIONS: tuple[Transition, ...] = (
    Transition(T.SETUP_NAMESPACES, S.UNKNOWN, S.NAMESPACES_READY,
               "create userns then netns inside it, pin both, verify owner, CNI ADD"),
    Transition(T.CREATE_CONTAINER, S.NAMESPACES_READY, S.CONTAINER_CREATED,
               "write the pause bundle, runtime create (joins the pinned namespaces)"),
    Transition(T.START_TASK, S.CONTAINER_CREATED, S.TASK_RUNNING,
               "runtime start, record pid, arm exit supervision"),
    Transition(T.MARK_READY, S.TASK_RUNNING, S.READY,
               "the pause pid's user and net namespaces are the pinned ones"),
    Transition(T.KILL_TASK, S.TASK_RUNNING, S.CONTAINER_CREATED,
               "undo start: kill the task and wait for its exit"),
    Transition(T.DELETE_CONTAINER, S.CONTAINER_CREATED, S.NAMESPACES_READY,
               "undo create: runtime delete, remove the bundle"),
    Transition(T.TEARDOWN_NAMESPACES, S.NAMESPACES_READY, S.UNKNOWN,
               "undo setup: CNI DEL, unpin netns and userns"),
    Transition(T.TASK_EXIT, S.READY, S.NOT_READY,
               "the pause task exited; the IP stays reserved until stop/remove"),
    Transition(T.TASK_EXIT, S.TASK_RUNNING, S.NOT_READY,
               "the pause task exited before it was reported ready"),
    *(Transition(T.FAIL, s, S.NOT_READY,
                 "a step failed and unwinding could not finish; only stop/remove go on")
      for s in _ALL_BUT_NOT_READY),
    *(Transition(T.STOP, s, S.NOT_READY, "kill task, CNI DEL, unpin")
      for s in (*_ALL_BUT_NOT_READY, S.NOT_READY)),
    Transition(T.REMOVE, S.NOT_READY, S.UNKNOWN,
               "delete everything; the sandbox disappears"),
)

STATES: tuple[State, ...] = tuple(State)
INITIAL = S.UNKNOWN

# The forward path, and for each forward step its compensating trigger.
FORWARD: tuple[Trigger, ...] = (T.SETUP_NAMESPACES, T.CREATE_CONTAINER, T.START_TASK, T.MARK_READY)
COMPENSATIONS: dict[Trigger, Trigger | None] = {
    T.SETUP_NAMESPACES: T.TEARDOWN_NAMESPACES,
    T.CREATE_CONTAINER: T.DELETE_CONTAINER,
    T.START_TASK: T.KILL_TASK,
    T.MARK_READY: None,  # a check: nothing to undo
}


def lifecycle_kind(trigger: str, source: str, dest: str) -> str | None:
    """The CRI lifecycle event a transition makes, if any: "created" (the pause container
    exists), "started" (Ready), "stopped" (no longer running: exit, failure, stop, or an
    unwinding killing it) or "deleted" (remove, or an unwinding deleting the container).
    A stop of a NotReady sandbox makes none: it had stopped already."""
    if trigger == T.CREATE_CONTAINER:
        return "created"
    if trigger == T.MARK_READY:
        return "started"
    if trigger in (T.REMOVE, T.DELETE_CONTAINER):
        return "deleted"
    if trigger == T.KILL_TASK or (dest == S.NOT_READY and source != S.NOT_READY):
        return "stopped"
    return None
