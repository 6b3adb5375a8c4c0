"""`stavily event send|list|show` over real HTTP, on each database: an event sent from
the CLI starts the workflow its `on:` rule matches, once; list and show say what each
started or why not; bad input is a message and a non-zero exit."""

from __future__ import annotations

import json
import uuid

from tests.harness import Invoke, Orchestrator

RULED = """
name: {name}
on: [{{source: api, type: "{kind}", where: {{field: level, ge: 3}}}}]
actions: {{steps: [{{name: only, plugin: echo}}]}}
"""


def test_event_send_list_show(cli: Invoke, orchestrator: Orchestrator) -> None:
    name, kind = f"cli-ruled-{uuid.uuid4().hex[:6]}", f"alarm.{uuid.uuid4().hex[:6]}"
    applied = orchestrator.api.post(
        "/api/v1/workflows",
        content=RULED.format(name=name, kind=kind),
        headers={"Content-Type": "application/yaml"},
    )
    assert applied.status_code == 201, applied.text

    sent = cli("event", "send", kind, "--payload", '{"level": 4}', "--key", "k-1", "-o", "json")
    assert sent.exit_code == 0, sent.output
    event = json.loads(sent.stdout)
    assert event["outcome"] == "started" and event["workflow"] == name
    again = cli("event", "send", kind, "--payload", '{"level": 4}', "--key", "k-1")
    assert again.exit_code == 0, again.output
    assert again.stdout.startswith(f"event {event['id']} started {event['started'][0]}")
    low = cli("event", "send", kind, "-p", '{"level": 1}')
    assert low.exit_code == 0 and " unmatched: no workflow's rule matched" in low.stdout

    listed = cli("event", "list", "--type", kind)
    assert listed.exit_code == 0, listed.output
    rows = [line for line in listed.stdout.splitlines()[1:] if line.strip()]
    assert len(rows) == 2 and event["id"] in listed.stdout and "unmatched" in rows[0]
    shown = cli("event", "show", event["id"])
    assert shown.exit_code == 0, shown.output
    assert f"workflow {name}" in shown.stdout and "key k-1" in shown.stdout
    assert '"level": 4' in shown.stdout
    assert cli("event", "list", "--type", "nothing.of.the.kind").stdout.strip() == "no events"


def test_event_cli_errors(cli: Invoke) -> None:
    bad_json = cli("event", "send", "x", "--payload", "{not json")
    assert bad_json.exit_code == 2 and "--payload is not JSON" in bad_json.stderr
    not_object = cli("event", "send", "x", "--payload", "[1]")
    assert not_object.exit_code == 2 and "must be a JSON object" in not_object.stderr
    refused = cli("event", "send", "bad\ttype")
    assert refused.exit_code == 2 and "error:" in refused.stderr
    missing = cli("event", "show", "evt_nope")
    assert missing.exit_code != 0 and "no event 'evt_nope'" in missing.stderr
