"""`stavily webhook create|list|show|rotate|delete|send`: URLs whose signed requests start
a workflow."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from stavily.cli.client import (
    DEFAULT_URL,
    EXIT_AUTH,
    EXIT_ERROR,
    ApiClient,
    CliError,
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
from stavily.cli.workflows import parse_inputs

app = typer.Typer(
    help="Webhooks: a URL per workflow whose signed requests start it (docs/triggers.md).",
    no_args_is_help=True,
)

HookArg = Annotated[str, typer.Argument(metavar="ID", help="The webhook's id (hook_...)")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")]

_SIGNING = (
    "Sign each request with X-Stavily-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "
    '"<t>.<body>")>, or GitHub\'s X-Hub-Signature-256; see docs/triggers.md'
)


def _keep(text: str) -> str:
    try:
        from stavily.workflows.definition import parse_duration  # loaded when used

        seconds = parse_duration(text)
    except ValueError as exc:
        fail(f"--keep-previous-for: {exc}")
    if seconds > 30 * 86400:
        fail(f"--keep-previous-for '{text}' is more than 30 days")
    return text


def _body(payload: str | None, payload_file: Path | None) -> bytes:
    """The request body exactly as it is sent and signed: a JSON object."""
    if payload is not None and payload_file is not None:
        fail("give --payload or --payload-file, not both")
    option = "--payload"
    if payload_file is not None:
        option = "--payload-file"
        try:
            body = payload_file.read_bytes()
        except OSError as exc:
            fail(f"cannot read {payload_file}: {exc.strerror or exc}", exit_code=EXIT_ERROR)
    else:
        body = (payload if payload is not None else "{}").encode()
    try:
        value = json.loads(body)
    except ValueError as exc:
        fail(f"{option} is not JSON: {exc}")
    if not isinstance(value, dict):
        fail(f"{option} must be a JSON object")
    return body


def _facts(hook: dict[str, Any]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim")
    grid.add_column()
    rows: list[tuple[str, Any]] = [
        ("workflow", hook["workflow"]),
        ("url", hook["url"]),
        ("description", hook.get("description")),
        ("idempotency field", hook.get("idempotency_field")),
        ("tolerance", f"{hook['tolerance_seconds']} s"),
        ("created", f"{when(hook.get('created_at'))} by {hook.get('created_by') or '-'}"),
        ("rotated", when(hook.get("rotated_at"))),
        ("previous secret until", when(hook.get("previous_secret_expires_at"))),
    ]
    for name, value in (hook.get("inputs") or {}).items():
        rows.append((f"input {name}", value))
    for key, value in rows:
        grid.add_row(key, cell(value))
    return grid


@app.command("create")
@handles_errors
def create(
    workflow: Annotated[
        str, typer.Argument(metavar="WORKFLOW", help="The workflow its requests start")
    ],
    description: Annotated[
        str | None, typer.Option("--description", metavar="TEXT", help="What it is for")
    ] = None,
    idempotency_field: Annotated[
        str | None,
        typer.Option(
            "--idempotency-field",
            metavar="FIELD",
            help="A dotted body field (delivery.id) whose value makes a repeat the same "
            "request, when the sender gives no delivery header",
        ),
    ] = None,
    inputs: Annotated[
        list[str] | None,
        typer.Option(
            "--input",
            metavar="NAME=TEMPLATE",
            help="A run input: a value, or a template over the request "
            "('{{ trigger.payload.ref }}'). Repeatable",
        ),
    ] = None,
    tolerance: Annotated[
        int | None,
        typer.Option(
            "--tolerance",
            metavar="SECONDS",
            min=10,
            max=86400,
            help="How far a signature's timestamp may be from now (default 300)",
        ),
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """A webhook for WORKFLOW: its URL, and its secret, shown this once."""
    body: dict[str, Any] = {"workflow": workflow, "inputs": parse_inputs(inputs or [], None)}
    if description is not None:
        body["description"] = description
    if idempotency_field is not None:
        body["idempotency_field"] = idempotency_field
    if tolerance is not None:
        body["tolerance_seconds"] = tolerance
    with ApiClient(url, token) as client:
        hook = client.post("/webhooks", json=body)
    if output is Output.json:
        print_json(hook)
        return
    out = console()
    out.print(Text(f"webhook {hook['id']} for workflow {hook['workflow']}", style="green"))
    out.print(Text(f"  url     {hook['url']}"), soft_wrap=True)
    out.print(Text(f"  secret  {hook['secret']}"), soft_wrap=True)
    out.print(Text("The secret is shown only now: store it. " + _SIGNING), soft_wrap=True)
    out.print(
        Text(f"try it: stavily webhook send {hook['id']} --secret <secret>", style="dim"),
        soft_wrap=True,
    )


@app.command("list")
@handles_errors
def list_webhooks(
    workflow: Annotated[
        str | None, typer.Option("--workflow", metavar="NAME", help="Only this workflow's")
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Webhooks, oldest first (never their secrets)."""
    with ApiClient(url, token) as client:
        data = client.get("/webhooks", params={"workflow": workflow})
    if output is Output.json:
        print_json(data)
        return
    if not data["webhooks"]:
        console().print("no webhooks", style="dim")
        return
    rows = table("id", "workflow", "url", "rotated", "previous secret until")
    for hook in data["webhooks"]:
        rows.add_row(
            cell(hook["id"]),
            cell(hook["workflow"]),
            cell(hook["url"]),
            cell(when(hook.get("rotated_at"))),
            cell(when(hook.get("previous_secret_expires_at"))),
        )
    print_table(rows)


