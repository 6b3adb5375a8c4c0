"""Two orchestrator replicas on one PostgreSQL: work queued through one wakes the long poll
an agent holds open on the other (LISTEN/NOTIFY), at once rather than when the poll ends."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from stavily.store.notify import MAX_PAYLOAD, WorkChannel, decode, encode
from stavily.timeutil import utcnow
from tests.harness import PG_URL, fresh_database, serve

WORKFLOW = """
name: replicated
version: "1.0.0"
actions:
  steps:
    - name: only
      plugin: noop
"""


SHARED_JWT_KEY = "replicas-share-this-key-0123456789abcdef"


@pytest.mark.skipif(not PG_URL, reason="STAVILY_TEST_DATABASE_URL is not set: replicas need it")
def test_a_run_started_on_one_replica_wakes_a_poll_held_on_the_other(tmp_path: Path) -> None:
    with (
        fresh_database("postgresql", tmp_path) as url,
        # replicas on two machines share the agent JWT key through their configuration
        serve(
            url, tmp_path / "a", agent_jwt_key=SHARED_JWT_KEY, secrets_key=SHARED_JWT_KEY
        ) as first,
        serve(
            url, tmp_path / "b", agent_jwt_key=SHARED_JWT_KEY, secrets_key=SHARED_JWT_KEY
        ) as second,
    ):
        agent_id, key = first.create_agent()
        first.apply(WORKFLOW)
        agent = second.agent_client(key)
        answer: dict[str, object] = {}

        def long_poll() -> None:
            began = time.monotonic()
            response = agent.get(f"/agents/v1/{agent_id}/instructions", params={"wait": 20})
            answer.update(status=response.status_code, body=response.json())
            answer["took"] = time.monotonic() - began

        poller = threading.Thread(target=long_poll)
        poller.start()
        time.sleep(0.5)  # the poll is waiting on the second replica
        started = time.monotonic()
        execution = first.run("replicated")
        poller.join(timeout=25)
        assert answer["status"] == 200
        instruction = answer["body"]["instruction"]  # type: ignore[index]
        assert instruction is not None and instruction["context"]["execution_id"] == execution["id"]
        assert time.monotonic() - started < 3  # woken, not left to the end of its 20 s wait


def test_notifications_round_trip_and_stay_under_the_payload_limit() -> None:
    now = utcnow()
    small = {
        "id": "ins_1",
        "organization_id": "org",
        "agent_type": "action",
        "target_agent_name": None,
        "selector": {"labels": {"env": "prod"}},
        "preferred_agent_id": "agt_1",
        "prefer_until": now,
        "available_at": None,
        "input_data": {"not": "sent"},
    }
    (payload,) = encode([small])
    (back,) = decode(payload)
    assert back["prefer_until"] == now and back["selector"] == small["selector"]
    assert "input_data" not in back
    huge = {**small, "id": "ins_2", "selector": {"labels": {"k": "x" * 9000}}}
    payloads = encode([small] * 40 + [huge])
    assert len(payloads) > 1 and all(len(p.encode()) < 8000 for p in payloads)
    items = [item for p in payloads for item in decode(p)]
    assert len(items) == 41 and items[-1]["selector"] == {} and items[-1]["id"] == "ins_2"
    assert len(payloads[0]) <= MAX_PAYLOAD


@pytest.mark.skipif(not PG_URL, reason="STAVILY_TEST_DATABASE_URL is not set: replicas need it")
def test_work_published_at_once_reaches_the_other_replica_whole_and_in_order(
    tmp_path: Path,
) -> None:
    async def main(url: str) -> list[str]:
        heard: list[str] = []
        arrived = asyncio.Event()

        def on_work(items: list[dict[str, object]]) -> None:
            heard.extend(str(item["id"]) for item in items)
            if len(heard) >= 300:
                arrived.set()

        sender = WorkChannel(url, lambda items: None)
        listener = WorkChannel(url, on_work)
        await sender.start()
        await listener.start()
        try:
            # several publishes while one is on its way, more than one payload's worth
            for batch in range(30):
                sender.publish([item(f"ins_{batch:02d}_{n}") for n in range(10)])
                if batch % 7 == 0:
                    await asyncio.sleep(0)
            async with asyncio.timeout(10):
                await arrived.wait()
        finally:
            await sender.close()
            await listener.close()
        return heard

    def item(instruction_id: str) -> dict[str, object]:
        return {
            "id": instruction_id,
            "organization_id": "org",
            "agent_type": "action",
            "selector": {"labels": {"pad": "x" * 40}},
        }

    with fresh_database("postgresql", tmp_path) as url:
        heard = asyncio.run(main(url))
    expected = [f"ins_{batch:02d}_{n}" for batch in range(30) for n in range(10)]
    assert heard == expected
