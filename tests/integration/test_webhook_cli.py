"""`stavily webhook create|list|show|rotate|delete|send` over real HTTP, on each database:
a hook made from the CLI shows its secret once; a request `webhook send` signs with it
is accepted and starts the workflow; a wrong, rotated-out or deleted hook's secret is
refused; bad input is a message and a non-zero exit."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

from tests.harness import Invoke, Orchestrator

WORKFLOW = """
name: {name}
inputs:
  ref: {{type: string, default: none}}
actions: {{steps: [{{name: only, plugin: echo}}]}}
"""


def _workflow(orchestrator: Orchestrator) -> str:
    name = f"cli-hooked-{uuid.uuid4().hex[:6]}"
    orchestrator.apply(WORKFLOW.format(name=name))
    return name


def _create(cli: Invoke, workflow: str, *args: str) -> dict[str, Any]:
    made = cli("webhook", "create", workflow, *args, "-o", "json")
    assert made.exit_code == 0, made.output
    return json.loads(made.stdout)  # type: ignore[no-any-return]


def _send(cli: Invoke, hook_id: str, secret: str, payload: dict[str, Any], *args: str) -> Any:
    return cli("webhook", "send", hook_id, "--secret", secret, "-p", json.dumps(payload), *args)


def _processed(cli: Invoke, event_id: str) -> dict[str, Any]:
    """The event once the run it starts (begun just after the 202) is begun."""
    deadline = time.monotonic() + 15
    while True:
        shown = cli("event", "show", event_id, "-o", "json")
        assert shown.exit_code == 0, shown.output
        event = json.loads(shown.stdout)
        if event["outcome"] != "accepted" or time.monotonic() > deadline:
            return event  # type: ignore[no-any-return]
        time.sleep(0.05)


def test_create_list_show_send(cli: Invoke, orchestrator: Orchestrator) -> None:
    workflow = _workflow(orchestrator)
    made = cli(
        "webhook",
        "create",
        workflow,
        "--description",
        "from the CI",
        "--input",
        "ref={{ trigger.payload.ref }}",
        "--tolerance",
        "120",
    )
    assert made.exit_code == 0, made.output
    lines = made.stdout.splitlines()
    assert lines[0].startswith("webhook hook_") and lines[0].endswith(f"for workflow {workflow}")
    hook_id = lines[0].split()[1]
    assert lines[1].split() == ["url", f"{orchestrator.url}/hooks/{hook_id}"]
    assert lines[2].split()[0] == "secret" and lines[2].split()[1].startswith("whsec_")
    secret = lines[2].split()[1]
    assert "shown only now" in made.stdout and "docs/triggers.md" in made.stdout

    listed = cli("webhook", "list", "--workflow", workflow)
    assert listed.exit_code == 0, listed.output
    header, *rows = [line for line in listed.stdout.splitlines() if line.strip()]
    assert header.split()[:4] == ["id", "workflow", "url", "rotated"]
    assert "previous secret until" in header
    assert len(rows) == 1 and rows[0].split()[:3] == [
        hook_id,
        workflow,
        f"{orchestrator.url}/hooks/{hook_id}",
    ]
    assert hook_id in cli("webhook", "list").stdout
    assert cli("webhook", "list", "--workflow", "no-such").stdout.strip() == "no webhooks"
    shown = cli("webhook", "show", hook_id)
    assert shown.exit_code == 0, shown.output
    assert f"workflow               {workflow}" in shown.stdout
    assert "from the CI" in shown.stdout and "120 s" in shown.stdout
    assert "{{ trigger.payload.ref }}" in shown.stdout
    as_json = cli("webhook", "show", hook_id, "-o", "json")
    assert json.loads(as_json.stdout)["inputs"] == {"ref": "{{ trigger.payload.ref }}"}
    for output in (listed, shown, as_json, cli("webhook", "list", "-o", "json")):
        assert secret not in output.stdout and '"secret"' not in output.stdout

    sent = _send(cli, hook_id, secret, {"ref": "main"}, "--event", "push")
    assert sent.exit_code == 0, sent.output
    assert sent.stdout.startswith("accepted: event evt_")
    event_id = sent.stdout.split()[2]
    event = _processed(cli, event_id)
    assert event["outcome"] == "started" and event["source"] == "webhook", event
    assert event["type"] == "push" and event["workflow"] == workflow
    assert event["sent_by"] == f"webhook:{hook_id}"
    execution = orchestrator.execution(event["started"][0])
    assert execution["inputs"]["ref"] == "main"
    listed_events = cli("event", "list", "--source", "webhook", "--type", "push")
    row = next(line for line in listed_events.stdout.splitlines() if event_id in line)
    assert "started" in row and workflow in row
    assert f"workflow {workflow}" in cli("event", "show", event_id).stdout

    # the secret may come from the environment; JSON for scripts
    env_sent = cli(
        "webhook",
        "send",
        hook_id,
        "-p",
        '{"ref": "dev"}',
        "-o",
        "json",
        env={"STAVILY_WEBHOOK_SECRET": secret},
    )
    assert env_sent.exit_code == 0, env_sent.output
    assert json.loads(env_sent.stdout)["status"] == "accepted"


def test_send_refused(cli: Invoke, orchestrator: Orchestrator, tmp_path: Any) -> None:
    hook = _create(cli, _workflow(orchestrator))
    wrong = _send(cli, hook["id"], "whsec_not-the-secret", {"n": 1})
    assert wrong.exit_code != 0 and wrong.stdout == ""
    assert "error: the signature does not match this webhook's secret" in wrong.stderr
    assert "--secret" in wrong.stderr and "STAVILY_TOKEN" not in wrong.stderr
    unknown = _send(cli, "hook_nope", hook["secret"], {"n": 1})
    assert unknown.exit_code == 3 and "no webhook 'hook_nope'" in unknown.stderr

    body = tmp_path / "push.json"
    body.write_text('{"n": 2,\n "as": "a file"}\n')
    sent = [
        cli(
            "webhook",
            "send",
            hook["id"],
            "--secret",
            hook["secret"],
            "--payload-file",
            str(body),
            "--delivery",
            "d-1",
        )
        for _ in range(2)
    ]
    assert sent[0].exit_code == 0 and sent[0].stdout.startswith("accepted"), sent[0].output
    assert sent[1].exit_code == 0, sent[1].output  # the same delivery again
    assert sent[1].stdout.startswith(f"duplicate of event {sent[0].stdout.split()[2]}")
    assert _processed(cli, sent[0].stdout.split()[2])["payload"] == {"n": 2, "as": "a file"}

    for args, message in (
        (["-p", "{not json"], "--payload is not JSON"),
        (["-p", "[1]"], "--payload must be a JSON object"),
        (["--payload-file", str(tmp_path / "none.json")], "cannot read"),
        (["-p", "{}", "--payload-file", str(body)], "not both"),
    ):
        bad = cli("webhook", "send", hook["id"], "--secret", "s", *args)
        assert bad.exit_code != 0 and message in bad.stderr, (args, bad.output)
    no_secret = cli("webhook", "send", hook["id"], env={"STAVILY_WEBHOOK_SECRET": None})
    assert no_secret.exit_code == 2 and "--secret" in no_secret.output


def test_rotate(cli: Invoke, orchestrator: Orchestrator) -> None:
    hook = _create(cli, _workflow(orchestrator))
    old = hook["secret"]
    rotated = cli("webhook", "rotate", hook["id"])
    assert rotated.exit_code == 0, rotated.output
    lines = rotated.stdout.splitlines()
    assert lines[0] == f"new secret for webhook {hook['id']}:"
    new = lines[1].strip()
    assert new.startswith("whsec_") and new != old
    assert "the old secret is still accepted until 20" in rotated.stdout
    assert _send(cli, hook["id"], old, {"n": 1}).stdout.startswith("accepted")
    assert _send(cli, hook["id"], new, {"n": 2}).stdout.startswith("accepted")
    listed = cli("webhook", "list")
    row = next(line for line in listed.stdout.splitlines() if line.startswith(hook["id"]))
    # rotated at, and the previous secret's end
    assert len(re.findall(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", row)) == 2, row
    assert old not in listed.stdout and new not in listed.stdout

    again = cli("webhook", "rotate", hook["id"], "--keep-previous-for", "0s", "-o", "json")
    assert again.exit_code == 0, again.output
    newest = json.loads(again.stdout)
    assert newest["previous_secret_expires_at"] is None
    refused = _send(cli, hook["id"], new, {"n": 3})
    assert refused.exit_code != 0 and "does not match" in refused.stderr
    refused = _send(cli, hook["id"], old, {"n": 4})
    assert refused.exit_code != 0 and "does not match" in refused.stderr
    assert _send(cli, hook["id"], newest["secret"], {"n": 5}).exit_code == 0
    gone = cli("webhook", "rotate", hook["id"], "--keep-previous-for", "0")
    assert "the old secret is no longer accepted" in gone.stdout


def test_delete(cli: Invoke, orchestrator: Orchestrator) -> None:
    hook = _create(cli, _workflow(orchestrator))
    kept = cli("webhook", "delete", hook["id"], input="n\n")
    assert kept.exit_code == 1 and "not deleted" in kept.stderr
    assert f"Delete webhook {hook['id']} of workflow {hook['workflow']}?" in kept.output
    assert cli("webhook", "show", hook["id"]).exit_code == 0
    asked = cli("webhook", "delete", hook["id"], input="y\n")
    assert asked.exit_code == 0 and f"webhook {hook['id']} deleted" in asked.stdout
    sent = _send(cli, hook["id"], hook["secret"], {"n": 1})
    assert sent.exit_code == 3 and f"no webhook '{hook['id']}'" in sent.stderr
    shown = cli("webhook", "show", hook["id"])
    assert shown.exit_code == 3 and f"no webhook '{hook['id']}'" in shown.stderr
    again = cli("webhook", "delete", hook["id"], "--yes")
    assert again.exit_code == 3 and f"no webhook '{hook['id']}'" in again.stderr

    other = _create(cli, hook["workflow"])
    quiet = cli("webhook", "delete", other["id"], "--yes", "-o", "json")
    assert quiet.exit_code == 0, quiet.output
    assert json.loads(quiet.stdout) == {"id": other["id"], "deleted": True}


def test_bad_input(cli: Invoke, orchestrator: Orchestrator) -> None:
    unknown = cli("webhook", "create", f"no-such-{uuid.uuid4().hex[:6]}")
    assert unknown.exit_code == 3 and "error: no workflow named 'no-such-" in unknown.stderr
    workflow = _workflow(orchestrator)
    no_pair = cli("webhook", "create", workflow, "--input", "ref")
    assert no_pair.exit_code == 2 and "--input 'ref' is not key=value" in no_pair.stderr
    not_trigger = cli("webhook", "create", workflow, "--input", "ref={{ inputs.x }}")
    assert not_trigger.exit_code == 2 and "invalid webhook inputs" in not_trigger.stderr
    assert "only `trigger` can be read here" in not_trigger.stderr
    field = cli("webhook", "create", workflow, "--idempotency-field", "a..b")
    assert field.exit_code == 2 and "idempotency_field" in field.stderr
    tolerance = cli("webhook", "create", workflow, "--tolerance", "1")
    assert tolerance.exit_code == 2 and "Invalid value for '--tolerance'" in tolerance.output
    assert cli("webhook", "list", "--workflow", workflow).stdout.strip() == "no webhooks"

    hook = _create(cli, workflow)
    for keep, message in (
        ("soon", "--keep-previous-for: 'soon' is not a duration"),
        ("-1h", "--keep-previous-for: '-1h' is not a duration"),
        ("31d", "--keep-previous-for '31d' is more than 30 days"),
    ):
        bad = cli("webhook", "rotate", hook["id"], "--keep-previous-for", keep)
        assert bad.exit_code == 2 and message in bad.stderr, (keep, bad.output)
    assert _send(cli, hook["id"], hook["secret"], {"n": 1}).exit_code == 0  # not rotated
    missing = cli("webhook", "rotate", "hook_nope")
    assert missing.exit_code == 3 and "no webhook 'hook_nope'" in missing.stderr
