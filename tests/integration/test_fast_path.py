"""The agent API's fast path (api.agents_v1.serve_fast): the official cycle is served by
it, anything it is unsure of passes on to the framework's routes, and both give the
same answers."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from stavily.api import agents_v1
from tests.harness import Orchestrator, SimAgent, fresh_database, serve

WORKFLOW = "name: fast\nactions:\n  steps:\n    - {name: only, plugin: echo}\n"


@pytest.fixture(scope="module")
def taken(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Orchestrator, Counter[str]]]:
    """A server whose fast path counts what it took and what it let pass."""
    counts: Counter[str] = Counter()
    original = agents_v1.serve_fast

    async def counting(scope: Any, receive: Any, send: Any, body: bytes | None) -> bool:
        async def noting(message: Any) -> None:
            if message["type"] == "http.response.start":  # counted before the client reads
                counts["taken"] += 1
            await send(message)

        took = await original(scope, receive, noting, body)
        if not took:
            counts["passed"] += 1
        return took

    tmp = tmp_path_factory.mktemp("fast")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(agents_v1, "serve_fast", counting)
        with fresh_database("sqlite", tmp) as url, serve(url, tmp) as orch:
            orch.apply(WORKFLOW)
            yield orch, counts


def delta(counts: Counter[str], action: Any) -> tuple[Any, Counter[str]]:
    before = counts.copy()
    result = action()
    return result, counts - before


def test_the_official_cycle_is_served_by_the_fast_path(
    taken: tuple[Orchestrator, Counter[str]],
) -> None:
    orch, counts = taken
    agent = SimAgent(orch)
    execution = orch.run("fast")

    def cycle() -> httpx.Response:
        beat = agent.client.post(f"/agents/v1/{agent.id}/heartbeat", json={"status": "online"})
        assert beat.status_code == 200, beat.text
        instruction = agent.poll(wait=5)
        assert instruction is not None
        return agent.report(instruction, output={"ok": True})  # PUT executing, POST result

    answer, seen = delta(counts, cycle)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"acknowledged": True, "next_instruction": None}
    assert seen == Counter(taken=4)
    assert orch.wait_for(execution["id"])["status"] == "succeeded"


def test_what_the_fast_path_is_unsure_of_gets_the_frameworks_answer(
    taken: tuple[Orchestrator, Counter[str]],
) -> None:
    orch, counts = taken
    agent = SimAgent(orch)
    base = f"/agents/v1/{agent.id}"
    cases = [
        (lambda: agent.client.get(f"{base}/instructions?wait=abc"), "query:wait"),
        (lambda: agent.client.get(f"{base}/instructions?slots=0"), "query:slots"),
        (lambda: agent.client.put(f"{base}/instructions/x", json={"status": 5}), "status"),
        (lambda: agent.client.post(f"{base}/instructions/x/result", json={}), "status"),
        (lambda: agent.client.post(f"{base}/heartbeat", json={"capacity": "x"}), "capacity"),
    ]
    for request, path in cases:
        response, seen = delta(counts, request)
        assert seen == Counter(passed=1)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_input"
        assert [d["path"] for d in error["details"]] == [path]


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/instructions", None, 200),
        ("PUT", "/instructions/ins_unknown", {"status": "executing"}, 404),
        ("POST", "/instructions/ins_unknown/result", {"status": "completed"}, 404),
        ("POST", "/heartbeat", {"status": "sleeping"}, 422),
    ],
)
def test_both_ways_answer_alike(
    taken: tuple[Orchestrator, Counter[str]],
    method: str,
    path: str,
    body: dict[str, Any] | None,
    status: int,
) -> None:
    """The same request taken by the fast path, and passed on (a repeated query
    parameter makes it pass), gets the same status, headers and bytes, for each
    credential: right, missing, unknown, another agent's."""
    orch, counts = taken
    agent, other = SimAgent(orch), SimAgent(orch)
    credentials = {
        "right": (agent.key, status),
        "missing": (None, 401),
        "unknown": ("stv_agent_nobody", 401),
        "other": (other.key, 403),
    }
    http = httpx.Client(base_url=orch.url)
    try:
        for name, (key, expected) in credentials.items():
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            answers = []
            for query, way in (("", "taken"), ("?x=1&x=2", "passed")):
                url = f"/agents/v1/{agent.id}{path}{query}"
                response, seen = delta(
                    counts,
                    lambda url=url, h=headers: http.request(method, url, json=body, headers=h),
                )
                assert seen == Counter({way: 1}), (name, way)
                answers.append(response)
            fast, framework = answers
            assert fast.status_code == framework.status_code == expected, (name, fast.text)
            assert fast.content == framework.content, name
            assert fast.headers.get("retry-after") == framework.headers.get("retry-after")
            assert fast.headers["content-type"] == framework.headers["content-type"]
    finally:
        http.close()


def test_a_flooding_agent_is_limited_on_the_fast_path_too(tmp_path: Path) -> None:
    limit = {"agent_rate_limit": "3/second"}
    with fresh_database("sqlite", tmp_path) as url, serve(url, tmp_path, **limit) as orch:
        agent = SimAgent(orch)
        codes = [agent.client.get(f"/agents/v1/{agent.id}/instructions").status_code]
        codes += [agent.client.get(f"/agents/v1/{agent.id}/instructions").status_code]
        codes += [agent.client.get(f"/agents/v1/{agent.id}/instructions").status_code]
        limited = agent.client.get(f"/agents/v1/{agent.id}/instructions")
        assert codes == [200, 200, 200]
        assert limited.status_code == 429
        assert limited.headers["Retry-After"] == "1"
        assert limited.json()["error"]["code"] == "rate_limited"
