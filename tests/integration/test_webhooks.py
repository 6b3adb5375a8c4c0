"""Webhooks: `/hooks/{id}` accepts a request only when signed with one of the hook's
secrets (our X-Stavily-Signature within its tolerance, or GitHub's X-Hub-Signature-256),
answers 202 at once and starts the workflow just after, once per delivery; refused
requests are recorded for the operator. Real HTTP, both databases."""

from __future__ import annotations

import concurrent.futures
import hashlib
import hmac
import json
import time
import uuid
from datetime import timedelta
from typing import Any

import httpx
import sqlalchemy as sa

from stavily.store.models import events, webhooks
from stavily.timeutil import utcnow
from stavily.workflows.webhooks import sign
from tests.harness import Orchestrator, api_token, on_database


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def workflow(orch: Orchestrator, required_input: bool = False) -> str:
    name = unique("hooked")
    inputs = "inputs:\n  ref: {type: string, required: true}\n" if required_input else ""
    orch.apply(
        f"name: {name}\n{inputs}actions:\n  steps:\n  - name: build\n    plugin: echo\n"
        "    config: {ref: '{{ inputs.ref }}', kind: '{{ trigger.type }}', "
        "pusher: '{{ trigger.payload.pusher.name }}'}\n"
    )
    return name


def create(orch: Orchestrator, name: str, **fields: Any) -> dict[str, Any]:
    response = orch.api.post("/api/v1/webhooks", json={"workflow": name, **fields})
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def post(
    hook: dict[str, Any],
    body: bytes,
    headers: dict[str, Any] | None = None,
    secret: str | None = None,
    at: int | None = None,
    signed: bool = True,
) -> httpx.Response:
    given = {"Content-Type": "application/json"}
    if signed:
        given["X-Stavily-Signature"] = sign(secret or hook["secret"], body, at or int(time.time()))
    return httpx.post(hook["url"], content=body, headers={**given, **(headers or {})})


def github(
    hook: dict[str, Any], body: bytes, delivery: str | None, secret: str | None = None
) -> Any:
    digest = hmac.new((secret or hook["secret"]).encode(), body, hashlib.sha256).hexdigest()
    headers = {
        "Content-Type": "application/json",
        "X-Hub-Signature-256": f"sha256={digest}",
        "X-GitHub-Event": "push",
    }
    if delivery is not None:
        headers["X-GitHub-Delivery"] = delivery
    return httpx.post(hook["url"], content=body, headers=headers)


def processed(orch: Orchestrator, event_id: str, timeout: float = 15) -> dict[str, Any]:
    """The event once its runs are begun (a 202 comes before)."""
    deadline = time.monotonic() + timeout
    while True:
        event = orch.api.get(f"/api/v1/events/{event_id}").json()
        if event["outcome"] != "accepted" or time.monotonic() > deadline:
            return event  # type: ignore[no-any-return]
        time.sleep(0.05)


def hook_events(orch: Orchestrator, hook: dict[str, Any]) -> list[dict[str, Any]]:
    items = orch.api.get("/api/v1/events", params={"source": "webhook", "limit": 1000}).json()
    return [e for e in items["events"] if e["sent_by"] == f"webhook:{hook['id']}"]


def test_a_signed_request_is_accepted_and_starts_its_workflow(orchestrator: Orchestrator) -> None:
    name = workflow(orchestrator, required_input=True)
    hook = create(orchestrator, name, inputs={"ref": "{{ trigger.payload.ref }}"})
    assert hook["url"].endswith(f"/hooks/{hook['id']}") and hook["secret"].startswith("whsec_")
    body = json.dumps({"ref": "refs/heads/main", "pusher": {"name": "ada"}}).encode()
    response = post(hook, body, {"X-Stavily-Event": "push"})
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "accepted"
    event = processed(orchestrator, response.json()["event_id"])
    assert event["outcome"] == "started", event
    assert (event["source"], event["type"], event["workflow"]) == ("webhook", "push", name)
    assert event["payload"] == {"ref": "refs/heads/main", "pusher": {"name": "ada"}}
    execution = orchestrator.execution(event["started"][0])
    assert execution["inputs"] == {"ref": "refs/heads/main"}
    assert execution["trigger"]["event_id"] == event["id"]
    assert execution["trigger"]["payload"]["pusher"]["name"] == "ada"


