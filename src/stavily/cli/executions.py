"""`stavily execution ...`: list, show, watch, cancel, rerun and read the logs of executions."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console, Group, RenderableType
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

app = typer.Typer(help="Executions: list, show, watch, cancel, rerun, logs.", no_args_is_help=True)

IdArg = Annotated[str, typer.Argument(metavar="ID", help="The execution id (exe_...)")]
WatchOpt = Annotated[
    bool, typer.Option("--watch", "-w", help="Follow the execution live until it is final")
]
IntervalOpt = Annotated[
    float, typer.Option("--interval", min=0.05, help="Seconds between polls while watching")
]

FINAL_ATTEMPT = frozenset({"completed", "failed", "cancelled", "expired"})


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


def selector_text(selector: dict[str, Any]) -> str:
    """A step's resolved agent selection, without what it leaves at its defaults."""
    shown: dict[str, Any] = {}
    for key, value in sorted(selector.items()):
        if key == "strategy" and value == "least_loaded":
            continue
        if key == "pools" and value:
            value = [{k: v for k, v in pool.items() if v} for pool in value]
        if value:
            shown[key] = value
    return json.dumps(shown, ensure_ascii=False, sort_keys=True, separators=(", ", ": "))


class Waits:
    """Why queued steps wait, when the reason is that no agent can take them at all:
    `waiting: no eligible agent for selector {...}`.

    The step views do not carry their selector: it comes from the execution's workflow
    version (planned here as the server plans it, once per version), and eligibility is
    the server's own test (engine.fail_unroutable): an active, unrevoked action agent
    that is not offline and matches the selector. A step waiting only for a busy agent's
    capacity is left alone. On any failure to find out, nothing is said."""

    def __init__(self, client: ApiClient) -> None:
        self.client = client
        self.plans: dict[tuple[str, int], dict[str, tuple[str, dict[str, Any]]] | None] = {}

    def _plan(self, execution: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]] | None:
        key = (execution["workflow"], int(execution["workflow_version"]))
        if key not in self.plans:
            from stavily.workflows.definition import plan, stored

            try:
                version = self.client.get(
                    f"/workflows/{segment(key[0])}/versions/{key[1]}",
                )
                steps = plan(stored(version["definition"]))
                self.plans[key] = {
                    s["name"]: (s["spec"]["agent_type"], s["spec"]["selector"]) for s in steps
                }
            except (CliError, ValueError, KeyError, TypeError):
                self.plans[key] = None
        return self.plans[key]

    def __call__(self, execution: dict[str, Any]) -> dict[str, str]:
        queued = [s for s in execution.get("steps") or [] if s["status"] == "queued"]
        if not queued:
            return {}
        planned = self._plan(execution)
        if planned is None:
            return {}
        try:
            agents = self.client.get("/agents")["agents"]
        except CliError:
            return {}
        from stavily.fleet.agents import AgentIdentity, eligible

        able = [
            AgentIdentity(
                a["id"], "", a["name"], a["type"], a.get("labels") or {}, a["capacity"], "online"
            )
            for a in agents
            if (a.get("admin_state") or "active") == "active"
            and not a.get("revoked_at")
            and (a.get("health") or a.get("status")) != "offline"
        ]
        notes: dict[str, str] = {}
        for step in queued:
            found = planned.get(step.get("parent") or step["name"])
            if found is None:
                continue
            agent_type, selector = found
            if not any(a.type == agent_type and eligible(a, selector) for a in able):
                notes[step["name"]] = (
                    f"waiting: no eligible agent for selector {selector_text(selector)}"
                )
        return notes


def steps_table(
    execution: dict[str, Any],
    agent: Callable[[str | None], str | None],
    *,
    full: bool = False,
    waits: dict[str, str] | None = None,
) -> Table:
    """The steps; `full` adds plugin and result (abbreviated); `waits` says why queued
    steps wait (in the error column)."""
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
        note = (waits or {}).get(step["name"])
        if note and step["status"] == "queued":
            values["error"] = Text(note, style="yellow")
        out.add_row(*(values[c] for c in columns))
    return out


