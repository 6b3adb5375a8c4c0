"""`stavily schedule list|show|create|pause|resume|delete`: cron and interval schedules
that start workflows."""

from __future__ import annotations

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
from stavily.cli.workflows import parse_inputs

app = typer.Typer(
    help="Schedules: cron (in a time zone) and intervals that start workflows.",
    no_args_is_help=True,
)


IdArg = Annotated[str, typer.Argument(metavar="ID", help="The schedule's id (sch_...)")]


def _every(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"every {int(seconds // size)}{unit}"
    return f"every {seconds:g}s"


def timing(schedule: dict[str, Any]) -> str:
    if schedule.get("cron"):
        return f"{schedule['cron']} ({schedule['timezone']})"
    return _every(float(schedule["every_seconds"]))


def _state(schedule: dict[str, Any]) -> Text:
    return Text("paused", style="yellow") if schedule["paused"] else Text("active", style="green")


def _one(schedule: dict[str, Any], output: Output, said: str | None = None) -> None:
    if output is Output.json:
        print_json(schedule)
        return
    out = console()
    if said:
        out.print(f"schedule {schedule['id']} {said}", soft_wrap=True)
        return
    out.print(f"schedule {schedule['id']}  {schedule['workflow']}", soft_wrap=True)
    if schedule.get("name"):
        out.print(f"  name {schedule['name']}", soft_wrap=True)
    out.print(f"  {timing(schedule)}, misfire {schedule['misfire']}", soft_wrap=True)
    line = Text("  ")
    line.append_text(_state(schedule))
    line.append(f", next {when(schedule['next_fire_at'])}, last {when(schedule['last_fired_at'])}")
    out.print(line, soft_wrap=True)
    origin = "declared in the workflow" if schedule["origin"] == "workflow" else "made by the API"
    out.print(f"  {origin}, by {schedule['created_by']} at {when(schedule['created_at'])}")
    if schedule.get("inputs"):
        out.print(f"  inputs {schedule['inputs']}", soft_wrap=True)


@app.command("list")
@handles_errors
def list_schedules(
    workflow: Annotated[
        str | None, typer.Option("--workflow", "-w", help="Only this workflow's")
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Schedules, with when each fires next."""
    with ApiClient(url, token) as client:
        data = client.get("/schedules", params={"workflow": workflow})
    if output is Output.json:
        print_json(data)
        return
    if not data["schedules"]:
        console().print("no schedules", style="dim")
        return
    rows = table("id", "workflow", "when", "state", "next", "last", "origin", "misfire")
    for schedule in data["schedules"]:
        rows.add_row(
            cell(schedule["id"]),
            cell(schedule["workflow"]),
            cell(timing(schedule)),
            _state(schedule),
            cell(when(schedule["next_fire_at"])),
            cell(when(schedule["last_fired_at"])),
            cell(schedule["origin"]),
            cell(schedule["misfire"]),
        )
    print_table(rows)


@app.command("show")
@handles_errors
def show(
    schedule_id: IdArg,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """One schedule."""
    with ApiClient(url, token) as client:
        _one(client.get(f"/schedules/{segment(schedule_id)}"), output)


@app.command("create")
@handles_errors
def create(
    workflow: Annotated[str, typer.Argument(metavar="WORKFLOW", help="The workflow it starts")],
    cron: Annotated[
        str | None, typer.Option("--cron", metavar="EXPR", help="Five cron fields, or @daily")
    ] = None,
    timezone: Annotated[
        str | None,
        typer.Option("--timezone", "--tz", metavar="TZ", help="The cron's IANA time zone"),
    ] = None,
    every: Annotated[
        str | None, typer.Option("--every", metavar="DURATION", help="An interval: 30s, 15m, 1h")
    ] = None,
    inputs: Annotated[
        list[str] | None,
        typer.Option(
            "--input",
            "-i",
            metavar="KEY=VALUE",
            help="An input of each run (JSON when it parses, else text). Repeatable.",
        ),
    ] = None,
    misfire: Annotated[
        str | None,
        typer.Option("--misfire", help="After downtime: skip, once (the default) or all"),
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="A name to tell it by")] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Make a schedule that starts WORKFLOW: --cron EXPR [--timezone TZ], or --every."""
    if (cron is None) == (every is None):
        fail("give exactly one of --cron and --every")
    body: dict[str, Any] = {"workflow": workflow, "inputs": parse_inputs(inputs or [], None)}
    for key, value in (
        ("cron", cron),
        ("timezone", timezone),
        ("every", every),
        ("misfire", misfire),
        ("name", name),
    ):
        if value is not None:
            body[key] = value
    with ApiClient(url, token) as client:
        schedule = client.post("/schedules", json=body)
    if output is Output.json:
        print_json(schedule)
        return
    console().print(
        f"schedule {schedule['id']} starts {schedule['workflow']} {timing(schedule)}; "
        f"next {when(schedule['next_fire_at'])}",
        soft_wrap=True,
    )


@app.command("pause")
@handles_errors
def pause(
    schedule_id: IdArg,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Stop it firing until resumed."""
    with ApiClient(url, token) as client:
        _one(client.post(f"/schedules/{segment(schedule_id)}/pause"), output, "paused")


@app.command("resume")
@handles_errors
def resume(
    schedule_id: IdArg,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Fire again, from its next time after now (paused-through times are not made up)."""
    with ApiClient(url, token) as client:
        schedule = client.post(f"/schedules/{segment(schedule_id)}/resume")
    _one(schedule, output, f"resumed; next {when(schedule['next_fire_at'])}")


@app.command("delete")
@handles_errors
def delete(
    schedule_id: IdArg,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Delete a schedule made by the API (a declared one: edit its workflow)."""
    with ApiClient(url, token) as client:
        client.delete(f"/schedules/{segment(schedule_id)}")
    if output is Output.json:
        print_json({"id": schedule_id, "deleted": True})
        return
    console().print(f"schedule {schedule_id} deleted", soft_wrap=True)
