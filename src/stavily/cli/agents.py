"""`stavily agent ...`, `stavily enrollment ...`, `stavily fleet status`: the fleet.

`stavily agent run` (the reference agent itself) is registered on the same group in main.py.
"""

from __future__ import annotations

import re
import sys
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from stavily.cli.client import (
    DEFAULT_URL,
    EXIT_NOT_FOUND,
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

agent_app = typer.Typer(
    help="Agents: run the reference agent; create, list, show, drain, disable, enable, revoke, "
    "rotate.",
    no_args_is_help=True,
)
enrollment_app = typer.Typer(help="Enrollment tokens: create, list, revoke.", no_args_is_help=True)
fleet_app = typer.Typer(help="The fleet at a glance.", no_args_is_help=True)

AgentArg = Annotated[
    str, typer.Argument(metavar="AGENT", help="The agent's name, or its id (agt_...)")
]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")]
TokenIdArg = Annotated[
    str, typer.Argument(metavar="ID", help="The enrollment token's id (enr_...)")
]
LabelOpt = Annotated[
    list[str] | None,
    typer.Option("--label", "-l", metavar="KEY=VALUE", help="A label. Repeatable."),
]

STATE_STYLES = {
    "online": "green",
    "busy": "blue",
    "degraded": "yellow",
    "offline": "dim",
    "draining": "cyan",
    "disabled": "red",
    "revoked": "red",
    "active": "green",
    "expired": "dim",
    "used_up": "dim",
}
_DURATION = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def state_of(agent: dict[str, Any]) -> str:
    """What an operator sees first: revoked, draining or disabled, else its liveness."""
    if agent.get("state"):
        return str(agent["state"])
    if agent.get("revoked_at"):
        return "revoked"
    admin_state = agent.get("admin_state") or "active"
    if admin_state != "active":
        return str(admin_state)
    return str(agent.get("health") or agent.get("status") or "-")


def state_text(state: str | None) -> Text:
    return Text(state or "-", style=STATE_STYLES.get(state or "", ""))


def parse_labels(pairs: list[str] | None) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            fail(f"--label '{pair}' is not key=value")
        labels[key.strip()] = value
    return labels


def parse_seconds(text: str, option: str) -> int:
    """`90`, `90s`, `30m`, `24h` or `7d` in seconds."""
    match = _DURATION.match(text.lower())
    if not match:
        fail(f"{option} '{text}' is not a duration such as 3600, 30m, 24h or 7d")
    return int(match.group(1)) * _UNITS[match.group(2)]


def labels_text(labels: dict[str, Any] | None) -> str | None:
    return ", ".join(f"{k}={v}" for k, v in sorted((labels or {}).items())) or None


def _facts(rows: list[tuple[str, Any]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim")
    grid.add_column()
    for key, value in rows:
        grid.add_row(key, value if isinstance(value, Text) else cell(value))
    return grid


# --- agents ---------------------------------------------------------------------------------

AGENT_ID_PREFIX = "agt_"


def resolve_agent(client: ApiClient, ref: str) -> tuple[str, str | None]:
    """The agent a user means, as (id, name): an id (`agt_...`) as it is, the server says
    whether it exists; else a name, looked up in the agent list (name unknown: exit 3)."""
    if ref.startswith(AGENT_ID_PREFIX):
        return ref, None
    agents = client.get("/agents")["agents"]
    for agent in agents:
        if agent["name"] == ref:
            return str(agent["id"]), str(agent["name"])
    raise CliError(
        f"no agent named '{ref}'",
        EXIT_NOT_FOUND,
        code="not_found",
        hint="every agent's name and id: stavily agent list",
    )


def _called(agent_id: str, name: str | None) -> str:
    return f"{name} ({agent_id})" if name else agent_id


def _asks() -> bool:
    """Whether a person can answer a question: standard input is a terminal."""
    return sys.stdin.isatty()


@agent_app.command("create")
@handles_errors
def create_agent(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The agent's name (unique)")],
    agent_type: Annotated[
        str, typer.Option("--type", help="The agent's type: action or sensor")
    ] = "action",
    labels: LabelOpt = None,
    capacity: Annotated[
        int, typer.Option("--capacity", help="Instructions the agent runs at once")
    ] = 1,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Create an agent; its id and API key are shown only this once."""
    body = {
        "name": name,
        "type": agent_type,
        "labels": parse_labels(labels),
        "capacity": capacity,
    }
    with ApiClient(url, token) as client:
        created = client.post("/agents", json=body)
    if output is Output.json:
        print_json(created)
        return
    out = console()
    out.print(
        Text(
            f"created agent {created['name']} ({created['agent_id']}); its API key:", style="green"
        )
    )
    out.print(Text(created["api_key"]))
    out.print(
        Text(
            "store it now: it is shown only this once "
            f"(a lost key is replaced with: stavily agent rotate {created['name']})",
            style="yellow",
        )
    )
    out.print(
        Text(
            f"run it: stavily agent run --url {client.url} --agent-id {created['agent_id']} "
            "--token <key>",
            style="dim",
        )
    )


@agent_app.command("list")
@handles_errors
def list_agents(
    state: Annotated[
        str | None,
        typer.Option(
            "--state",
            help="Only agents in this state: online, busy, degraded, offline, draining, disabled, "
            "revoked",
        ),
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Every agent with its state, type, labels, capacity and version."""
    with ApiClient(url, token) as client:
        data = client.get("/agents")
    agents = [a for a in data["agents"] if state is None or state_of(a) == state]
    if output is Output.json:
        print_json({"agents": agents})
        return
    if not agents:
        console().print("no agents", style="dim")
        return
    rows = table(
        "id",
        "name",
        "type",
        "state",
        "capacity",
        "version",
        "last heartbeat",
        "labels",
        wrap=("labels",),
    )
    for a in agents:
        rows.add_row(
            cell(a["id"]),
            cell(a["name"]),
            cell(a["type"]),
            state_text(state_of(a)),
            cell(str(a["capacity"])),
            cell(a.get("version")),
            cell(when(a.get("last_heartbeat_at"))),
            cell(labels_text(a.get("labels"))),
        )
    print_table(rows)


def _show(agent: dict[str, Any]) -> None:
    out = console()
    header = Text(f"{agent['name']}  ", style="bold")
    header.append_text(state_text(state_of(agent)))
    out.print(header)
    rows: list[tuple[str, Any]] = [
        ("id", agent["id"]),
        ("type", agent["type"]),
        ("capacity", str(agent["capacity"])),
        ("labels", labels_text(agent.get("labels"))),
        ("operator state", agent.get("admin_state")),
        ("health", agent.get("health") or agent.get("status")),
        ("version", agent.get("version")),
        ("hostname", agent.get("hostname")),
        ("os", agent.get("os")),
        ("last heartbeat", when(agent.get("last_heartbeat_at"))),
        ("created", when(agent.get("created_at"))),
        ("credential issued", when(agent.get("credential_issued_at"))),
    ]
    if agent.get("enrollment_token_id"):
        rows.append(("enrolled with", agent["enrollment_token_id"]))
    if agent.get("revoked_at"):
        rows.append(("revoked", when(agent["revoked_at"])))
    if agent.get("facts"):
        rows.append(("facts", agent["facts"]))
    out.print(_facts(rows))


@agent_app.command("show")
@handles_errors
def show_agent(
    agent_id: AgentArg,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """An agent (by name or id): state, health, labels, capacity, version, host."""
    with ApiClient(url, token) as client:
        agent_id, _ = resolve_agent(client, agent_id)
        agent = client.get(f"/agents/{segment(agent_id)}")
    if output is Output.json:
        print_json(agent)
        return
    _show(agent)


def _act(
    agent_ref: str,
    action: str,
    url: str,
    token: str | None,
    output: Output,
    confirm: str | None = None,
) -> None:
    """POST the action for the agent named or given by id; first ask `confirm` (with
    `{agent}` in it) unless it is None."""
    with ApiClient(url, token) as client:
        agent_id, name = resolve_agent(client, agent_ref)
        if confirm and not typer.confirm(confirm.format(agent=_called(agent_id, name)), err=True):
            fail(f"not {action}d", exit_code=1)
        agent = client.post(f"/agents/{segment(agent_id)}/{action}")
    if output is Output.json:
        print_json(agent)
        return
    line = Text(f"agent {agent['name']} ({agent['id']}): ")
    line.append_text(state_text(state_of(agent)))
    console().print(line)


@agent_app.command("drain")
@handles_errors
def drain(
    agent_id: AgentArg,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Let the agent finish and report what it runs, and give it nothing new."""
    _act(agent_id, "drain", url, token, output)


@agent_app.command("disable")
@handles_errors
def disable(
    agent_id: AgentArg,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Refuse every request of the agent (403) until it is enabled."""
    _act(agent_id, "disable", url, token, output)


@agent_app.command("enable")
@handles_errors
def enable(
    agent_id: AgentArg,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Back to active after a drain or a disable (a revoked agent stays revoked)."""
    _act(agent_id, "enable", url, token, output)


@agent_app.command("revoke")
@handles_errors
def revoke(
    agent_id: AgentArg,
    yes: YesOpt = False,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Refuse the agent for good: it cannot be enabled again."""
    question = None if yes else "Revoke agent {agent} for good? It can never be enabled again"
    _act(agent_id, "revoke", url, token, output, confirm=question)


@agent_app.command("rotate")
@handles_errors
def rotate(
    agent_id: AgentArg,
    yes: YesOpt = False,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Replace the agent's API key: the new key is shown once; the old one stops working.

    Asks first when run from a terminal, unless --yes; a script (standard input not a
    terminal) is not asked."""
    with ApiClient(url, token) as client:
        agent_id, name = resolve_agent(client, agent_id)
        if (
            not yes
            and _asks()
            and not typer.confirm(
                f"Replace the API key of agent {_called(agent_id, name)}? "
                "The old key stops working at once",
                err=True,
            )
        ):
            fail("not rotated", exit_code=1)
        agent = client.post(f"/agents/{segment(agent_id)}/credentials")
    if output is Output.json:
        print_json(agent)
        return
    out = console()
    out.print(Text(f"new API key for agent {agent['name']} ({agent['agent_id']}):", style="green"))
    out.print(Text(agent["api_key"]))
    out.print(
        Text(
            "shown only this once; the old key and the agent's tokens no longer work",
            style="dim",
        )
    )


# --- enrollment tokens ----------------------------------------------------------------------


def _uses(t: dict[str, Any]) -> str:
    return f"{t['uses']}/{'unlimited' if t['max_uses'] is None else t['max_uses']}"


@enrollment_app.command("create")
@handles_errors
def create_enrollment(
    name: Annotated[str, typer.Argument(metavar="NAME", help="What the token is for")],
    agent_type: Annotated[
        str, typer.Option("--type", help="The agents' type: action or sensor")
    ] = "action",
    labels: LabelOpt = None,
    capacity: Annotated[
        int, typer.Option("--capacity", help="Instructions each agent runs at once")
    ] = 1,
    max_uses: Annotated[
        int, typer.Option("--max-uses", help="How many agents may enroll with it")
    ] = 1,
    unlimited: Annotated[
        bool, typer.Option("--unlimited", help="Any number of agents, until it expires")
    ] = False,
    expires_in: Annotated[
        str, typer.Option("--expires-in", help="Lifetime: seconds, or 30m, 24h, 7d (max 30d)")
    ] = "24h",
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Create an enrollment token; its secret is shown only this once."""
    body = {
        "name": name,
        "agent_type": agent_type,
        "labels": parse_labels(labels),
        "capacity": capacity,
        "max_uses": None if unlimited else max_uses,
        "expires_in": parse_seconds(expires_in, "--expires-in"),
    }
    with ApiClient(url, token) as client:
        created = client.post("/enrollment-tokens", json=body)
    if output is Output.json:
        print_json(created)
        return
    out = console()
    out.print(Text(f"enrollment token {created['name']} ({created['id']}):", style="green"))
    out.print(Text(created["token"]))
    out.print(
        Text(
            f"shown only this once; {_uses(created)} uses, expires {when(created['expires_at'])}",
            style="dim",
        )
    )
    out.print(
        Text(
            f"enroll an agent: stavily agent run --url {client.url} --enroll <token> --name <name>",
            style="dim",
        )
    )


@enrollment_app.command("list")
@handles_errors
def list_enrollment(
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Every enrollment token (never its secret), newest first."""
    with ApiClient(url, token) as client:
        data = client.get("/enrollment-tokens")
    if output is Output.json:
        print_json(data)
        return
    items = data["enrollment_tokens"]
    if not items:
        console().print("no enrollment tokens", style="dim")
        return
    rows = table(
        "id", "name", "type", "state", "uses", "capacity", "expires", "labels", wrap=("labels",)
    )
    for t in items:
        rows.add_row(
            cell(t["id"]),
            cell(t["name"]),
            cell(t["agent_type"]),
            state_text(t["state"]),
            cell(_uses(t)),
            cell(str(t["capacity"])),
            cell(when(t["expires_at"])),
            cell(labels_text(t.get("labels"))),
        )
    print_table(rows)


@enrollment_app.command("revoke")
@handles_errors
def revoke_enrollment(
    token_id: TokenIdArg,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """No agent can enroll with the token any more; agents it enrolled keep working."""
    with ApiClient(url, token) as client:
        revoked = client.post(f"/enrollment-tokens/{segment(token_id)}/revoke")
    if output is Output.json:
        print_json(revoked)
        return
    line = Text(f"enrollment token {revoked['name']} ({revoked['id']}): ")
    line.append_text(state_text(revoked["state"]))
    console().print(line)


# --- the fleet ------------------------------------------------------------------------------


def _counts(title: str, counts: dict[str, int], styled: bool = False) -> Table:
    rows = table(title, "agents")
    for key, count in counts.items():
        rows.add_row(state_text(key) if styled else cell(key), cell(str(count)))
    return rows


@fleet_app.command("status")
@handles_errors
def status(
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Agents by state, type, label and version; capacity; instructions waiting."""
    with ApiClient(url, token) as client:
        summary = client.get("/fleet")
    if output is Output.json:
        print_json(summary)
        return
    out = console()
    capacity = summary["capacity"]
    waiting = summary["waiting"]
    out.print(
        Text(
            f"{summary['agents']} agents; capacity {capacity['in_use']}/{capacity['total']} "
            f"in use, {capacity['available']} free on online agents; "
            f"{waiting['total']} instructions waiting",
            style="bold",
        )
    )
    out.print()
    print_table(_counts("state", summary["by_state"], styled=True))
    for title, key in (("type", "by_type"), ("label", "by_label"), ("version", "by_version")):
        if summary[key]:
            out.print()
            print_table(_counts(title, summary[key]))
    if waiting["by_selector"]:
        out.print()
        rows = table("waiting for", "instructions", wrap=("waiting for",))
        for selector, count in waiting["by_selector"].items():
            rows.add_row(cell(selector), cell(str(count)))
        print_table(rows, wrapping_width=60)