def live_view(
    execution: dict[str, Any],
    agent: Callable[[str | None], str | None],
    waits: dict[str, str] | None = None,
) -> RenderableType:
    parts: list[RenderableType] = [
        execution_header(execution),
        Text(""),
        steps_table(execution, agent, waits=waits),
    ]
    if execution.get("error"):
        parts += [Text(""), Text(f"error: {execution['error']}", style="red")]
    return Group(*parts)


def fetch(client: ApiClient, execution_id: str) -> dict[str, Any]:
    return client.get(f"/executions/{segment(execution_id)}")  # type: ignore[no-any-return]


def _echo(text: Text, err: bool = False) -> None:
    """One line as it is, never wrapped nor read as markup."""
    Console(highlight=False, stderr=err).print(text, soft_wrap=True)


class Transitions:
    """What changed in an execution since the last look, as lines: `step  status  ...`."""

    def __init__(self, agent: Callable[[str | None], str | None]) -> None:
        self.agent = agent
        self.steps: dict[str, tuple[Any, ...]] = {}
        self.status: str | None = None

    def __call__(self, execution: dict[str, Any], waits: dict[str, str]) -> list[Text]:
        lines: list[Text] = []
        if self.status is None:
            lines.append(execution_header(execution))
        elif execution["status"] != self.status and execution["status"] not in FINAL_EXECUTION:
            line = Text(f"execution {execution['id']} ")
            line.append_text(status_text(execution["status"]))
            lines.append(line)
        self.status = execution["status"]
        for step in execution["steps"]:
            note = waits.get(step["name"]) if step["status"] == "queued" else None
            key = (step["status"], step["attempts"], step.get("agent_id"), note)
            if self.steps.get(step["name"], ("pending", 0, None, None)) == key:
                continue
            self.steps[step["name"]] = key
            lines.append(self.line(step, note))
        return lines

    def line(self, step: dict[str, Any], note: str | None) -> Text:
        status = step["status"]
        line = Text(f"{step['name']}  ")
        line.append_text(status_text(status))
        if status in ("running", "queued") and step["attempts"] > 1:
            line.append(f"  attempt {step['attempts']}")
        if status == "running" and step.get("agent_id"):
            line.append(f"  agent {self.agent(step['agent_id'])}")
        if note:
            line.append(f"  {note}", style="yellow")
        if status in ("succeeded", "failed") and step.get("started_at") and step.get("finished_at"):
            line.append(f"  took {took(step.get('started_at'), step['finished_at'])}", style="dim")
        if status == "failed" and step.get("error"):
            line.append(f"  error: {' '.join(str(step['error']).split())}", style="red")
        return line


def watch(
    client: ApiClient,
    execution: dict[str, Any],
    interval: float,
    output: Output,
    *,
    as_lines: bool = False,
) -> dict[str, Any]:
    """Poll until the execution is final; return it.

    JSON: nothing printed meanwhile. `as_lines`: one line per step change on standard
    output. Otherwise, on a terminal, a live table of the steps; not on a terminal (CI, a
    pipe), the lines go to standard error as they happen and the final table to standard
    output."""
    execution_id = execution["id"]
    try:
        if output is Output.json:
            while execution["status"] not in FINAL_EXECUTION:
                time.sleep(interval)
                execution = fetch(client, execution_id)
            return execution
        agent = AgentNames(client)
        waits = Waits(client)
        if not as_lines and console().is_terminal:
            live = Live(
                live_view(execution, agent, waits(execution)),
                console=console(),
                auto_refresh=False,
            )
            with live:
                while execution["status"] not in FINAL_EXECUTION:
                    time.sleep(interval)
                    execution = fetch(client, execution_id)
                    live.update(live_view(execution, agent, waits(execution)), refresh=True)
            return execution
        transitions = Transitions(agent)
        while True:
            for line in transitions(execution, waits(execution)):
                _echo(line, err=not as_lines)
            if execution["status"] in FINAL_EXECUTION:
                break
            time.sleep(interval)
            execution = fetch(client, execution_id)
        if not as_lines:
            console().print(live_view(execution, agent))
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
        steps = steps_table(
            execution, AgentNames(client), full=True, waits=Waits(client)(execution)
        )
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


