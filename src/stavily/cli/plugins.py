"""`stavily plugin ...`: publish, list, show, deprecate, yank, restore and roll out plugin
versions, and the keys they are signed with."""

from __future__ import annotations

import re
import tarfile
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import IO, Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from stavily.cli.client import (
    DEFAULT_URL,
    EXIT_ERROR,
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
    table,
    when,
)

app = typer.Typer(
    help="Plugins: publish, list, show, deprecate, yank, restore, roll out; signing keys.",
    no_args_is_help=True,
)

IdArg = Annotated[str, typer.Argument(metavar="ID", help="The plugin's id (from plugin.yaml)")]
VersionArg = Annotated[str, typer.Argument(metavar="VERSION", help="The version, e.g. 1.2.0")]
ReasonOpt = Annotated[
    str | None, typer.Option("--reason", help="Why: kept with the version and in the audit log")
]

# What the server's packaging leaves out too: version control and caches.
SKIPPED = frozenset({".git", "__pycache__", ".hg", ".svn", ".DS_Store"})
# The server's own test for a git URL's scp-like form (stavily.plugins.sources).
_SCP_LIKE = re.compile(r"^[\w.-]+@[\w.-]+:")
_GIT_SCHEMES = ("https://", "http://", "ssh://", "git://", "file://")

PUBLISH_TIMEOUT = 600

VERSION_STYLES = {"active": "green", "deprecated": "yellow", "yanked": "red"}
AGENT_STYLES = {"installed": "green", "failed": "red", "pending": "dim"}


def version_status(status: str | None) -> Text:
    return Text(status or "-", style=VERSION_STYLES.get(status or "", ""))


