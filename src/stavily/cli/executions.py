"""`stavily execution ...`: list, show, cancel, rerun and read the logs of executions."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from stavily.cli.client import (
    DEFAULT_URL,
    FINAL_EXECUTION,
    ApiClient,
    Output,
    OutputOpt,
    TokenOpt,
    UrlOpt,
    cell,
    console,
    handles_errors,
    print_json,
    segment,
    status_text,
    when,
)

app = typer.Typer(help="Executions: list, show, cancel, rerun, logs.", no_args_is_help=True)

IdArg = Annotated[str, typer.Argument(metavar="ID", help="The execution id (exe_...)")]
WatchOpt = Annotated[
    bool, typer.Option("--watch", "-w", help="Follow the execution live until it is final")
]
IntervalOpt = Annotated[
    float, typer.Option("--interval", min=0.05, help="Seconds between polls while watching")
]


# --- rendering, shared with `workflow run --watch` --------------------------------------


def execution_header(execution: dict[str, Any]) -> Text:
    text = Text()
    text.append(execution["id"], style="bold")
    text.append(f"  {execution['workflow']} v{execution['workflow_version']}  ")
    text.append_text(status_text(execution["status"]))
    if execution.get("reruns"):
        text.append(f"  (rerun {execution['reruns']})", style="dim")
    return text


def steps_table(execution: dict[str, Any], *, results: bool = False) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("step", no_wrap=True)
    table.add_column("stage")
    if results:
        table.add_column("plugin")
    table.add_column("status")
    table.add_column("attempts", justify="right")
    table.add_column("agent", no_wrap=True)
    if results:
        table.add_column("result", overflow="fold")
    table.add_column("error", overflow="fold")
    for step in execution["steps"]:
        row: list[RenderableType] = [cell(step["name"]), cell(step["stage"])]
        if results:
            row.append(cell(step.get("plugin")))
        row += [
            status_text(step["status"]),
            cell(str(step["attempts"])),
            cell(step.get("agent_id")),
        ]
        if results:
            row.append(cell(step.get("result"), limit=60))
        row.append(cell(step.get("error"), limit=80))
        table.add_row(*row)
    return table


def live_view(execution: dict[str, Any]) -> RenderableType:
    parts: list[RenderableType] = [execution_header(execution), Text(""), steps_table(execution)]
    if execution.get("error"):
        parts += [Text(""), Text(f"error: {execution['error']}", style="red")]
    return Group(*parts)


def fetch(client: ApiClient, execution_id: str) -> dict[str, Any]:
    return client.get(f"/executions/{segment(execution_id)}")  # type: ignore[no-any-return]


def watch(
    client: ApiClient, execution: dict[str, Any], interval: float, output: Output
) -> dict[str, Any]:
    """Poll until the execution is final; a live table of its steps unless output is JSON."""
    execution_id = execution["id"]
    try:
        if output is Output.json:
            while execution["status"] not in FINAL_EXECUTION:
                time.sleep(interval)
                execution = fetch(client, execution_id)
            return execution
        with Live(live_view(execution), console=console(), auto_refresh=False) as live:
            while execution["status"] not in FINAL_EXECUTION:
                time.sleep(interval)
                execution = fetch(client, execution_id)
                live.update(live_view(execution), refresh=True)
        return execution
    except KeyboardInterrupt:
        typer.echo(
            f"stopped watching; the execution goes on: stavily execution show {execution_id}",
            err=True,
        )
        raise typer.Exit(130) from None


def finish_watch(execution: dict[str, Any], output: Output) -> None:
    """Report the final state and exit: 0 if the execution succeeded, 1 otherwise."""
    if output is Output.json:
        print_json(execution)
    else:
        out = console()
        line = Text(f"execution {execution['id']} ")
        line.append_text(status_text(execution["status"]))
        out.print(line)
    raise typer.Exit(0 if execution["status"] == "succeeded" else 1)


# --- commands -----------------------------------------------------------------------------


@app.command("list")
@handles_errors
def list_executions(
    workflow: Annotated[str | None, typer.Option("--workflow", help="Only this workflow")] = None,
    status: Annotated[
        str | None,
        typer.Option(
            "--status", help="Only this status: queued, running, succeeded, failed, cancelled"
        ),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", help="At most this many, newest first")] = 50,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """List executions, newest first."""
    with ApiClient(url, token) as client:
        data = client.get(
            "/executions", params={"workflow": workflow, "status": status, "limit": limit}
        )
    if output is Output.json:
        print_json(data)
        return
    items = data["executions"]
    if not items:
        console().print("no executions", style="dim")
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("id", "workflow", "version", "status", "created", "finished", "error"):
        table.add_column(column, no_wrap=column in ("id", "created", "finished"))
    for e in items:
        table.add_row(
            cell(e["id"]),
            cell(e["workflow"]),
            cell(str(e["workflow_version"])),
            status_text(e["status"]),
            cell(when(e["created_at"])),
            cell(when(e["finished_at"])),
            cell(e.get("error"), limit=60),
        )
    console().print(table)


@app.command("show")
@handles_errors
def show(
    execution_id: IdArg,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """An execution and its steps: status, attempts, agent, result (abbreviated), error."""
    with ApiClient(url, token) as client:
        execution = fetch(client, execution_id)
    if output is Output.json:
        print_json(execution)
        return
    out = console()
    out.print(execution_header(execution))
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="dim")
    facts.add_column()
    facts.add_row("inputs", cell(execution.get("inputs") or {}, limit=100))
    trigger = execution.get("trigger") or {}
    facts.add_row("trigger", cell(trigger.get("type") if isinstance(trigger, dict) else trigger))
    facts.add_row("created", cell(f"{when(execution['created_at'])} by {execution['created_by']}"))
    facts.add_row("finished", cell(when(execution.get("finished_at"))))
    if execution.get("deadline_at"):
        facts.add_row("deadline", cell(when(execution["deadline_at"])))
    if execution.get("error"):
        facts.add_row("error", Text(execution["error"], style="red"))
    out.print(facts)
    out.print()
    out.print(steps_table(execution, results=True))


@app.command("cancel")
@handles_errors
def cancel(
    execution_id: IdArg,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Cancel a running or queued execution (exit 4 if it is already final)."""
    with ApiClient(url, token) as client:
        execution = client.post(f"/executions/{segment(execution_id)}/cancel")
    if output is Output.json:
        print_json(execution)
        return
    line = Text(f"execution {execution['id']} ")
    line.append_text(status_text(execution["status"]))
    console().print(line)


