"""PostgreSQL: a result that completes its step releases the step's dependents in the
same statement as its read (queries.REPORTED_RELEASING). Results of a fan-in's branches
that arrive together are each counted: the join is queued once, after the last."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.harness import PG_ONLY, SimAgent, serve

pytestmark = PG_ONLY

BRANCHES = 4
FAN_IN = f"""
name: fan-in
version: "1.0.0"
actions:
  steps:
{
    "".join(
        f'''    - name: b{n}
      plugin: echo
'''
        for n in range(BRANCHES)
    )
}    - name: join
      plugin: echo
      depends_on: [{", ".join(f"b{n}" for n in range(BRANCHES))}]
"""


def report(agent: SimAgent, instruction: dict[str, Any], together: threading.Barrier) -> Any:
    together.wait()
    return agent.report(instruction)


def test_branches_reported_together_release_the_join_once(pg_url: str, tmp_path: Path) -> None:
    with serve(pg_url, tmp_path) as orch:
        orch.apply(FAN_IN)
        agents = [SimAgent(orch) for _ in range(BRANCHES)]
        for _ in range(8):
            execution_id = orch.run("fan-in")["id"]
            taken = [agent.poll() for agent in agents]
            assert sorted(i["correlation_id"].split("/")[1] for i in taken if i) == [
                f"b{n}" for n in range(BRANCHES)
            ]
            for agent, instruction in zip(agents, taken, strict=True):
                base = f"/agents/v1/{agent.id}/instructions/{instruction['id']}"
                agent.client.put(base, json={"status": "executing"})
            together = threading.Barrier(BRANCHES)
            with ThreadPoolExecutor(BRANCHES) as pool:
                answers = list(pool.map(report, agents, taken, [together] * BRANCHES))
            assert [a.status_code for a in answers] == [200] * BRANCHES

            joins = [(a, i) for a in agents if (i := a.poll()) is not None]
            assert [i["correlation_id"].split("/")[1] for _, i in joins] == ["join"]
            agent, instruction = joins[0]
            assert agent.report(instruction).status_code == 200
            assert orch.wait_for(execution_id)["status"] == "succeeded"