def test_a_replayed_request_is_a_duplicate(orchestrator: Orchestrator) -> None:
    hook = create(orchestrator, workflow(orchestrator))
    body, at = b'{"n": 1}', int(time.time())
    first = post(hook, body, at=at)
    second = post(hook, body, at=at)
    assert (first.status_code, second.status_code) == (202, 200), second.text
    assert second.json()["event_id"] == first.json()["event_id"]
    assert second.json()["status"] == "duplicate"
    # the same signed request with a delivery id no signature covers, or its signature
    # written otherwise, is the same request
    digest = sign(hook["secret"], body, at).split("v1=")[1]
    for headers in (
        {"Idempotency-Key": "new-key"},
        {"X-Stavily-Delivery": "new-delivery"},
        {"X-Stavily-Signature": f"t={at},v1= {digest.upper()}"},
    ):
        again = post(hook, body, headers, at=at)
        assert again.status_code == 200, (headers, again.text)
        assert again.json()["event_id"] == first.json()["event_id"]
    [event] = [e for e in hook_events(orchestrator, hook) if e["outcome"] != "refused"]
    assert event["idempotency_key"] == f"{hook['id']}:sig:{at}:{digest[:32]}"  # shown as its key


def test_github_signature_and_delivery_id(orchestrator: Orchestrator) -> None:
    hook = create(orchestrator, workflow(orchestrator))
    body = json.dumps({"ref": "refs/heads/dev", "pusher": {"name": "grace"}}).encode()
    delivery = str(uuid.uuid4())
    first = github(hook, body, delivery)
    assert first.status_code == 202, first.text
    event = processed(orchestrator, first.json()["event_id"])
    assert (event["type"], event["outcome"]) == ("push", "started")
    assert event["idempotency_key"] == f"{hook['id']}:{delivery}"
    # GitHub redelivers with the same delivery id: nothing new
    again = github(hook, body, delivery)
    assert again.status_code == 200 and again.json()["event_id"] == event["id"]
    # the same body and signature is a replay, with no delivery id or with another one
    first, again = (github(hook, b'{"n": 7}', None) for _ in range(2))
    assert (first.status_code, again.status_code) == (202, 200), again.text
    assert again.json()["event_id"] == first.json()["event_id"]
    replayed = github(hook, body, str(uuid.uuid4()))
    assert replayed.status_code == 200 and replayed.json()["event_id"] == event["id"]
    wrong = github(hook, body, str(uuid.uuid4()), secret="whsec_not-it")
    assert wrong.status_code == 401
    assert "does not match" in wrong.json()["error"]["message"]


def test_concurrent_duplicate_deliveries_start_one_run(orchestrator: Orchestrator) -> None:
    hook = create(orchestrator, workflow(orchestrator))
    body, delivery = b'{"ref": "x"}', str(uuid.uuid4())
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: github(hook, body, delivery), range(8)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] * 7 + [202], [a.text for a in answers]
    assert len({a.json()["event_id"] for a in answers}) == 1
    event = processed(orchestrator, answers[0].json()["event_id"])
    assert len(event["started"]) == 1
    runs = orchestrator.api.get("/api/v1/executions", params={"workflow": hook["workflow"]})
    assert len(runs.json()["executions"]) == 1


def test_bad_signatures_are_refused_and_recorded(orchestrator: Orchestrator) -> None:
    hook = create(orchestrator, workflow(orchestrator))
    body, now = b'{"n": 2}', int(time.time())
    cases = {
        "stale": (post(hook, body, at=now - 301), "outside this webhook's 300 s tolerance"),
        "future": (post(hook, body, at=now + 400), "outside this webhook's 300 s tolerance"),
        "wrong secret": (post(hook, body, secret="whsec_wrong"), "does not match"),
        "unsigned": (post(hook, body, signed=False), "not signed"),
        "malformed": (post(hook, body, {"X-Stavily-Signature": "v1=abc"}), "must be t="),
        # a time no number type holds, or digits that are not ASCII: refused, never a 500
        "huge time": (post(hook, body, {"X-Stavily-Signature": f"t={'9' * 400},v1=ab"}), "t="),
        "odd digits": (post(hook, body, {"X-Stavily-Signature": b"t=\xb2,v1=ab"}), "t="),
        "bad github": (
            post(hook, body, {"X-Hub-Signature-256": "sha1=abc"}, signed=False),
            "X-Hub-Signature-256 must be",
        ),
    }
    for what, (response, message) in cases.items():
        assert response.status_code == 401, (what, response.text)
        error = response.json()["error"]
        assert error["code"] == "unauthorized" and message in error["message"], (what, error)
    recorded = hook_events(orchestrator, hook)
    assert len(recorded) == len(cases)
    assert {e["outcome"] for e in recorded} == {"refused"}
    assert all(e["reason"].startswith("401 unauthorized: ") for e in recorded)
    assert all(e["started"] == [] and e["type"] == "webhook.refused" for e in recorded)
    assert (
        orchestrator.api.get("/api/v1/executions", params={"workflow": hook["workflow"]}).json()[
            "executions"
        ]
        == []
    )


