"""`stavily login|logout|whoami`, `stavily user ...`, `stavily token ...`, `stavily role
...`: who may use the orchestrator, and with what role."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
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
    base_url,
    cell,
    console,
    fail,
    handles_errors,
    print_json,
    print_table,
    save_login,
    saved_logins,
    segment,
    table,
    when,
)

user_app = typer.Typer(help="Users of this organization and their roles.", no_args_is_help=True)
token_app = typer.Typer(
    help="API tokens (for scripts and CI) and login sessions.", no_args_is_help=True
)
role_app = typer.Typer(help="Roles: built-in and custom sets of permissions.", no_args_is_help=True)

PasswordStdin = Annotated[
    bool,
    typer.Option("--password-stdin", help="Read the password from standard input (for scripts)"),
]


def _password(from_stdin: bool, prompt: str = "Password", confirm: bool = False) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            fail("no password on standard input")
        return password
    return str(typer.prompt(prompt, hide_input=True, confirmation_prompt=confirm))


# -- login ----------------------------------------------------------------------------------


@handles_errors
def login(
    username: Annotated[
        str | None, typer.Option("--username", "-u", help="Your username (asked if not given)")
    ] = None,
    organization: Annotated[
        str | None,
        typer.Option("--organization", help="The organization to act in (name or id)"),
    ] = None,
    password_stdin: PasswordStdin = False,
    url: UrlOpt = DEFAULT_URL,
    output: OutputOpt = Output.table,
) -> None:
    """Log in: the session is kept for this URL (readable only by you) and used by every
    command given no --token."""
    name = username or str(typer.prompt("Username"))
    body: dict[str, Any] = {"username": name, "password": _password(password_stdin)}
    if organization is not None:
        body["organization"] = organization
    with ApiClient(url, None, saved=False) as client:
        session = client.post("/login", json=body)
    save_login(
        url,
        {
            "token": session["token"],
            "session_id": session["session_id"],
            "username": session["user"]["username"],
            "organization": session["organization"]["name"],
            "expires_at": session["expires_at"],
        },
    )
    if output is Output.json:
        print_json({k: v for k, v in session.items() if k != "token"})
        return
    console().print(
        Text(
            f"logged in to {base_url(url)} as {session['user']['username']} "
            f"({session['role']} in {session['organization']['name']})",
            style="green",
        )
    )
    idle = timedelta(seconds=session["idle_timeout_seconds"])
    console().print(
        Text(f"the session ends after {idle} unused, at the latest {when(session['expires_at'])}"),
        style="dim",
    )


@handles_errors
def logout(url: UrlOpt = DEFAULT_URL) -> None:
    """End the session `stavily login` saved for this URL."""
    if base_url(url) not in saved_logins():
        console().print(f"not logged in to {base_url(url)}", style="dim")
        return
    with ApiClient(url, None) as client:
        try:
            client.post("/logout")
        finally:
            save_login(url, None)  # forgotten here even if the server had ended it
    console().print(f"logged out of {base_url(url)}")


@handles_errors
def whoami(
    url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, output: OutputOpt = Output.table
) -> None:
    """Who your credential acts as, where, and what it may do."""
    with ApiClient(url, token) as client:
        me = client.get("/me")
    if output is Output.json:
        print_json(me)
        return
    who = me["user"]["username"] if me["user"] else f"token {me['token_id']}"
    console().print(f"{who}: {me['role']} in {me['organization']['name']} ({me['kind']})")
    console().print(Text(", ".join(me["permissions"]) or "no permissions", style="dim"))


# -- users ----------------------------------------------------------------------------------

UserArg = Annotated[str, typer.Argument(metavar="ID", help="The user's id (usr_...)")]


def _users_table(users: list[dict[str, Any]]) -> None:
    rows = table("id", "username", "role", "state", "last login")
    for user in users:
        state = "disabled" if user["disabled"] else "locked" if user["locked_until"] else "active"
        rows.add_row(
            cell(user["id"]),
            cell(user["username"]),
            cell(user["role"]),
            cell(state),
            cell(when(user["last_login_at"])),
        )
    print_table(rows)


@user_app.command("add")
@handles_errors
def add_user(
    username: Annotated[str, typer.Argument(help="Lower-case letters, digits, . _ @ -")],
    role: Annotated[str, typer.Option("--role", help="admin, operator, viewer, auditor or custom")],
    existing: Annotated[
        bool,
        typer.Option(
            "--existing", help="Add a user another organization has: they type their password"
        ),
    ] = False,
    password_stdin: PasswordStdin = False,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """A new user with a password (asked twice), or with --existing a user of another
    organization made a member of yours: they agree by typing their own password."""
    if existing:
        password = _password(password_stdin, f"Password of {username} (they type it)")
    else:
        password = _password(password_stdin, confirm=True)
    body: dict[str, Any] = {"username": username, "role": role, "password": password}
    with ApiClient(url, token) as client:
        user = client.post("/users", json=body)
    if output is Output.json:
        print_json(user)
        return
    console().print(Text(f"user {user['username']} ({user['id']}): {user['role']}", style="green"))


@user_app.command("list")
@handles_errors
def list_users(
    url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, output: OutputOpt = Output.table
) -> None:
    """The organization's users."""
    with ApiClient(url, token) as client:
        data = client.get("/users")
    if output is Output.json:
        print_json(data)
        return
    _users_table(data["users"])