@app.command("rerun")
@handles_errors
def rerun(
    execution_id: IdArg,
    watch_it: WatchOpt = False,
    interval: IntervalOpt = 1.0,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Run a failed or cancelled execution again from its failed steps."""
    with ApiClient(url, token) as client:
        execution = client.post(f"/executions/{segment(execution_id)}/rerun")
        if watch_it:
            finish_watch(watch(client, execution, interval, output), output)
    if output is Output.json:
        print_json(execution)
        return
    line = Text(f"execution {execution['id']} ")
    line.append_text(status_text(execution["status"]))
    line.append(f" (rerun {execution.get('reruns', '?')})")
    console().print(line)


@app.command("logs")
@handles_errors
def logs(
    execution_id: IdArg,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Every attempt of every step, in order, with what its agent logged."""
    with ApiClient(url, token) as client:
        data = client.get(f"/executions/{segment(execution_id)}/logs")
    if output is Output.json:
        print_json(data)
        return
    out = console()
    attempts = data["logs"]
    if not attempts:
        out.print("no attempts yet", style="dim")
        return
    for i, attempt in enumerate(attempts):
        if i:
            out.print()
        header = Text()
        header.append(str(attempt["step"]), style="bold")
        header.append(f"  attempt {attempt['attempt']}  ")
        header.append_text(status_text(attempt["status"]))
        header.append(f"  agent {attempt.get('agent_id') or '-'}")
        header.append(f"  {when(attempt.get('started_at'))}", style="dim")
        out.print(header)
        for entry in attempt.get("log") or []:
            out.print(Text("  ").append_text(cell(entry)))
        if attempt.get("error"):
            out.print(Text(f"  error: {attempt['error']}", style="red"))
