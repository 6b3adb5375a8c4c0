"""The state rules, checked exhaustively, and the retry policy arithmetic."""

from __future__ import annotations

import itertools

import pytest

from stavily.workflows import states
from stavily.workflows.orchestration import AGENT_LOST, ERROR, TIMEOUT, may_retry, retry_delay

TABLES = {"execution": states.EXECUTION, "step": states.STEP, "instruction": states.INSTRUCTION}


@pytest.mark.parametrize("kind", TABLES)
def test_every_pair_is_decided_by_the_table(kind: str) -> None:
    table = TABLES[kind]
    for old, new in itertools.product(table, repeat=2):
        assert states.can(table, old, new) == (new in table[old])
        assert (old in states.allowed_from(table, new)) == (new in table[old])


@pytest.mark.parametrize("kind", TABLES)
def test_targets_are_known_states(kind: str) -> None:
    table = TABLES[kind]
    for targets in table.values():
        assert targets <= table.keys()


def test_unknown_states_lead_nowhere() -> None:
    assert not states.can(states.STEP, "exploded", "succeeded")
    assert states.allowed_from(states.STEP, "exploded") == ()


def test_what_is_final_stays_final_except_for_a_rerun() -> None:
    assert states.EXECUTION["succeeded"] == frozenset()
    assert states.STEP["succeeded"] == frozenset()
    for status in states.FINAL_INSTRUCTION:
        assert states.INSTRUCTION[status] == frozenset()
    for status in states.FINAL_EXECUTION - {"succeeded"}:
        assert states.EXECUTION[status] == {"running"}
    for status in states.FINAL_STEP - {"succeeded"}:
        assert states.STEP[status] <= {"pending", "running"}


def test_an_instruction_is_never_handed_out_again() -> None:
    # A retry is a new instruction: nothing returns to queued once it left.
    assert states.allowed_from(states.INSTRUCTION, "queued") == ()
    assert states.allowed_from(states.INSTRUCTION, "leased") == ("queued",)


def test_fixed_and_exponential_delays() -> None:
    fixed = {"delay": 10, "backoff": "fixed"}
    assert [retry_delay(fixed, n) for n in (1, 2, 3)] == [10, 10, 10]
    exponential = {"delay": 1, "backoff": "exponential", "max_delay": 5}
    assert [retry_delay(exponential, n) for n in (1, 2, 3, 4)] == [1, 2, 4, 5]
    assert retry_delay({}, 3) == 0


def test_jitter_stays_within_half_to_full_delay() -> None:
    policy = {"delay": 8, "backoff": "fixed", "jitter": True}
    delays = [retry_delay(policy, 1) for _ in range(200)]
    assert all(4 <= d <= 8 for d in delays)
    assert len(set(delays)) > 1


def test_retry_budget_by_cause() -> None:
    spec = {"retry": {"max_retries": 1, "retry_on": [ERROR, TIMEOUT, AGENT_LOST]}}
    assert may_retry(spec, 1, ERROR, 3)
    assert not may_retry(spec, 2, ERROR, 3)
    # losing an agent has its own, larger budget
    assert may_retry(spec, 2, AGENT_LOST, 3)
    assert not may_retry(spec, 3, AGENT_LOST, 3)
    only_timeouts = {"retry": {"max_retries": 5, "retry_on": [TIMEOUT]}}
    assert not may_retry(only_timeouts, 1, ERROR, 3)
    assert may_retry(only_timeouts, 1, TIMEOUT, 3)


def test_state_lists_are_written_into_the_sql() -> None:
    """States go into the SQL as literals, not parameters: the planner can then match
    the partial index of the instructions an agent holds in prepared statements too."""
    from sqlalchemy.dialects import postgresql

    from stavily.store.models import ACTIVE_INSTRUCTION, instructions, one_of

    sql = str(
        one_of(instructions.c.status, ACTIVE_INSTRUCTION).compile(dialect=postgresql.dialect())
    )
    assert sql == "instructions.status IN ('leased', 'executing')"
    with pytest.raises(ValueError, match="not a state name"):
        one_of(instructions.c.status, ["x') OR ('1'='1"])
