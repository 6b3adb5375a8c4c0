"""`stavily workflow ...`: apply, list, show, validate and run workflows."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from stavily.cli.client import (
    DEFAULT_URL,
    EXIT_INVALID,
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
    status_text,
    table,
    when,
)
from stavily.cli.executions import IntervalOpt, WatchOpt, finish_watch, watch

app = typer.Typer(help="Workflows: apply, list, show, validate, run.", no_args_is_help=True)

FileArg = Annotated[
    str, typer.Argument(metavar="FILE", help="A workflow definition, YAML or JSON ('-': stdin)")
]
NameArg = Annotated[str, typer.Argument(metavar="NAME", help="The workflow's name")]


def read_definition(file: str) -> tuple[str, str]:
    """The file's text and its content type: JSON by extension or by its first character."""
    if file == "-":
        text = sys.stdin.read()
        suffix = ""
    else:
        path = Path(file)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            fail(f"no such file: {file}")
        except IsADirectoryError:
            fail(f"{file} is a directory, not a workflow file")
        except UnicodeDecodeError:
            fail(f"{file} is not UTF-8 text")
        except OSError as exc:
            fail(f"cannot read {file}: {exc.strerror or exc}", exit_code=1)
        suffix = path.suffix.lower()
    if suffix == ".json":
        return text, "application/json"
    if suffix in (".yaml", ".yml"):
        return text, "application/yaml"
    is_json = text.lstrip().startswith(("{", "["))
    return text, "application/json" if is_json else "application/yaml"


def parse_inputs(pairs: list[str], inputs_json: str | None) -> dict[str, Any]:
    """`--inputs-json` first, then each `--input key=value` (JSON if it parses, else text)."""
    inputs: dict[str, Any] = {}
    if inputs_json is not None:
        try:
            given = json.loads(inputs_json)
        except json.JSONDecodeError as exc:
            fail("--inputs-json is not valid JSON", details=[str(exc)])
        if not isinstance(given, dict):
            fail('--inputs-json must be a JSON object such as \'{"env": "prod"}\'')
        inputs.update(given)
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            fail(f"--input '{pair}' is not key=value")
        try:
            inputs[key] = json.loads(raw)
        except json.JSONDecodeError:
            inputs[key] = raw
    return inputs


def plan_table(steps: list[dict[str, Any]]) -> Table:
    out = table("step", "stage", "depends on", wrap=("depends on",))
    for step in steps:
        out.add_row(
            cell(step["name"]), cell(step["stage"]), cell(", ".join(step["depends_on"]) or None)
        )
    return out


def definition_steps(definition: dict[str, Any]) -> list[dict[str, Any]]:
    steps = []
    for stage in ("triggers", "actions", "outputs"):
        for step in (definition.get(stage) or {}).get("steps") or []:
            plugin = step.get("plugin") or {}
            if isinstance(plugin, dict):
                plugin = plugin.get("id", "") + (
                    f"-v{plugin['version']}" if plugin.get("version") else ""
                )
            steps.append(
                {
                    "name": step.get("name"),
                    "stage": stage,
                    "plugin": plugin,
                    "depends_on": step.get("depends_on") or [],
                }
            )
    return steps


