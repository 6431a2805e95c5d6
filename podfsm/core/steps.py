"""The compensating steps: one table for unwinding, stop and orphan collection (pure).

Each step undoes one forward step of a run. The unwinding of a failed run meets them in reverse
order of registration, a stop or a remove in `STOP_ORDER`, and the collection of an orphan (a
sandbox with no record) in `ORPHAN_ORDER`; all three name a failed step by its `label` and wrap it
in the failpoints of `failpoint`.
"""

from __future__ import annotations

from dataclasses import dataclass

from podfsm.core.failpoints import STEPS
from podfsm.core.states import Trigger


@dataclass(frozen=True)
class Compensation:
    """One compensating step."""

    #: how errors and leftovers name it
    label: str
    #: the failpoints.STEPS entry whose `.before`/`.after` failpoints surround it, if any
    failpoint: str | None
    #: the machine's trigger recording it was done, when the machine records it
    trigger: Trigger | None

    def __post_init__(self) -> None:
        assert self.failpoint is None or self.failpoint in STEPS, self.failpoint


KILL_TASK = Compensation("kill task", "runtime_kill", Trigger.KILL_TASK)
DELETE_CONTAINER = Compensation("runtime delete", "runtime_delete", Trigger.DELETE_CONTAINER)
DETACH_NETWORK = Compensation("CNI DEL", "cni_del", None)
UNPIN_NAMESPACES = Compensation("unpin namespaces", "unpin_namespaces",
                                Trigger.TEARDOWN_NAMESPACES)
#: at stop the pod's /dev/shm tmpfs goes; its files stay until remove (as containerd does)
RELEASE_SHM = Compensation("unmount /dev/shm", None, None)
#: at remove, and when a run unwinds: the files, the tmpfs and the log directory
REMOVE_FILES = Compensation("remove sandbox files", None, None)

#: A stop: the task first (nothing runs in the pod while its network goes), the tmpfs last.
STOP_ORDER: tuple[Compensation, ...] = (
    KILL_TASK, DELETE_CONTAINER, DETACH_NETWORK, UNPIN_NAMESPACES, RELEASE_SHM,
)
#: An orphan has no record, so no task is known: `delete --force` kills what is left; the
#: tmpfs goes before the directory (never remove through a live mount).
ORPHAN_ORDER: tuple[Compensation, ...] = STOP_ORDER[1:]