def test_bodies_that_are_not_json_objects_or_too_large(orchestrator: Orchestrator) -> None:
    hook = create(orchestrator, workflow(orchestrator))
    deep = b"[" * 200 + b"]" * 200
    for body, status, message in (
        (b"ref=main&x=1", 422, "not JSON"),
        (b"[1, 2]", 422, "a JSON object"),
        (b'{"a": ' + deep + b"}", 422, "nested too deeply"),
        (b'{"a": "' + b"x" * (1024 * 1024) + b'"}', 413, "larger than"),
    ):
        response = post(hook, body)
        assert response.status_code == status, (body[:20], response.text)
        assert message in response.json()["error"]["message"]
    recorded = hook_events(orchestrator, hook)
    assert len(recorded) == 4 and {e["outcome"] for e in recorded} == {"refused"}


def test_unknown_hooks_and_methods(orchestrator: Orchestrator) -> None:
    response = httpx.post(f"{orchestrator.url}/hooks/hook_nosuch", content=b"{}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert httpx.post(f"{orchestrator.url}/hooks/", content=b"{}").status_code == 404
    assert httpx.post(f"{orchestrator.url}/hooks/a/b", content=b"{}").status_code == 404
    assert httpx.post(f"{orchestrator.url}/hooks/" + "x" * 300, content=b"{}").status_code == 404
    hook = create(orchestrator, workflow(orchestrator))
    got = httpx.get(hook["url"])
    assert got.status_code == 405 and got.headers["allow"] == "POST"


def test_rotation_keeps_the_previous_secret_for_a_while(orchestrator: Orchestrator) -> None:
    hook = create(orchestrator, workflow(orchestrator))
    old = hook["secret"]
    rotated = orchestrator.api.post(f"/api/v1/webhooks/{hook['id']}/rotate", json={})
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["secret"]
    assert new != old and rotated.json()["previous_secret_expires_at"]
    assert post(hook, b'{"k": "old"}', secret=old).status_code == 202
    assert post(hook, b'{"k": "new"}', secret=new).status_code == 202
    again = orchestrator.api.post(
        f"/api/v1/webhooks/{hook['id']}/rotate", json={"keep_previous_for": "0s"}
    )
    newest = again.json()["secret"]
    assert again.json()["previous_secret_expires_at"] is None
    assert post(hook, b'{"k": "old2"}', secret=new).status_code == 401
    assert post(hook, b'{"k": "newest"}', secret=newest).status_code == 202
    bad = orchestrator.api.post(
        f"/api/v1/webhooks/{hook['id']}/rotate", json={"keep_previous_for": "90d"}
    )
    assert bad.status_code == 422


def test_an_expired_previous_secret_is_refused(orchestrator: Orchestrator) -> None:
    hook = create(orchestrator, workflow(orchestrator))
    old = hook["secret"]
    orchestrator.api.post(f"/api/v1/webhooks/{hook['id']}/rotate", json={"keep_previous_for": "1h"})

    async def expire(conn: Any) -> None:
        await conn.execute(
            webhooks.update()
            .where(webhooks.c.id == hook["id"])
            .values(previous_expires_at=utcnow() - timedelta(seconds=1))
        )

    on_database(orchestrator.database_url, expire)
    time.sleep(2.1)  # the intake's hook cache
    assert post(hook, b'{"k": 1}', secret=old).status_code == 401


def test_delete_and_management_rules(orchestrator: Orchestrator) -> None:
    name = workflow(orchestrator)
    hook = create(orchestrator, name, description="CI pushes")
    listed = orchestrator.api.get("/api/v1/webhooks", params={"workflow": name}).json()
    assert [h["id"] for h in listed["webhooks"]] == [hook["id"]]
    assert "secret" not in listed["webhooks"][0]
    shown = orchestrator.api.get(f"/api/v1/webhooks/{hook['id']}").json()
    assert "secret" not in shown and shown["description"] == "CI pushes"

    viewer = orchestrator.client(api_token(orchestrator, "viewer"))
    assert viewer.get("/api/v1/webhooks").status_code == 200
    assert viewer.post("/api/v1/webhooks", json={"workflow": name}).status_code == 403
    assert viewer.delete(f"/api/v1/webhooks/{hook['id']}").status_code == 403
    assert viewer.post(f"/api/v1/webhooks/{hook['id']}/rotate").status_code == 403

    for body, status in (
        ({"workflow": unique("nosuch")}, 404),
        ({"workflow": name, "idempotency_field": "a..b"}, 422),
        ({"workflow": name, "inputs": {"x": "{{ secrets.token }}"}}, 422),
        ({"workflow": name, "inputs": {"x": "{{ trigger.payload"}}, 422),
        ({"workflow": name, "tolerance_seconds": 1}, 422),
        ({"workflow": name, "extra": 1}, 422),
    ):
        response = orchestrator.api.post("/api/v1/webhooks", json=body)
        assert response.status_code == status, (body, response.text)

    assert orchestrator.api.delete(f"/api/v1/webhooks/{hook['id']}").status_code == 204
    assert orchestrator.api.delete(f"/api/v1/webhooks/{hook['id']}").status_code == 404
    assert orchestrator.api.get(f"/api/v1/webhooks/{hook['id']}").status_code == 404
    assert post(hook, b'{"after": "delete"}').status_code == 404
    audit = orchestrator.api.get("/api/v1/audit", params={"limit": 200}).json()
    actions = {r["action"] for r in audit["records"] if r["subject_id"] == hook["id"]}
    assert actions == {"webhook.created", "webhook.deleted"}


def test_the_idempotency_key_from_a_body_field(orchestrator: Orchestrator) -> None:
    hook = create(orchestrator, workflow(orchestrator), idempotency_field="delivery.id")
    first = post(hook, b'{"delivery": {"id": "d-1"}, "n": 1}')
    # a new signature (another second, another body) but the same delivery: a duplicate
    second = post(hook, b'{"delivery": {"id": "d-1"}, "n": 2}', at=int(time.time()) - 5)
    assert (first.status_code, second.status_code) == (202, 200)
    # an Idempotency-Key header comes before the body's field
    keyed = [post(hook, b'{"delivery": {"id": "d-1"}, "n": 4}', {"Idempotency-Key": "k-4"})]
    keyed.append(post(hook, b'{"delivery": {"id": "d-2"}, "n": 5}', {"Idempotency-Key": "k-4"}))
    assert [r.status_code for r in keyed] == [202, 200], keyed[1].text
    missing = post(hook, b'{"n": 3}')
    assert missing.status_code == 422 and "delivery.id" in missing.json()["error"]["message"]


def test_inputs_the_workflow_refuses_record_a_refused_event(orchestrator: Orchestrator) -> None:
    hook = create(orchestrator, workflow(orchestrator, required_input=True))
    response = post(hook, b'{"no": "ref"}')
    assert response.status_code == 202
    event = processed(orchestrator, response.json()["event_id"])
    assert event["outcome"] == "refused" and "inputs.ref" in event["reason"], event
    assert event["started"] == []


def test_refusals_recorded_are_limited_per_minute(orchestrator: Orchestrator) -> None:
    hook = create(orchestrator, workflow(orchestrator))
    for n in range(14):
        assert post(hook, b'{"n": %d}' % n, secret="whsec_wrong").status_code == 401
    assert len(hook_events(orchestrator, hook)) <= 10


def test_secrets_are_sealed_in_the_database(orchestrator: Orchestrator) -> None:
    hook = create(orchestrator, workflow(orchestrator))

    async def stored(conn: Any) -> Any:
        return (
            await conn.execute(sa.select(webhooks.c.secret).where(webhooks.c.id == hook["id"]))
        ).scalar_one()

    sealed = on_database(orchestrator.database_url, stored)
    assert sealed.startswith("v1.") and hook["secret"] not in sealed


def test_an_accepted_event_left_unprocessed_is_taken_up(orchestrator: Orchestrator) -> None:
    """What a server accepted and did not process before it stopped (or another replica's)
    is processed by the sweep."""
    name = workflow(orchestrator)
    hook = create(orchestrator, name)
    event_id = f"evt_{uuid.uuid4().hex[:26].upper()}"

    async def leave(conn: Any) -> None:
        organization = await conn.scalar(
            sa.select(webhooks.c.organization_id).where(webhooks.c.id == hook["id"])
        )
        await conn.execute(
            events.insert().values(
                id=event_id,
                organization_id=organization,
                source="webhook",
                type="webhook",
                payload={"left": True},
                idempotency_key=f"{hook['id']}:left-{event_id}",
                sent_by=f"webhook:{hook['id']}",
                workflow_name=name,
                outcome="accepted",
                started=[],
                created_at=utcnow() - timedelta(seconds=30),
            )
        )

    on_database(orchestrator.database_url, leave)
    event = processed(orchestrator, event_id, timeout=15)
    assert event["outcome"] == "started", event
