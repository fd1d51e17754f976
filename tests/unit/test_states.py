from __future__ import annotations

import pytest

from vllmd.instance.states import (
    HOLDS_RESERVATION,
    TRANSITIONS,
    IllegalTransition,
    InstanceState,
    check_transition,
)

S = InstanceState


def test_every_state_has_a_row_in_the_transition_table() -> None:
    assert set(TRANSITIONS) == set(InstanceState)


def test_illegal_transition_raises() -> None:
    with pytest.raises(IllegalTransition, match="stopped -> ready"):
        check_transition(S.STOPPED, S.READY)


def test_every_state_can_reach_stopped() -> None:
    """No state is a dead end: an operator can always get a model back to stopped."""
    for start in InstanceState:
        seen, frontier = {start}, [start]
        while frontier:
            for nxt in TRANSITIONS[frontier.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    frontier.append(nxt)
        assert S.STOPPED in seen or start is S.STOPPED, start


def test_states_that_hold_memory_are_the_designed_ones() -> None:
    assert {S.STARTING, S.READY, S.DRAINING, S.WAKING, S.STOPPING} == HOLDS_RESERVATION
    assert S.SLEEPING not in HOLDS_RESERVATION  # holds only its residue


def test_release_happens_only_through_stopped_backoff_or_failed() -> None:
    for old, targets in TRANSITIONS.items():
        for new in targets:
            if old in HOLDS_RESERVATION and new not in HOLDS_RESERVATION and new is not S.SLEEPING:
                assert new in {S.STOPPED, S.BACKOFF, S.FAILED}, (old, new)
