"""The state table and the engine: every (state, trigger) pair, legal and illegal."""

from __future__ import annotations

import itertools

import pytest

from podfsm.core.errors import IllegalTransition
from podfsm.core.states import (
    COMPENSATIONS,
    FORWARD,
    STATES,
    TRANSITIONS,
    State,
    Trigger,
)
from podfsm.engine import SandboxMachine

PAIRS = list(itertools.product(STATES, Trigger))
# The table read directly, to hold the engine to it (the engine must not consult this).
EDGES = {(t.source, t.trigger): t.dest for t in TRANSITIONS}


@pytest.mark.parametrize(("state", "trigger"), PAIRS, ids=[f"{s}-{t}" for s, t in PAIRS])
def test_every_state_trigger_pair_moves_or_is_refused_as_the_table_says(
    state: State, trigger: Trigger
) -> None:
    m = SandboxMachine(state)
    expected = EDGES.get((state, trigger))
    if expected is None:
        with pytest.raises(IllegalTransition) as info:
            m.fire(trigger)
        assert info.value.state == state.value
        assert m.current is state  # a refused trigger leaves the state alone
    else:
        assert m.fire(trigger) is expected
        assert m.current is expected


def test_the_forward_path_reaches_ready_in_the_documented_order() -> None:
    m = SandboxMachine()
    seen = [m.current]
    for trig in FORWARD:
        seen.append(m.fire(trig))
    assert seen == [State.UNKNOWN, State.NAMESPACES_READY, State.CONTAINER_CREATED,
                    State.TASK_RUNNING, State.READY]


def test_each_compensation_goes_back_exactly_one_forward_step() -> None:
    state = State.UNKNOWN
    for trig in FORWARD:
        after = SandboxMachine(state).fire(trig)
        undo = COMPENSATIONS[trig]
        if undo is not None:
            assert SandboxMachine(after).fire(undo) is state
        state = after


def test_from_not_ready_only_stop_and_remove_go_on() -> None:
    assert {t.trigger for t in TRANSITIONS if t.source is State.NOT_READY} == {
        Trigger.STOP, Trigger.REMOVE}


def test_task_exit_from_ready_lands_in_not_ready() -> None:
    assert SandboxMachine(State.READY).fire(Trigger.TASK_EXIT) is State.NOT_READY


def test_table_has_no_duplicate_edges_and_only_known_states() -> None:
    keys = [(t.source, t.trigger) for t in TRANSITIONS]
    assert len(keys) == len(set(keys))
    assert {t.dest for t in TRANSITIONS} <= set(STATES)


@pytest.mark.parametrize("state", STATES)
def test_remembered_answers_agree_with_the_table_when_asked_again(state: State) -> None:
    # the engine remembers the Machine's answers: the second asking must give the first answer
    for _ in range(2):
        for trigger in Trigger:
            expected = EDGES.get((state, trigger))
            assert SandboxMachine(state).may(trigger) is (expected is not None)
            m = SandboxMachine(state)
            if expected is None:
                with pytest.raises(IllegalTransition):
                    m.fire(trigger)
                assert m.current is state
            else:
                assert m.fire(trigger) is expected
