"""`stavily secret set|list|show|delete|rotate-key`: the organization's secret store
(docs/secrets.md). A value goes in from standard input, a file or an environment
variable, never as an argument (others on the host see those in `ps`); none comes out."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from stavily.cli.client import (
    DEFAULT_URL,
    EXIT_ERROR,
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
    help="Secrets: values workflows use as {store: NAME}, encrypted at rest, never shown "
    "(docs/secrets.md).",
    no_args_is_help=True,
)

NameArg = Annotated[str, typer.Argument(metavar="NAME", help="The secret's name")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation")]


def _one_line(text: str) -> str:
    """What `echo value > file` or a piped `echo` wrote: without its final newline."""
    return text.removesuffix("\n").removesuffix("\r")


def _value(value_file: Path | None, from_env: str | None) -> str:
    if value_file is not None and from_env is not None:
        fail("give --value-file or --from-env, not both")
    if value_file is not None:
        try:
            value = _one_line(value_file.read_text())
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            fail(f"cannot read {value_file}: {reason or exc}", exit_code=EXIT_ERROR)
    elif from_env is not None:
        if from_env not in os.environ:
            fail(f"--from-env: environment variable {from_env} is not set")
        value = os.environ[from_env]
    elif sys.stdin.isatty():
        value = typer.prompt("Value", hide_input=True, err=True)
    else:
        value = _one_line(sys.stdin.read())
    if not value:
        fail("the value is empty: a secret needs one")
    return value


def _facts(secret: dict[str, Any]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim")
    grid.add_column()
    rows = [
        ("version", secret["version"]),
        ("data key", secret["key_id"]),
        ("created", f"{when(secret['created_at'])} by {secret['created_by']}"),
        ("updated", f"{when(secret['updated_at'])} by {secret['updated_by']}"),
    ]
    for key, value in rows:
        grid.add_row(key, cell(value))
    return grid


@app.command("set")
@handles_errors
def set_secret(
    name: NameArg,
    value_file: Annotated[
        Path | None,
        typer.Option(
            "--value-file",
            metavar="FILE",
            help="Read the value from FILE (without its final newline)",
        ),
    ] = None,
    from_env: Annotated[
        str | None,
        typer.Option(
            "--from-env", metavar="VAR", help="Take the value from environment variable VAR"
        ),
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Store NAME's value, or replace it.

    Without an option, the value is read from standard input (asked for, hidden, on a
    terminal)."""
    from stavily.security.secrets import name_problem  # server code: loaded when used

    problem = name_problem(name)
    if problem:
        fail(problem)
    value = _value(value_file, from_env)
    with ApiClient(url, token) as client:
        secret = client.request("PUT", f"/secrets/{segment(name)}", json={"value": value})
    if output is Output.json:
        print_json(secret)
        return
    done = "stored" if secret["version"] == 1 else f"replaced (version {secret['version']})"
    console().print(Text(f"secret {secret['name']} {done}", style="green"))
    console().print(Text(f"use it in a workflow: secrets: {{x: {{store: {name}}}}}", style="dim"))


@app.command("list")
@handles_errors
def list_secrets(
    url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, output: OutputOpt = Output.table
) -> None:
    """The organization's secrets, by name (never their values)."""
    with ApiClient(url, token) as client:
        data = client.get("/secrets")
    if output is Output.json:
        print_json(data)
        return
    if not data["secrets"]:
        console().print("no secrets", style="dim")
        return
    rows = table("name", "version", "updated", "by")
    for secret in data["secrets"]:
        rows.add_row(
            cell(secret["name"]),
            cell(secret["version"]),
            cell(when(secret["updated_at"])),
            cell(secret["updated_by"]),
        )
    print_table(rows)


@app.command("show")
@handles_errors
def show(
    name: NameArg,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """One secret's metadata (never its value)."""
    with ApiClient(url, token) as client:
        secret = client.get(f"/secrets/{segment(name)}")
    if output is Output.json:
        print_json(secret)
        return
    console().print(Text(f"secret {secret['name']}"))
    console().print(_facts(secret), soft_wrap=True)


@app.command("delete")
@handles_errors
def delete(
    name: NameArg,
    yes: YesOpt = False,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Delete the secret: steps that use it fail from now on."""
    with ApiClient(url, token) as client:
        client.get(f"/secrets/{segment(name)}")  # NotFound before asking
        if not yes and not typer.confirm(
            f"Delete secret {name}? Steps that use it will fail", err=True
        ):
            fail("not deleted", exit_code=EXIT_ERROR)
        client.delete(f"/secrets/{segment(name)}")
    if output is Output.json:
        print_json({"name": name, "deleted": True})
        return
    console().print(Text(f"secret {name} deleted"))


@app.command("rotate-key")
@handles_errors
def rotate_key(
    url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, output: OutputOpt = Output.table
) -> None:
    """A new data key for the organization; every secret re-encrypted under it."""
    with ApiClient(url, token) as client:
        rotated = client.post("/secrets/rotate")
    if output is Output.json:
        print_json(rotated)
        return
    console().print(
        Text(
            f"new data key {rotated['key_id']}: {rotated['rewrapped']} secret(s) re-encrypted, "
            f"{rotated['deleted_keys']} old key(s) deleted",
            style="green",
        )
    )