@app.command("show")
@handles_errors
def show(
    hook_id: HookArg,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """One webhook: its URL, workflow, inputs, rotation (never its secret)."""
    with ApiClient(url, token) as client:
        hook = client.get(f"/webhooks/{segment(hook_id)}")
    if output is Output.json:
        print_json(hook)
        return
    out = console()
    out.print(Text(f"webhook {hook['id']}"))
    out.print(_facts(hook), soft_wrap=True)


@app.command("rotate")
@handles_errors
def rotate(
    hook_id: HookArg,
    keep_previous_for: Annotated[
        str,
        typer.Option(
            "--keep-previous-for",
            metavar="DURATION",
            help="How long the replaced secret is still accepted, so senders can move "
            "over (0s: not at all; at most 30 days)",
        ),
    ] = "24h",
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """A new secret, shown this once; the old one is still accepted for a while."""
    body = {"keep_previous_for": _keep(keep_previous_for)}
    with ApiClient(url, token) as client:
        hook = client.post(f"/webhooks/{segment(hook_id)}/rotate", json=body)
    if output is Output.json:
        print_json(hook)
        return
    out = console()
    out.print(Text(f"new secret for webhook {hook['id']}:", style="green"))
    out.print(Text(hook["secret"]), soft_wrap=True)
    until = hook.get("previous_secret_expires_at")
    old = (
        f"the old secret is still accepted until {when(until)} UTC"
        if until
        else "the old secret is no longer accepted"
    )
    out.print(Text(f"shown only this once; {old}", style="dim"), soft_wrap=True)


@app.command("delete")
@handles_errors
def delete(
    hook_id: HookArg,
    yes: YesOpt = False,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Delete the webhook: requests to its URL are refused from now on (404)."""
    with ApiClient(url, token) as client:
        hook = client.get(f"/webhooks/{segment(hook_id)}")
        if not yes and not typer.confirm(
            f"Delete webhook {hook['id']} of workflow {hook['workflow']}? "
            "Requests to its URL will be refused",
            err=True,
        ):
            fail("not deleted", exit_code=EXIT_ERROR)
        client.delete(f"/webhooks/{segment(hook['id'])}")
    if output is Output.json:
        print_json({"id": hook["id"], "deleted": True})
        return
    console().print(Text(f"webhook {hook['id']} deleted"))


@app.command("send")
@handles_errors
def send(
    hook_id: HookArg,
    secret: Annotated[
        str,
        typer.Option(
            "--secret",
            envvar="STAVILY_WEBHOOK_SECRET",
            help="The webhook's secret, to sign with",
            show_default=False,
        ),
    ],
    payload: Annotated[
        str | None,
        typer.Option("--payload", "-p", metavar="JSON", help="The body, a JSON object [{}]"),
    ] = None,
    payload_file: Annotated[
        Path | None,
        typer.Option("--payload-file", metavar="FILE", help="The body from a file, sent as it is"),
    ] = None,
    event_type: Annotated[
        str | None,
        typer.Option(
            "--event", metavar="TYPE", help="The event's type (X-Stavily-Event; default webhook)"
        ),
    ] = None,
    delivery: Annotated[
        str | None,
        typer.Option(
            "--delivery",
            metavar="ID",
            help="A delivery id (X-Stavily-Delivery): the same id again is a duplicate, "
            "which starts nothing",
        ),
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    output: OutputOpt = Output.table,
) -> None:
    """Sign a test request with the secret and POST it to the hook, as a sender would."""
    from stavily.workflows.webhooks import sign  # server code: loaded when used

    body = _body(payload, payload_file)
    headers = {
        "Content-Type": "application/json",
        "X-Stavily-Signature": sign(secret, body, int(time.time())),
    }
    if event_type is not None:
        headers["X-Stavily-Event"] = event_type
    if delivery is not None:
        headers["X-Stavily-Delivery"] = delivery
    # no API token: the signature is the hook's only credential
    with ApiClient(url, None) as client:
        try:
            answer = client.request(
                "POST", f"/hooks/{segment(hook_id)}", api=False, content=body, headers=headers
            )
        except CliError as error:
            if error.exit_code == EXIT_AUTH:  # not an API token's problem: the secret's
                error.hint = "check the secret (--secret or STAVILY_WEBHOOK_SECRET)"
            raise
    if output is Output.json:
        print_json(answer)
        return
    if answer.get("status") == "duplicate":
        line = Text(f"duplicate of event {answer['event_id']}", style="yellow")
        if answer.get("outcome"):
            line.append(f" ({answer['outcome']})")
    else:
        line = Text(f"accepted: event {answer['event_id']}", style="green")
    line.append(f"  see: stavily event show {answer['event_id']}", style="dim")
    console().print(line, soft_wrap=True)
