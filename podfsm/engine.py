"""The state machine engine: the `transitions` library's plain Machine, built from the table.

The async orchestrator does the I/O of a step, then fires the step's trigger here; the Machine
only decides whether the move is legal, and nothing else in podfsm answers that question. It is
synchronous and exact, which keeps the library's asyncio quirks (swallowed cancellation,
concurrent callbacks) out of the way.
"""

from __future__ import annotations

from transitions import Machine, MachineError

from podfsm.core.errors import IllegalTransition
from podfsm.core.states import INITIAL, STATES, TRANSITIONS, State, Trigger


class _Cursor:
    """The one model of the shared Machine: it carries a sandbox's state through one trigger.

    A Machine per sandbox cost 27 kB each (its own states, events and transitions), and
    `add_model` is O(n); a single Machine whose model is set to a sandbox's state, fired, and
    read back is exact and O(1), since firing is synchronous and the event loop runs one at a
    time."""

    state: str


_CURSOR = _Cursor()
_MACHINE = Machine(
    model=_CURSOR,
    initial=INITIAL.value,
    states=[s.value for s in STATES],
    transitions=[
        {"trigger": t.trigger.value, "source": t.source.value, "dest": t.dest.value}
        for t in TRANSITIONS
    ],
    auto_transitions=False,
    ignore_invalid_triggers=False,
    send_event=False,
)


#: The Machine's answers, remembered: (source, trigger) -> dest of each legal move it made, and
#: each state's legal triggers. It has no conditions or callbacks, so an answer never changes;
#: asking it once per pair instead of per step saves ~20 us of CPU per step.
_MOVES: dict[tuple[str, str], State] = {}
_TRIGGERS: dict[str, frozenset[str]] = {}


class SandboxMachine:
    """One sandbox's state, moved only along the table's edges (by the shared Machine)."""

    __slots__ = ("current",)

    def __init__(self, initial: State = INITIAL) -> None:
        #: the sandbox's state
        self.current: State = State(initial)

    @property
    def state(self) -> str:
        return self.current.value

    def fire(self, trigger: Trigger) -> State:
        """Move along `trigger`; raise IllegalTransition if the table has no such edge here."""
        source = self.current.value
        key = (source, trigger.value)
        dest = _MOVES.get(key)
        if dest is None:
            _MACHINE.set_state(source, model=_CURSOR)
            try:
                ok = _MACHINE.events[trigger.value].trigger(_CURSOR)
            except (MachineError, KeyError):
                raise IllegalTransition(source, trigger.value) from None
            if not ok:
                raise IllegalTransition(source, trigger.value)
            dest = _MOVES[key] = State(_CURSOR.state)
        self.current = dest
        return dest

    def may(self, trigger: Trigger) -> bool:
        legal = _TRIGGERS.get(self.current.value)
        if legal is None:
            legal = _TRIGGERS[self.current.value] = frozenset(
                _MACHINE.get_triggers(self.current.value))
        return trigger.value in legal