def _facts(rows: list[tuple[str, Any]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim")
    grid.add_column()
    for key, value in rows:
        grid.add_row(key, value if isinstance(value, Text) else cell(value))
    return grid


# --- where a plugin comes from ------------------------------------------------------------


def is_git_url(source: str) -> bool:
    return source.lower().startswith(_GIT_SCHEMES) or bool(_SCP_LIKE.match(source))


def split_ref(source: str) -> tuple[str, str | None]:
    """A git URL and the ref after its last `@`, looked for in the URL's path only (an
    `@` before it is the user's: `git@host:org/repo.git@v1.2.0` is the URL
    `git@host:org/repo.git` at `v1.2.0`; `https://x/y.git` has no ref)."""
    scp = _SCP_LIKE.match(source)
    if scp:
        path_start = scp.end()
    else:
        after_scheme = source.index("://") + 3
        slash = source.find("/", after_scheme)
        path_start = len(source) if slash < 0 else slash
    at = source.rfind("@", path_start)
    if at < 0:
        return source, None
    url, ref = source[:at], source[at + 1 :]
    if not ref:
        fail(f"'{source}' ends with '@' but names no branch, tag or commit after it")
    return url, ref


def plugin_folder(path: str, sub_directory: str | None) -> Path:
    folder = Path(path).expanduser()
    if not folder.exists():
        raise CliError(
            f"no such folder: {path}",
            EXIT_INVALID,
            code="invalid_input",
            hint="publish a plugin's folder (plugin.yaml at its root), or a git URL (https://, "
            "ssh://, git://, git@host:org/repo, file://) with @REF for a branch, tag or commit",
        )
    if not folder.is_dir():
        fail(f"{path} is not a folder: publish the plugin's folder, with plugin.yaml at its root")
    if sub_directory:
        inner = folder / sub_directory
        if Path(sub_directory).is_absolute() or ".." in Path(sub_directory).parts:
            fail(f"--sub-directory '{sub_directory}' must be a folder inside {path}")
        if not inner.is_dir():
            fail(f"--sub-directory '{sub_directory}' is not a folder in {path}")
        folder = inner
    return folder


def _kept(entry: tarfile.TarInfo) -> tarfile.TarInfo | None:
    if SKIPPED.intersection(PurePosixPath(entry.name).parts):
        return None
    entry.uid = entry.gid = 0
    entry.uname = entry.gname = ""
    return entry


def pack(folder: Path, into: IO[bytes]) -> None:
    """The folder's content as a tar.gz written to `into`, plugin.yaml at its root (the
    server packages it again, reproducibly; links go in as links, for it to refuse)."""
    try:
        with tarfile.open(fileobj=into, mode="w:gz") as tar:
            for child in sorted(folder.iterdir()):
                if child.name not in SKIPPED:
                    tar.add(child, arcname=child.name, recursive=True, filter=_kept)
    except OSError as exc:
        fail(f"cannot read {folder}: {exc.strerror or exc}", exit_code=EXIT_ERROR)
    into.flush()
    into.seek(0)


def source_text(source: dict[str, Any] | None) -> str | None:
    if not source:
        return None
    kind = source.get("kind")
    if kind == "git":
        text = str(source.get("repository_url"))
        if source.get("ref"):
            text += f" @ {source['ref']}"
        if source.get("commit"):
            text += f" (commit {str(source['commit'])[:12]})"
        if source.get("sub_directory"):
            text += f", folder {source['sub_directory']}"
        return text
    if kind == "archive":
        return "uploaded folder"
    if kind == "path":
        return f"server folder {source.get('path')}"
    return str(source)


# --- commands -----------------------------------------------------------------------------


@app.command("publish")
@handles_errors
def publish(
    source: Annotated[
        str,
        typer.Argument(
            metavar="PATH|GIT_URL[@REF]",
            help="The plugin's folder (uploaded), or a git URL the server fetches, with "
            "@branch, @tag or @commit (default: its default branch)",
        ),
    ],
    sub_directory: Annotated[
        str | None,
        typer.Option("--sub-directory", help="The plugin's folder inside the folder or repository"),
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Publish a plugin version from its folder or a git repository.

    The version is plugin.yaml's, signed by the server. The same content again publishes
    nothing; other content for a version already published is refused (versions never
    change): exit 4. An invalid plugin lists every problem with its path: exit 2."""
    # A git fetch on the server, or a large upload, may take a while: PUBLISH_TIMEOUT.
    if is_git_url(source):
        repository, ref = split_ref(source)
        body: dict[str, Any] = {"source": repository}
        if ref:
            body["ref"] = ref
        if sub_directory:
            body["sub_directory"] = sub_directory
        with ApiClient(url, token, timeout=PUBLISH_TIMEOUT) as client:
            published = client.post("/plugins", json=body)
    else:
        folder = plugin_folder(source, sub_directory)
        with tempfile.TemporaryFile(prefix="stavily-plugin-", suffix=".tar.gz") as archive:
            pack(folder, archive)
            with ApiClient(url, token, timeout=PUBLISH_TIMEOUT) as client:
                published = client.post(
                    "/plugins", content=archive, headers={"Content-Type": "application/gzip"}
                )
    if output is Output.json:
        print_json(published)
        return
    name = f"{published['plugin_id']} {published['version']}"
    out = console()
    if not published.get("created", True):
        out.print(Text(f"{name} is already published with this content"), soft_wrap=True)
        return
    out.print(
        Text(f"published {name} (sha256 {published['sha256']})", style="green"), soft_wrap=True
    )
    line = f"signed with key {published.get('key_id')}; protocol {published.get('protocol')}"
    if (published.get("source") or {}).get("kind") == "git":
        line = f"from {source_text(published['source'])}; {line}"
    out.print(Text(line, style="dim"), soft_wrap=True)


@app.command("list")
@handles_errors
def list_plugins(
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Every plugin: its latest active version and every version's status."""
    with ApiClient(url, token) as client:
        data = client.get("/plugins")
    if output is Output.json:
        print_json(data)
        return
    if not data["plugins"]:
        console().print("no plugins", style="dim")
        return
    rows = table(
        "id",
        "type",
        "latest",
        "versions",
        "updated",
        "description",
        wrap=("versions", "description"),
    )
    for p in data["plugins"]:
        versions = Text()
        for index, v in enumerate(p.get("versions") or []):
            if index:
                versions.append(", ")
            versions.append(v["version"])
            if v["status"] != "active":
                versions.append(f" ({v['status']})", style=VERSION_STYLES.get(v["status"], ""))
        rows.add_row(
            cell(p["id"]),
            cell(p.get("type")),
            cell(p.get("latest")),
            versions if versions else cell(None),
            cell(when(p.get("updated_at"))),
            cell(p.get("description"), limit=60),
        )
    print_table(rows)


def _version_facts(version: dict[str, Any]) -> Table:
    rows: list[tuple[str, Any]] = [("status", version_status(version.get("status")))]
    if version.get("status_reason"):
        rows.append(("reason", version["status_reason"]))
    rows += [
        ("sha256", version.get("sha256")),
        ("size", f"{version.get('size')} bytes"),
        ("protocol", version.get("protocol")),
        ("source", source_text(version.get("source"))),
        ("signed with key", version.get("key_id")),
        ("published", f"{when(version.get('created_at'))} by {version.get('published_by')}"),
    ]
    runtime = (version.get("manifest") or {}).get("runtime") or {}
    if runtime:
        rows.append(("runtime", f"{runtime.get('type')} {runtime.get('entry_point')}"))
    return _facts(rows)


@app.command("show")
@handles_errors
def show(
    plugin_id: IdArg,
    version: Annotated[
        str | None,
        typer.Option("--version", help="This version (default: the latest active one)"),
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """A plugin, its versions with their status, and one version's details.

    The details of --version V (default: the latest active one): sha256, size, protocol,
    source and the key it is signed with."""
    path = f"/plugins/{segment(plugin_id)}"
    with ApiClient(url, token) as client:
        if version is not None:
            shown = client.get(f"{path}/versions/{segment(version)}")
            if output is Output.json:
                print_json(shown)
                return
            plugin = client.get(path)
        else:
            plugin = client.get(path)
            if output is Output.json:
                print_json(plugin)
                return
            versions = plugin.get("versions") or []
            chosen = plugin.get("latest") or (versions[-1]["version"] if versions else None)
            shown = client.get(f"{path}/versions/{segment(chosen)}") if chosen is not None else None
    out = console()
    header = Text(plugin["id"], style="bold")
    if plugin.get("type"):
        header.append(f"  {plugin['type']}")
    out.print(header)
    rows: list[tuple[str, Any]] = []
    if plugin.get("name") and plugin["name"] != plugin["id"]:
        rows.append(("name", plugin["name"]))
    if plugin.get("description"):
        rows.append(("description", plugin["description"]))
    rows += [
        ("latest", plugin.get("latest")),
        ("created", when(plugin.get("created_at"))),
        ("updated", when(plugin.get("updated_at"))),
    ]
    out.print(_facts(rows))
    out.print()
    listed = table("version", "status")
    for v in plugin.get("versions") or []:
        listed.add_row(cell(v["version"]), version_status(v["status"]))
    print_table(listed)
    if shown is not None:
        out.print()
        out.print(Text(f"version {shown['version']}", style="bold"))
        out.print(_version_facts(shown))


def _change(
    plugin_id: str,
    version: str,
    action: str,
    reason: str | None,
    url: str,
    token: str | None,
    output: Output,
) -> None:
    with ApiClient(url, token) as client:
        changed = client.post(
            f"/plugins/{segment(plugin_id)}/versions/{segment(version)}/{action}",
            json={"reason": reason} if reason is not None else None,
        )
    if output is Output.json:
        print_json(changed)
        return
    line = Text(f"{changed['plugin_id']} {changed['version']}: ")
    line.append_text(version_status(changed["status"]))
    if changed.get("status_reason"):
        line.append(f" ({changed['status_reason']})")
    console().print(line)


@app.command("deprecate")
@handles_errors
def deprecate(
    plugin_id: IdArg,
    version: VersionArg,
    reason: ReasonOpt = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Mark a version deprecated: shown as such, used only when no active one fits."""
    _change(plugin_id, version, "deprecate", reason, url, token, output)


@app.command("yank")
@handles_errors
def yank(
    plugin_id: IdArg,
    version: VersionArg,
    reason: ReasonOpt = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Yank a version: no workflow applied from now on resolves to it.

    Workflows pinned to it already keep running it. Undone with restore."""
    _change(plugin_id, version, "yank", reason, url, token, output)


@app.command("restore")
@handles_errors
def restore(
    plugin_id: IdArg,
    version: VersionArg,
    reason: ReasonOpt = None,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Make a deprecated or yanked version active again."""
    _change(plugin_id, version, "restore", reason, url, token, output)


@app.command("keys")
@handles_errors
def keys(
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """The public keys versions are signed with: the newest signs, older ones verify."""
    with ApiClient(url, token) as client:
        data = client.get("/plugins/keys")
    if output is Output.json:
        print_json(data)
        return
    if not data["keys"]:
        console().print("no signing keys", style="dim")
        return
    rows = table("key id", "algorithm", "signing", "created", "public key")
    for k in data["keys"]:
        rows.add_row(
            cell(k["key_id"]),
            cell(k.get("algorithm")),
            Text("yes", style="green") if k.get("signing") else Text("no", style="dim"),
            cell(when(k.get("created_at"))),
            cell(k.get("public_key")),
        )
    print_table(rows)


@app.command("rotate-key")
@handles_errors
def rotate_key(
    keys_dir: Annotated[
        Path | None,
        typer.Option(
            "--keys-dir",
            help="The key folder [env: STAVILY_PLUGIN_KEYS_DIR; default: <data dir>/plugin-keys]",
        ),
    ] = None,
    retire: Annotated[
        bool, typer.Option("--retire", help="Remove the older private keys (they sign no more)")
    ] = False,
) -> None:
    """Make a new signing key, on the server's machine (the keys never leave its folder).
    New versions are signed with it; the older public keys stay, so versions they signed
    still verify. Replicas sharing the folder use it at their next signature."""
    from stavily.config import Settings
    from stavily.plugins.signing import Keyring

    folder = keys_dir or Settings().plugin_keys_path
    key_id = Keyring(folder).rotate(retire=retire)
    console().print(f"new signing key {key_id} in {folder}")


# --- rollouts -----------------------------------------------------------------------------


def parse_selector(pairs: list[str] | None) -> dict[str, str | list[str]]:
    """`--selector k=v ...` as the rollout's labels; a key given again: any of its values."""
    labels: dict[str, str | list[str]] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            fail(f"--selector '{pair}' is not key=value")
        if key not in labels:
            labels[key] = value
            continue
        known = labels[key]
        values = known if isinstance(known, list) else [known]
        if value not in values:
            labels[key] = [*values, value]
    return labels


def _labels_text(labels: dict[str, str | list[str]]) -> str:
    return ", ".join(f"{k}={'|'.join(v) if isinstance(v, list) else v}" for k, v in labels.items())


def _where(labels: dict[str, str | list[str]], agent: str | None) -> str:
    parts = [f"named {agent}"] if agent else []
    if labels:
        parts.append(f"matching {_labels_text(labels)}")
    return (" " + " and ".join(parts)) if parts else ""


def _agent_called(agent: dict[str, Any]) -> str:
    return str(agent.get("name") or agent.get("agent_id"))


def _agent_line(agent: dict[str, Any], rollout: dict[str, Any]) -> Text:
    line = Text(f"{_agent_called(agent)}  ")
    line.append(agent["status"], style=AGENT_STYLES.get(agent["status"], ""))
    line.append(f"  {rollout['installed'] + rollout['failed']}/{rollout['total']}", style="dim")
    if agent.get("error"):
        line.append(f"  error: {' '.join(str(agent['error']).split())}", style="red")
    return line


def _summary(rollout: dict[str, Any]) -> str:
    return (
        f"{rollout['installed']} installed, {rollout['failed']} failed, "
        f"{rollout['pending']} pending of {rollout['total']}"
    )


def follow(
    client: ApiClient, rollout: dict[str, Any], timeout: float, interval: float, output: Output
) -> tuple[dict[str, Any], bool]:
    """Poll the rollout until it is done or `timeout` seconds passed; (last seen, done).

    JSON: nothing printed meanwhile. On a terminal, a progress bar of the agents done
    (installed or failed) of all, a line for each failure above it; else one line per
    agent whose status changed."""
    path = f"/plugins/{segment(rollout['plugin_id'])}/rollouts/{segment(rollout['id'])}"
    deadline = time.monotonic() + timeout

    def waited() -> bool:
        """Wait for the next poll; False when the time is up."""
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(interval, left))
        return True

    if output is Output.json:
        while not rollout["done"] and waited():
            rollout = client.get(path)
        return rollout, bool(rollout["done"])
    out = console()
    seen = {a["agent_id"]: a["status"] for a in rollout.get("agents") or []}
    if out.is_terminal:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failed]}", style="red"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=out, transient=False) as bar:
            task = bar.add_task(
                f"{rollout['plugin_id']} {rollout['version']}",
                total=rollout["total"],
                completed=rollout["installed"] + rollout["failed"],
                failed="",
            )
            while True:
                for agent in rollout.get("agents") or []:
                    if seen.get(agent["agent_id"]) != agent["status"]:
                        seen[agent["agent_id"]] = agent["status"]
                        if agent["status"] == "failed":
                            bar.console.print(_agent_line(agent, rollout))
                bar.update(
                    task,
                    total=rollout["total"],
                    completed=rollout["installed"] + rollout["failed"],
                    failed=f"{rollout['failed']} failed" if rollout["failed"] else "",
                )
                if rollout["done"] or not waited():
                    break
                rollout = client.get(path)
        return rollout, bool(rollout["done"])
    while True:
        for agent in rollout.get("agents") or []:
            if seen.get(agent["agent_id"]) != agent["status"]:
                seen[agent["agent_id"]] = agent["status"]
                out.print(_agent_line(agent, rollout), soft_wrap=True)
        if rollout["done"] or not waited():
            break
        rollout = client.get(path)
    return rollout, bool(rollout["done"])


@app.command("rollout")
@handles_errors
def rollout(
    plugin_id: IdArg,
    version: Annotated[str, typer.Option("--version", help="The version to install, e.g. 1.2.0")],
    selector: Annotated[
        list[str] | None,
        typer.Option(
            "--selector",
            "-s",
            metavar="KEY=VALUE",
            help="Only agents with this label. Repeatable: every key must match, a key given "
            "again matches any of its values; none: every active agent",
        ),
    ] = None,
    agent: Annotated[
        str | None,
        typer.Option("--agent", metavar="NAME", help="Only this agent (by name)"),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0, help="Seconds to wait for every agent")
    ] = 300,
    interval: Annotated[
        float, typer.Option("--interval", min=0.05, help="Seconds between polls")
    ] = 1.0,
    url: UrlOpt = DEFAULT_URL,
    token: TokenOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Install a version on agents and follow it; exit 0 only if every one installed it.

    Follows until every agent installed it or failed to: a progress bar on a terminal,
    else one line per agent that changed. Exit 1 when an agent failed (each listed with
    its error) or after --timeout (the rollout goes on)."""
    body: dict[str, Any] = {"version": version}
    labels = parse_selector(selector)
    chosen: dict[str, Any] = {}
    if labels:
        chosen["labels"] = labels
    if agent:
        chosen["single_agent"] = agent
    if chosen:
        body["selector"] = chosen
    with ApiClient(url, token) as client:
        started = client.post(f"/plugins/{segment(plugin_id)}/rollouts", json=body)
        if output is not Output.json:
            where = _where(labels, agent)
            noun = "agent" if started["total"] == 1 else "agents"
            console().print(
                Text(
                    f"rollout {started['id']}: {started['plugin_id']} {started['version']} "
                    f"to {started['total']} {noun}{where}"
                ),
                soft_wrap=True,
            )
        if not started["total"]:
            # A mistyped selector must not read as a rollout that went well.
            if output is Output.json:
                print_json(started)
            raise CliError(
                f"no active agent{_where(labels, agent) or ''}: nothing to install",
                EXIT_ERROR,
                code="no_agents",
                hint="every agent and its labels: stavily agent list",
            )
        try:
            last, done = follow(client, started, timeout, interval, output)
        except KeyboardInterrupt:
            typer.echo(f"stopped following; rollout {started['id']} goes on", err=True)
            raise typer.Exit(130) from None
    if output is Output.json:
        print_json(last)
    else:
        console().print(Text(f"rollout {last['id']}: {_summary(last)}"), soft_wrap=True)
    agents = last.get("agents") or []
    failed = [a for a in agents if a["status"] == "failed"]
    problems = [{"path": _agent_called(a), "message": a.get("error") or "failed"} for a in failed]
    if not done:
        pending = [a for a in agents if a["status"] == "pending"]
        raise CliError(
            f"rollout {last['id']} not done after {timeout:g}s: {_summary(last)}",
            EXIT_ERROR,
            problems + [{"path": _agent_called(a), "message": "pending"} for a in pending],
            code="timeout",
            hint="agents install a rollout when they next poll: are they running?",
        )
    if failed:
        raise CliError(
            f"{last['plugin_id']} {last['version']} failed to install on {len(failed)} of "
            f"{last['total']} agents",
            EXIT_ERROR,
            problems,
            code="rollout_failed",
        )