@app.command("watch")
@handles_errors
def watch_execution(
    execution_id: IdArg,
    interval: IntervalOpt = 1.0,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Follow an execution until it is final, one line per step change; exit 0 only if it
    succeeds (JSON: only the final execution)."""
    with ApiClient(url, token) as client:
        execution = fetch(client, execution_id)
        finish_watch(watch(client, execution, interval, output, as_lines=True), output)


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
    follow: Annotated[
        bool,
        typer.Option(
            "--follow",
            "-f",
            help="Keep printing new log lines until the execution is final; then exit 0 "
            "only if it succeeded",
        ),
    ] = False,
    interval: IntervalOpt = 1.0,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Every attempt of every step, in order, with what its agent logged."""
    with ApiClient(url, token) as client:
        if follow:
            follow_logs(client, execution_id, interval, output)
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
            out.print(Text(f"  {_log_line(entry)}"), soft_wrap=True)
        if attempt.get("error"):
            out.print(Text(f"  error: {attempt['error']}", style="red"), soft_wrap=True)


def _log_line(entry: Any) -> str:
    return entry if isinstance(entry, str) else json.dumps(entry, default=str)


def follow_logs(client: ApiClient, execution_id: str, interval: float, output: Output) -> None:
    """Print log lines as they come, each after its `step#attempt`, until the execution is
    final; then its final state, and exit 0 if it succeeded, 1 otherwise.

    An attempt gets a line when an agent takes it, one per log line, and one when it ends.
    A log an agent sends again whole is not printed again: only the lines past those
    already printed. JSON: the logs once the execution is final."""
    agent = AgentNames(client)
    printed: dict[str, int] = {}
    taken: set[str] = set()
    ended: set[str] = set()
    try:
        while True:
            # the status first: once it is final, the logs read after it are complete
            execution = fetch(client, execution_id)
            data = client.get(f"/executions/{segment(execution_id)}/logs")
            if output is not Output.json:
                for attempt in data["logs"]:
                    for line in _attempt_lines(attempt, agent, printed, taken, ended):
                        _echo(line)
            if execution["status"] in FINAL_EXECUTION:
                break
            time.sleep(interval)
    except KeyboardInterrupt:
        typer.echo("stopped following; the execution goes on", err=True)
        raise typer.Exit(130) from None
    if output is Output.json:
        print_json(data)
        raise typer.Exit(0 if execution["status"] == "succeeded" else 1)
    finish_watch(execution, output)


def _attempt_lines(
    attempt: dict[str, Any],
    agent: Callable[[str | None], str | None],
    printed: dict[str, int],
    taken: set[str],
    ended: set[str],
) -> list[Text]:
    key = attempt["instruction_id"]
    tag = f"{attempt['step']}#{attempt['attempt']}  "
    lines: list[Text] = []
    if key not in taken and attempt.get("agent_id"):
        taken.add(key)
        lines.append(Text(tag + f"agent {agent(attempt['agent_id'])}", style="dim"))
    log = attempt.get("log") or []
    for entry in log[printed.get(key, 0) :]:
        lines.append(Text(tag + _log_line(entry)))
    printed[key] = max(printed.get(key, 0), len(log))
    if key not in ended and attempt["status"] in FINAL_ATTEMPT:
        ended.add(key)
        line = Text(tag)
        line.append_text(status_text(attempt["status"]))
        if attempt.get("error"):
            line.append(f": {attempt['error']}", style="red")
        lines.append(line)
    return lines