@user_app.command("set")
@handles_errors
def set_user(
    user_id: UserArg,
    role: Annotated[str | None, typer.Option("--role", help="A new role here")] = None,
    disable: Annotated[
        bool | None,
        typer.Option("--disable/--enable", help="Refuse their logins and end their sessions"),
    ] = None,
    reset_password: Annotated[
        bool, typer.Option("--reset-password", help="Give them a new password (asked twice)")
    ] = False,
    password_stdin: PasswordStdin = False,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Change a user's role, reset their password, disable or enable them."""
    body: dict[str, Any] = {}
    if role is not None:
        body["role"] = role
    if disable is not None:
        body["disabled"] = disable
    if reset_password:
        body["password"] = _password(password_stdin, "New password", confirm=True)
    if not body:
        fail("nothing to change: give --role, --disable/--enable or --reset-password")
    with ApiClient(url, token) as client:
        user = client.request("PATCH", f"/users/{segment(user_id)}", json=body)
    if output is Output.json:
        print_json(user)
        return
    _users_table([user])


@user_app.command("remove")
@handles_errors
def remove_user(user_id: UserArg, url: UrlOpt = DEFAULT_URL, token: TokenOpt = None) -> None:
    """The user leaves this organization; their sessions and tokens here are revoked."""
    with ApiClient(url, token) as client:
        client.delete(f"/users/{segment(user_id)}")
    console().print(f"user {user_id} removed")


@user_app.command("password")
@handles_errors
def change_password(url: UrlOpt = DEFAULT_URL, token: TokenOpt = None) -> None:
    """Change your own password (your other sessions end)."""
    current = _password(False, "Current password")
    new = _password(False, "New password", confirm=True)
    with ApiClient(url, token) as client:
        client.request(
            "PUT", "/me/password", json={"current_password": current, "new_password": new}
        )
    console().print("password changed; your other sessions have ended")


# -- tokens ---------------------------------------------------------------------------------


def _expiry(text: str | None) -> str | None:
    """`30d`, `12h`... from now, or an ISO 8601 time with its offset."""
    if text is None:
        return None
    try:
        from stavily.workflows.definition import parse_duration  # loaded when used

        return (datetime.now(UTC) + timedelta(seconds=parse_duration(text))).isoformat()
    except ValueError:
        pass
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        fail(f"--expires '{text}' is neither a duration (30d, 12h) nor an ISO 8601 time")
    if at.tzinfo is None:
        fail(f"--expires '{text}' names no UTC offset (add Z or +02:00)")
    return at.isoformat()


@token_app.command("create")
@handles_errors
def create_token(
    name: Annotated[str, typer.Argument(help="What it is for (ci, deploy-bot...)")],
    role: Annotated[str, typer.Option("--role", help="What it may do; no more than you may")],
    expires: Annotated[
        str | None,
        typer.Option("--expires", metavar="WHEN", help="In 30d, 12h..., or at an ISO time"),
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """An API token: its secret is shown this once."""
    body: dict[str, Any] = {"name": name, "role": role}
    if expires is not None:
        body["expires_at"] = _expiry(expires)
    with ApiClient(url, token) as client:
        made = client.post("/tokens", json=body)
    if output is Output.json:
        print_json(made)
        return
    out = console()
    out.print(Text(f"token {made['id']} ({made['name']}): {made['role']}", style="green"))
    out.print(Text(f"  {made['token']}"), soft_wrap=True)
    out.print(
        Text("Shown only now: store it. Use it as STAVILY_TOKEN or Authorization: Bearer."),
        style="dim",
    )


@token_app.command("list")
@handles_errors
def list_tokens(
    sessions: Annotated[
        bool, typer.Option("--sessions", help="Login sessions, not API tokens")
    ] = False,
    every: Annotated[bool, typer.Option("--all", help="Revoked and expired ones too")] = False,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """The organization's API tokens (or login sessions), newest first; never secrets."""
    params = {"kind": "session" if sessions else "api", "revoked": every}
    with ApiClient(url, token) as client:
        data = client.get("/tokens", params=params)
    if output is Output.json:
        print_json(data)
        return
    rows = table("id", "name", "role", "created", "expires", "last used", "revoked")
    for item in data["tokens"]:
        rows.add_row(
            cell(item["id"]),
            cell(item["name"]),
            cell(item["role"]),
            cell(when(item["created_at"])),
            cell(when(item["expires_at"])),
            cell(when(item["last_used_at"])),
            cell(when(item["revoked_at"])),
        )
    print_table(rows)


@token_app.command("revoke")
@handles_errors
def revoke_token(
    token_id: Annotated[str, typer.Argument(metavar="ID", help="tok_... or ses_...")],
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
) -> None:
    """Revoke an API token or end a session, on every replica at once."""
    with ApiClient(url, token) as client:
        client.delete(f"/tokens/{segment(token_id)}")
    console().print(f"token {token_id} revoked")


# -- roles ----------------------------------------------------------------------------------


@role_app.command("list")
@handles_errors
def list_roles(
    url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, output: OutputOpt = Output.table
) -> None:
    """Roles and their permissions, then the catalog of permissions."""
    with ApiClient(url, token) as client:
        data = client.get("/roles")
    if output is Output.json:
        print_json(data)
        return
    rows = table("role", "kind", "permissions", wrap=("permissions",))
    for role in data["roles"]:
        kind = "built-in" if role["builtin"] else "custom"
        rows.add_row(cell(role["name"]), cell(kind), cell(" ".join(role["permissions"])))
    print_table(rows)


@role_app.command("set")
@handles_errors
def set_role(
    name: Annotated[str, typer.Argument(help="A custom role's name")],
    permissions: Annotated[
        list[str], typer.Argument(metavar="PERMISSION...", help="e.g. executions:run")
    ],
    description: Annotated[str | None, typer.Option("--description")] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Define or redefine a custom role (see `stavily role list` for the permissions)."""
    body: dict[str, Any] = {"permissions": permissions}
    if description is not None:
        body["description"] = description
    with ApiClient(url, token) as client:
        role = client.request("PUT", f"/roles/{segment(name)}", json=body)
    if output is Output.json:
        print_json(role)
        return
    console().print(Text(f"role {role['name']}: {' '.join(role['permissions'])}", style="green"))


@role_app.command("delete")
@handles_errors
def delete_role(
    name: Annotated[str, typer.Argument(help="A custom role no one holds")],
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
) -> None:
    """Delete a custom role."""
    with ApiClient(url, token) as client:
        client.delete(f"/roles/{segment(name)}")
    console().print(f"role {name} deleted")


# -- organizations --------------------------------------------------------------------------

org_app = typer.Typer(help="Organizations: each one's resources are its own.", no_args_is_help=True)


@org_app.command("list")
@handles_errors
def list_organizations(
    url: UrlOpt = DEFAULT_URL, token: TokenOpt = None, output: OutputOpt = Output.table
) -> None:
    """Your organizations and your role in each (a token: its own)."""
    with ApiClient(url, token) as client:
        data = client.get("/organizations")
    if output is Output.json:
        print_json(data)
        return
    rows = table("id", "name", "role", "created")
    for org in data["organizations"]:
        rows.add_row(
            cell(org["id"]), cell(org["name"]), cell(org["role"]), cell(when(org["created_at"]))
        )
    print_table(rows)


@org_app.command("create")
@handles_errors
def create_organization(
    name: Annotated[str, typer.Argument(help="Lower-case letters, digits, _ . -")],
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """A new organization: you are its admin (a token of no user gets an admin token of
    it, shown once)."""
    with ApiClient(url, token) as client:
        made = client.post("/organizations", json={"name": name})
    if output is Output.json:
        print_json(made)
        return
    console().print(Text(f"organization {made['name']} ({made['id']})", style="green"))
    if made.get("admin_token"):
        console().print(Text(f"  admin token: {made['admin_token']}"), soft_wrap=True)
        console().print("Shown only now: store it.", style="dim")


@org_app.command("rename")
@handles_errors
def rename_organization(
    organization_id: Annotated[str, typer.Argument(metavar="ID", help="org_...")],
    name: Annotated[str, typer.Argument(help="Its new name")],
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
) -> None:
    """Rename your organization."""
    with ApiClient(url, token) as client:
        client.request("PATCH", f"/organizations/{segment(organization_id)}", json={"name": name})
    console().print(f"organization {organization_id} is now {name}")
