"""`stavily event send|list|show`: events, and what each started (or why not)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.text import Text

from stavily.cli.client import (
    DEFAULT_URL,
    ApiClient,
    Output,
    OutputOpt,
    TokenOpt,
    UrlOpt,
    cell,
    console,
    fail,
    handles_errors,
    print_json,
    print_table,
    segment,
    table,
    when,
)

app = typer.Typer(
    help="Events: what may start workflows (sensors, the API, manual runs), and what each started.",
    no_args_is_help=True,
)

_OUTCOME_STYLE = {"started": "green", "unmatched": "dim", "refused": "red"}


def _payload(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        fail(f"--payload is not JSON: {exc}")
    if not isinstance(value, dict):
        fail("--payload must be a JSON object")
    return value


def _outcome(event: dict[str, Any]) -> Text:
    text = Text(event["outcome"], style=_OUTCOME_STYLE.get(event["outcome"], ""))
    if event.get("started"):
        text.append(" " + ", ".join(event["started"]))
    return text


@app.command("send")
@handles_errors
def send(
    event_type: Annotated[str, typer.Argument(metavar="TYPE", help="The event's type")],
    payload: Annotated[
        str, typer.Option("--payload", "-p", metavar="JSON", help="The payload, a JSON object")
    ] = "{}",
    key: Annotated[
        str | None,
        typer.Option(
            "--key",
            metavar="KEY",
            help="What makes a repeat the same event (default: the payload's id)",
        ),
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Send an event from the API: it starts every workflow an `on:` rule of which it
    matches, once per key."""
    body: dict[str, Any] = {"type": event_type, "payload": _payload(payload)}
    if key is not None:
        body["idempotency_key"] = key
    with ApiClient(url, token) as client:
        event = client.post("/events", json=body)
    if output is Output.json:
        print_json(event)
        return
    line = Text(f"event {event['id']} ")
    line.append_text(_outcome(event))
    if event.get("reason"):
        line.append(f": {event['reason']}", style="dim")
    console().print(line, soft_wrap=True)


@app.command("list")
@handles_errors
def list_events(
    source: Annotated[
        str | None,
        typer.Option("--source", help="Only from agent, api, manual, webhook or schedule"),
    ] = None,
    event_type: Annotated[
        str | None, typer.Option("--type", metavar="TYPE", help="Only of this type")
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", "-n", min=1, max=1000, help="At most this many events")
    ] = 50,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Events, newest first, with what each started or why it started nothing."""
    params = {"source": source, "type": event_type, "limit": limit}
    with ApiClient(url, token) as client:
        data = client.get("/events", params=params)
    if output is Output.json:
        print_json(data)
        return
    if not data["events"]:
        console().print("no events", style="dim")
        return
    rows = table("time", "id", "source", "type", "workflow", "outcome", wrap=("outcome",))
    for event in data["events"]:
        rows.add_row(
            cell(when(event.get("created_at"))),
            cell(event["id"]),
            cell(event["source"]),
            cell(event["type"], limit=40),
            cell(event.get("workflow")),
            _outcome(event),
        )
    print_table(rows)


@app.command("show")
@handles_errors
def show(
    event_id: Annotated[str, typer.Argument(metavar="ID", help="The event's id (evt_...)")],
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """One event: where it came from, its payload, what it started or why not."""
    with ApiClient(url, token) as client:
        event = client.get(f"/events/{segment(event_id)}")
    if output is Output.json:
        print_json(event)
        return
    out = console()
    out.print(f"event {event['id']}  {event['source']}  {event['type']}", soft_wrap=True)
    out.print(f"  received {when(event['created_at'])} from {event['sent_by']}", soft_wrap=True)
    if event.get("workflow"):
        out.print(f"  workflow {event['workflow']}, step {event.get('step') or '-'}")
    if event.get("idempotency_key"):
        out.print(f"  key {event['idempotency_key']}", soft_wrap=True)
    line = Text("  ")
    line.append_text(_outcome(event))
    if event.get("reason"):
        line.append(f": {event['reason']}")
    out.print(line, soft_wrap=True)
    out.print("  payload " + json.dumps(event["payload"], default=str), soft_wrap=True)
