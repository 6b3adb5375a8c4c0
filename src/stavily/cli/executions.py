"""`stavily execution ...`: list, show, cancel, rerun and read the logs of executions."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
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
    CliError,
    Output,
    OutputOpt,
    TokenOpt,
    UrlOpt,
    cell,
    console,
    handles_errors,
    print_json,
    print_table,
    segment,
    status_text,
    table,
    took,
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


class AgentNames:
    """Agent ids to names for display, fetched once and again when an unknown id shows up."""

    def __init__(self, client: ApiClient) -> None:
        self.client = client
        self.names: dict[str, str] = {}
        self.asked: set[str] = set()

    def __call__(self, agent_id: str | None) -> str | None:
        if agent_id is None:
            return None
        if agent_id not in self.names and agent_id not in self.asked:
            self.asked.add(agent_id)
            try:
                agents = self.client.get("/agents")["agents"]
            except CliError:
                agents = []  # a name is a nicety: the id will do
            self.names.update({a["id"]: a["name"] for a in agents})
        return self.names.get(agent_id, agent_id)


def steps_table(
    execution: dict[str, Any], agent: Callable[[str | None], str | None], *, full: bool = False
) -> Table:
    """The steps; `full` adds plugin and result (abbreviated)."""
    columns = ["step", "stage", "status", "attempts", "agent", "error"]
    if full:
        columns[2:2] = ["plugin"]
        columns[-1:-1] = ["result"]
    out = table(*columns, wrap=("error",))
    for step in execution["steps"]:
        values: dict[str, RenderableType] = {
            "step": cell(step["name"]),
            "stage": cell(step["stage"]),
            "plugin": cell(step.get("plugin")),
            "status": status_text(step["status"]),
            "attempts": cell(str(step["attempts"])),
            "agent": cell(agent(step.get("agent_id"))),
            "result": cell(step.get("result"), limit=48),
            "error": cell(step.get("error"), limit=100),
        }
        out.add_row(*(values[c] for c in columns))
    return out


def live_view(
    execution: dict[str, Any], agent: Callable[[str | None], str | None]
) -> RenderableType:
    parts: list[RenderableType] = [
        execution_header(execution),
        Text(""),
        steps_table(execution, agent),
    ]
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
        agent = AgentNames(client)
        live = Live(live_view(execution, agent), console=console(), auto_refresh=False)
        try:
            with live:
                while execution["status"] not in FINAL_EXECUTION:
                    time.sleep(interval)
                    execution = fetch(client, execution_id)
                    live.update(live_view(execution, agent), refresh=True)
        finally:
            if not live.console.is_terminal:
                live.console.line()  # Live leaves its last line open when not on a terminal
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
    rows = table("id", "workflow", "v", "status", "created", "took", "error", wrap=("error",))
    for e in items:
        rows.add_row(
            cell(e["id"]),
            cell(e["workflow"]),
            cell(str(e["workflow_version"])),
            status_text(e["status"]),
            cell(when(e["created_at"])),
            cell(took(e["created_at"], e.get("finished_at"))),
            cell(e.get("error"), limit=60),
        )
    print_table(rows)


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
        steps = steps_table(execution, AgentNames(client), full=True)
    out = console()
    out.print(execution_header(execution))
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="dim")
    facts.add_column()
    facts.add_row("inputs", cell(execution.get("inputs") or {}, limit=100))
    trigger = execution.get("trigger") or {}
    facts.add_row("trigger", cell(trigger.get("type") if isinstance(trigger, dict) else trigger))
    facts.add_row("created", cell(f"{when(execution['created_at'])} by {execution['created_by']}"))
    finished = execution.get("finished_at")
    if finished:
        finished = f"{when(finished)} (took {took(execution['created_at'], finished)})"
    facts.add_row("finished", cell(finished))
    if execution.get("deadline_at"):
        facts.add_row("deadline", cell(when(execution["deadline_at"])))
    if execution.get("error"):
        facts.add_row("error", Text(execution["error"], style="red"))
    out.print(facts)
    out.print()
    print_table(steps)


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
        agent = AgentNames(client)
        attempts = [{**a, "agent": agent(a.get("agent_id"))} for a in data["logs"]]
    out = console()
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
        header.append(f"  agent {attempt['agent'] or '-'}")
        if attempt.get("started_at"):
            header.append(f"  {when(attempt['started_at'])}", style="dim")
        out.print(header, soft_wrap=True)
        for entry in attempt.get("log") or []:
            line = entry if isinstance(entry, str) else json.dumps(entry, default=str)
            out.print(Text(f"  {line}"), soft_wrap=True)
        if attempt.get("error"):
            out.print(Text(f"  error: {attempt['error']}", style="red"), soft_wrap=True)
