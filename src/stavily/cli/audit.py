"""`stavily audit list`: who changed what, newest first."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from stavily.cli.client import (
    DEFAULT_URL,
    ApiClient,
    Output,
    OutputOpt,
    TokenOpt,
    UrlOpt,
    cell,
    console,
    handles_errors,
    print_json,
    print_table,
    table,
    when,
)

app = typer.Typer(help="The audit log: who changed what, and when.", no_args_is_help=True)


def details_text(details: dict[str, Any] | None) -> str | None:
    """`name=deploy, version=3`: a record's details on one line."""
    if not details:
        return None
    return ", ".join(
        f"{key}={value if isinstance(value, str) else json.dumps(value, default=str)}"
        for key, value in details.items()
    )


@app.command("list")
@handles_errors
def list_records(
    subject: Annotated[
        str | None,
        typer.Option(
            "--subject",
            metavar="ID",
            help="Only records about this id (wf_..., agt_...)",
        ),
    ] = None,
    action: Annotated[
        str | None,
        typer.Option(
            "--action",
            metavar="ACTION",
            help="Only this action (workflow.applied), or those under a prefix (workflow.*)",
        ),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            metavar="WHEN",
            help="Only records from then on: a time ago (30m, 1h, 7d) or an ISO 8601 time",
        ),
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", "-n", min=1, max=1000, help="At most this many records")
    ] = 100,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Audit records, newest first, filtered by subject, action and time."""
    params = {"subject_id": subject, "action": action, "since": since, "limit": limit}
    with ApiClient(url, token) as client:
        data = client.get("/audit", params=params)
    if output is Output.json:
        print_json(data)
        return
    if not data["records"]:
        console().print("no audit records", style="dim")
        return
    rows = table("time", "actor", "action", "subject", "details", wrap=("details",))
    for record in data["records"]:
        rows.add_row(
            cell(when(record.get("created_at"))),
            cell(record.get("actor")),
            cell(record.get("action")),
            cell(f"{record.get('subject_type')} {record.get('subject_id')}"),
            cell(details_text(record.get("details")), limit=80),
        )
    print_table(rows)
