"""Pure rules of the fleet and the engine: eligibility and what a result means."""

from __future__ import annotations

import time

from stavily.fleet.agents import AgentIdentity, eligible
from stavily.ids import new_id
from stavily.workflows.handout import step_output

AGENT = AgentIdentity(
    id="agt_1",
    organization_id="org_1",
    name="prod-web-1",
    type="action",
    labels={"env": "prod", "zone": "a"},
    capacity=1,
    status="online",
)


def selector(**fields: object) -> dict[str, object]:
    return {"single_agent": None, "pools": [], "labels": {}, **fields}


def test_no_selection_takes_any_agent() -> None:
    assert eligible(AGENT, selector())


def test_single_agent_pins_by_name() -> None:
    assert eligible(AGENT, selector(single_agent="prod-web-1"))
    assert not eligible(AGENT, selector(single_agent="prod-web-2"))


def test_pools_match_whole_name_and_labels() -> None:
    assert eligible(AGENT, selector(pools=[{"agent_regex": "prod-.*", "labels": {}}]))
    assert not eligible(AGENT, selector(pools=[{"agent_regex": "prod", "labels": {}}]))
    assert eligible(
        AGENT,
        selector(pools=[{"agent_regex": "dev-.*"}, {"agent_regex": None, "labels": {"zone": "a"}}]),
    )
    assert not eligible(
        AGENT, selector(pools=[{"agent_regex": "prod-.*", "labels": {"zone": "b"}}])
    )


def test_labels_must_all_match() -> None:
    assert eligible(AGENT, selector(labels={"env": "prod"}))
    assert not eligible(AGENT, selector(labels={"env": "prod", "gpu": "yes"}))


def test_step_output_unwraps_official_agent_results() -> None:
    wrapped = {"result": {"duration": 1, "execution_result": {"output_data": {"ok": True}}}}
    assert step_output(wrapped) == {"ok": True}
    assert step_output({"result": {"ok": True}}) == {"ok": True}
    assert step_output({"result": None}) is None
    assert step_output({"result": {"execution_result": "text"}}) == {"execution_result": "text"}


def test_ids_are_prefixed_unique_and_in_the_order_they_were_made() -> None:
    ids = [new_id("ins") for _ in range(1000)]  # many in one millisecond
    assert len(set(ids)) == 1000
    assert all(i.startswith("ins_") and len(i) == 30 for i in ids)
    assert [i[4:] for i in ids] == sorted(i[4:] for i in ids)
    later = new_id("exe")
    time.sleep(0.002)
    assert new_id("exe")[4:14] > later[4:14]  # the time part moves on with the clock
