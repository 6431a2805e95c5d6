"""The state machine engine: the `transitions` library's plain Machine, built from the table.

The async orchestrator does the I/O of a step, then fires the step's trigger here; the Machine
only decides whether the move is legal. It is synchronous and exact, which keeps the library's
asyncio quirks (swallowed cancellation, concurrent callbacks) out of the way.
"""

from __future__ import annotations

from typing import Any

from transitions import Machine, MachineError

from podfsm.core.errors import IllegalTransition
from podfsm.core.states import INITIAL, STATES, TRANSITIONS, State, Trigger


def machine_kwargs() -> dict[str, Any]:
    """The table in the form every transitions Machine (plain or graph) takes."""
    return {
        "states": [s.value for s in STATES],
        "transitions": [
            {"trigger": t.trigger.value, "source": t.source.value, "dest": t.dest.value}
            for t in TRANSITIONS
        ],
        "auto_transitions": False,
        "ignore_invalid_triggers": False,
    }


_KWARGS = machine_kwargs()


class SandboxMachine:
    """One sandbox's state, moved only along the table's edges."""

    state: str

    def __init__(self, initial: State = INITIAL) -> None:
        self._machine = Machine(
            model=self, initial=initial.value, send_event=False, **_KWARGS
        )

    @property
    def current(self) -> State:
        return State(self.state)

    def fire(self, trigger: Trigger) -> State:
        """Move along `trigger`; raise IllegalTransition if the table has no such edge here."""
        source = self.current
        try:
            ok = self._machine.events[trigger.value].trigger(self)
        except (MachineError, KeyError):
            raise IllegalTransition(source.value, trigger.value) from None
        if not ok:
            raise IllegalTransition(source.value, trigger.value)
        return self.current

    def may(self, trigger: Trigger) -> bool:
        return trigger.value in self._machine.get_triggers(self.state)