@app.command("apply")
@handles_errors
def apply(
    file: FileArg,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Create the workflow, or a new version of it; the same definition again (spacing,
    comments and key order aside) makes no version: it is reported unchanged."""
    text, content_type = read_definition(file)
    with ApiClient(url, token) as client:
        workflow = client.post(
            "/workflows", content=text.encode("utf-8"), headers={"Content-Type": content_type}
        )
    if output is Output.json:
        print_json(workflow)
        return
    if workflow.get("unchanged"):
        console().print(
            Text(f"workflow {workflow['name']} unchanged (version {workflow['version']})")
        )
        return
    console().print(
        Text(f"applied workflow {workflow['name']} version {workflow['version']}", style="green")
    )


@app.command("list")
@handles_errors
def list_workflows(
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Every workflow with its latest version."""
    with ApiClient(url, token) as client:
        data = client.get("/workflows")
    if output is Output.json:
        print_json(data)
        return
    if not data["workflows"]:
        console().print("no workflows", style="dim")
        return
    rows = table("name", "version", "steps", "updated", "description", wrap=("description",))
    for w in data["workflows"]:
        rows.add_row(
            cell(w["name"]),
            cell(str(w["version"])),
            cell(str(len(definition_steps(w.get("definition") or {})))),
            cell(when(w.get("updated_at"))),
            cell(w.get("description"), limit=60),
        )
    print_table(rows)


@app.command("show")
@handles_errors
def show(
    name: NameArg,
    version: Annotated[
        int | None, typer.Option("--version", min=1, help="This version (default: the latest)")
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """A workflow (its latest version, or --version N) and its steps."""
    with ApiClient(url, token) as client:
        path = f"/workflows/{segment(name)}"
        workflow = client.get(path if version is None else f"{path}/versions/{version}")
    if output is Output.json:
        print_json(workflow)
        return
    definition = workflow.get("definition") or {}
    out = console()
    out.print(Text(f"{workflow['name']}  version {workflow['version']}", style="bold"))
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="dim")
    facts.add_column()
    if definition.get("description"):
        facts.add_row("description", cell(definition["description"]))
    if definition.get("version"):
        facts.add_row("definition version", cell(definition["version"]))
    facts.add_row("id", cell(workflow.get("id")))
    if workflow.get("created_by"):
        facts.add_row("created by", cell(workflow["created_by"]))
    facts.add_row("created", cell(when(workflow.get("created_at"))))
    if workflow.get("updated_at"):
        facts.add_row("updated", cell(when(workflow["updated_at"])))
    if definition.get("inputs"):
        facts.add_row("inputs", cell(", ".join(definition["inputs"])))
    out.print(facts)
    out.print()
    steps = table("step", "stage", "plugin", "depends on", wrap=("depends on",))
    for step in definition_steps(definition):
        steps.add_row(
            cell(step["name"]),
            cell(step["stage"]),
            cell(step["plugin"]),
            cell(", ".join(step["depends_on"]) or None),
        )
    print_table(steps)


@app.command("validate")
@handles_errors
def validate(
    file: FileArg,
    offline: Annotated[
        bool, typer.Option("--offline", help="Validate here, without asking the orchestrator")
    ] = False,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Check a definition: every problem with its path (exit 2), or what would run."""
    text, content_type = read_definition(file)
    if offline:
        result = validate_locally(text, content_type)
    else:
        with ApiClient(url, token) as client:
            result = client.post(
                "/workflows/validate",
                content=text.encode("utf-8"),
                headers={"Content-Type": content_type},
            )
    if output is Output.json:
        print_json(result)
        return
    out = console()
    out.print(Text(f"valid: {result['name']}", style="green"))
    print_table(plan_table(result["steps"]))


def validate_locally(text: str, content_type: str) -> dict[str, Any]:
    """The same answer as POST /workflows/validate, computed here."""
    from stavily.errors import InvalidInput
    from stavily.workflows.definition import parse_source, plan
    from stavily.workflows.definition import validate as check

    try:
        definition = check(parse_source(text, content_type))
    except InvalidInput as exc:
        raise CliError(exc.message, EXIT_INVALID, exc.details, code=exc.code) from None
    return {
        "valid": True,
        "name": definition.name,
        "steps": [
            {"name": s["name"], "stage": s["stage"], "depends_on": s["depends_on"]}
            for s in plan(definition)
        ],
    }


@app.command("run")
@handles_errors
def run(
    name: NameArg,
    input_pairs: Annotated[
        list[str] | None,
        typer.Option(
            "--input",
            "-i",
            metavar="KEY=VALUE",
            help="An input; the value is read as JSON when it parses, else as text. Repeatable.",
        ),
    ] = None,
    inputs_json: Annotated[
        str | None,
        typer.Option("--inputs-json", metavar="JSON", help="All inputs as one JSON object"),
    ] = None,
    watch_it: WatchOpt = False,
    interval: IntervalOpt = 1.0,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Start an execution; with --watch follow it and exit 0 only if it succeeds."""
    inputs = parse_inputs(input_pairs or [], inputs_json)
    with ApiClient(url, token) as client:
        execution = client.post(f"/workflows/{segment(name)}/runs", json={"inputs": inputs})
        if watch_it:
            finish_watch(watch(client, execution, interval, output), output)
    if output is Output.json:
        print_json(execution)
        return
    line = Text(f"started execution {execution['id']} ({name} v{execution['workflow_version']}): ")
    line.append_text(status_text(execution["status"]))
    out = console()
    out.print(line)
    out.print(Text(f"follow it: stavily execution show {execution['id']}", style="dim"))
