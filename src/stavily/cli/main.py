"""`stavily ...`: the operator's daily tool (Typer)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from stavily import __version__
from stavily.cli.agents import agent_app, enrollment_app, fleet_app
from stavily.cli.audit import app as audit_app
from stavily.cli.events import app as event_app
from stavily.cli.executions import app as execution_app
from stavily.cli.plugins import app as plugin_app
from stavily.cli.schedules import app as schedule_app
from stavily.cli.secrets import app as secret_app
from stavily.cli.users import login, logout, org_app, role_app, token_app, user_app, whoami
from stavily.cli.webhooks import app as webhook_app
from stavily.cli.workflows import app as workflow_app

app = typer.Typer(
    help="Stavily Orchestrator: the central server of the Stavily automation platform.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(agent_app, name="agent")
app.add_typer(workflow_app, name="workflow")
app.add_typer(execution_app, name="execution")
app.add_typer(enrollment_app, name="enrollment")
app.add_typer(fleet_app, name="fleet")
app.add_typer(audit_app, name="audit")
app.add_typer(event_app, name="event")
app.add_typer(plugin_app, name="plugin")
app.add_typer(schedule_app, name="schedule")
app.add_typer(webhook_app, name="webhook")
app.add_typer(secret_app, name="secret")
app.add_typer(user_app, name="user")
app.add_typer(token_app, name="token")
app.add_typer(role_app, name="role")
app.add_typer(org_app, name="org")
app.command()(login)
app.command()(logout)
app.command()(whoami)


def _settings(**overrides: Any) -> Any:
    from stavily.config import Settings

    return Settings(**{k: v for k, v in overrides.items() if v is not None})


DatabaseOpt = Annotated[
    str | None,
    typer.Option("--database-url", help="SQLAlchemy async URL [env: STAVILY_DATABASE_URL]"),
]
DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="Embedded data folder [env: STAVILY_DATA_DIR]")
]


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(f"stavily {__version__}")


def _check_tls(cert: Path | None, key: Path | None) -> None:
    """A certificate and key uvicorn can serve with, or StartRefused saying which file is
    wrong: unreadable, not PEM, an encrypted key (no one would type its password), or a
    key that is not the certificate's."""
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from stavily.security.credentials import StartRefused

    if cert is None and key is None:
        return
    if cert is None or key is None:
        raise StartRefused(
            "--tls-cert and --tls-key (STAVILY_TLS_CERT, STAVILY_TLS_KEY) go together"
        )
    try:
        x509.load_pem_x509_certificates(cert.read_bytes())
    except OSError as exc:
        raise StartRefused(f"cannot read the TLS certificate {cert}: {exc.strerror}") from None
    except ValueError:
        raise StartRefused(f"the TLS certificate {cert} is not a PEM certificate") from None
    try:
        serialization.load_pem_private_key(key.read_bytes(), password=None)
    except OSError as exc:
        raise StartRefused(f"cannot read the TLS key {key}: {exc.strerror}") from None
    except TypeError:
        raise StartRefused(f"the TLS key {key} is encrypted: give it unencrypted") from None
    except ValueError:
        raise StartRefused(f"the TLS key {key} is not a PEM private key") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        problem = "is not the key of" if exc.reason == "KEY_VALUES_MISMATCH" else "cannot serve"
        raise StartRefused(f"the TLS key {key} {problem} the certificate {cert}") from None


def _preflight(settings: Any) -> None:
    """What would keep the server from starting, checked before it (and its workers)
    start, so that `serve` says it in one line rather than in a traceback: a TLS
    certificate or key that cannot serve, a weak or revoked bootstrap token, an agent JWT
    key too short or not the other replicas'. Raises StartRefused. The server's start
    does the same again (a no-op by then)."""
    from stavily.security import access, agent_tokens, sealing
    from stavily.store import migrate
    from stavily.store.db import Database

    _check_tls(settings.tls_cert, settings.tls_key)
    access.check_bootstrap_token(settings.bootstrap_token)

    async def check() -> None:
        db = Database(settings.effective_database_url, settings.database_pool_size)
        try:
            await migrate.upgrade(db)
            if settings.bootstrap_token:  # a generated one is printed by the server's start
                await access.bootstrap(db, settings.bootstrap_token)
            await agent_tokens.signing_key(db, settings.agent_jwt_key, settings.data_dir)
            await sealing.sealer(
                db, settings.secrets_key, settings.data_dir, settings.secrets_key_previous
            )
        finally:
            await db.dispose()

    asyncio.run(check())


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to bind [env: STAVILY_HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="Port [env: STAVILY_PORT]")] = None,
    database_url: DatabaseOpt = None,
    data_dir: DataDirOpt = None,
    bootstrap_token: Annotated[
        str | None,
        typer.Option(help="Admin token created on first start [env: STAVILY_BOOTSTRAP_TOKEN]"),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1, max=64, help="Server processes, PostgreSQL only [env: STAVILY_WORKERS]"
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option(help="PEM certificate (chain) to serve HTTPS with [env: STAVILY_TLS_CERT]"),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option(help="The certificate's PEM private key [env: STAVILY_TLS_KEY]"),
    ] = None,
) -> None:
    """Run the orchestrator (migrations run on start)."""
    import structlog
    import uvicorn

    from stavily.agent.runner import loopback
    from stavily.api.http import HttpProtocol
    from stavily.app import create_app
    from stavily.logging import configure
    from stavily.security.credentials import StartRefused

    settings = _settings(
        host=host,
        port=port,
        database_url=database_url,
        data_dir=data_dir,
        bootstrap_token=bootstrap_token,
        workers=workers,
        tls_cert=tls_cert,
        tls_key=tls_key,
    )
    configure(settings.log_level)
    if settings.workers > 1 and settings.effective_database_url.startswith("sqlite"):
        typer.echo(
            "error: --workers needs PostgreSQL (STAVILY_DATABASE_URL): SQLite has one writer, "
            "so one server process",
            err=True,
        )
        raise typer.Exit(2)
    try:
        _preflight(settings)
    except StartRefused as refused:
        typer.echo(f"error: {refused.message}", err=True)
        raise typer.Exit(2) from None
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "loop": "uvloop",
        "http": HttpProtocol,
        "log_level": "warning",
        "timeout_graceful_shutdown": 5,
    }
    if settings.tls_cert is not None:
        options.update(ssl_certfile=settings.tls_cert, ssl_keyfile=settings.tls_key)
    elif not loopback(settings.host):
        structlog.get_logger("stavily").warning(
            "serving plain HTTP on a non-loopback address: credentials cross the network "
            "in clear; give --tls-cert and --tls-key, or serve behind a TLS proxy",
            host=settings.host,
        )
    if settings.workers == 1:
        uvicorn.run(create_app(settings), **options)
        return
    # Each worker process builds its settings from the environment: hand it these.
    os.environ["STAVILY_DATABASE_URL"] = settings.effective_database_url
    os.environ["STAVILY_DATA_DIR"] = str(settings.data_dir)
    if settings.bootstrap_token:
        os.environ["STAVILY_BOOTSTRAP_TOKEN"] = settings.bootstrap_token
    uvicorn.run("stavily.app:create_app", factory=True, workers=settings.workers, **options)


@db_app.command("upgrade")
def db_upgrade(database_url: DatabaseOpt = None, data_dir: DataDirOpt = None) -> None:
    """Apply every pending migration."""
    from stavily.store import migrate
    from stavily.store.db import Database

    settings = _settings(database_url=database_url, data_dir=data_dir)

    async def run() -> None:
        db = Database(settings.effective_database_url, settings.database_pool_size)
        try:
            await migrate.upgrade(db)
        finally:
            await db.dispose()

    asyncio.run(run())
    typer.echo("database is up to date")


@db_app.command("rekey")
def db_rekey(database_url: DatabaseOpt = None, data_dir: DataDirOpt = None) -> None:
    """Re-seal, with the current secrets key, what the database holds sealed under a
    previous one (STAVILY_SECRETS_KEY_PREVIOUS); online, beside running servers."""
    from stavily.security import rekey, sealing
    from stavily.security.credentials import StartRefused
    from stavily.store import migrate
    from stavily.store.db import Database

    settings = _settings(database_url=database_url, data_dir=data_dir)

    async def run() -> rekey.Rekeyed:
        db = Database(settings.effective_database_url, settings.database_pool_size)
        try:
            await migrate.upgrade(db)
            sealer = await sealing.sealer(
                db, settings.secrets_key, settings.data_dir, settings.secrets_key_previous
            )
            return await rekey.rekey(db, sealer)
        finally:
            await db.dispose()

    try:
        done = asyncio.run(run())
    except StartRefused as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    kinds = ("data_key", "webhook", "instruction")
    typer.echo(
        "re-sealed with the current secrets key: "
        + ", ".join(f"{done.resealed[kind]} {kind.replace('_', ' ')}(s)" for kind in kinds)
    )
    if done.unopenable:
        typer.echo(
            f"warning: {len(done.unopenable)} value(s) open with no configured key "
            f"(altered, or sealed with a key not given): {', '.join(done.unopenable)}",
            err=True,
        )
    elif settings.secrets_key_previous:
        typer.echo("nothing needs the previous key now: STAVILY_SECRETS_KEY_PREVIOUS can go")


@agent_app.command("run")
def agent_run(
    url: Annotated[
        str | None,
        typer.Option(
            help="The orchestrator's base URL (default: the credentials file's)",
            envvar="STAVILY_URL",
        ),
    ] = None,
    agent_id: Annotated[
        str | None, typer.Option(help="This agent's id", envvar="STAVILY_AGENT_ID")
    ] = None,
    token: Annotated[
        str | None, typer.Option(help="This agent's credential", envvar="STAVILY_AGENT_TOKEN")
    ] = None,
    enroll: Annotated[
        str | None,
        typer.Option(
            help="Enroll with this enrollment token when there are no credentials yet",
            envvar="STAVILY_ENROLLMENT_TOKEN",
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="The agent's name, to enroll (default: the hostname)")
    ] = None,
    labels: Annotated[
        list[str] | None,
        typer.Option("--label", metavar="KEY=VALUE", help="A label to ask for when enrolling"),
    ] = None,
    credentials_file: Annotated[
        Path | None,
        typer.Option(
            help="Where the id and key are kept (default: <plugins-dir>/../agent-credentials"
            ".json with --plugins-dir, else ~/.stavily/agent.json)",
            envvar="STAVILY_AGENT_CREDENTIALS",
        ),
    ] = None,
    plugins_dir: Annotated[
        Path | None,
        typer.Option(help="Folder holding one folder per plugin id (default: plugins)"),
    ] = None,
    heartbeat_interval: Annotated[float, typer.Option(help="Seconds between heartbeats")] = 30,
    poll_wait: Annotated[float, typer.Option(help="Long-poll wait in seconds")] = 25,
    capacity: Annotated[
        int,
        typer.Option(
            min=1,
            max=1000,
            help="Instructions run at once (the server hands out no more than the agent's "
            "capacity there)",
        ),
    ] = 1,
    allow_env: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-env",
            metavar="NAME",
            help="A step environment variable every plugin may receive: a name or a glob "
            "(APP_*), repeatable; added to STAVILY_AGENT_ALLOW_ENV's (comma-separated). "
            "Loader and interpreter variables are never passed",
        ),
    ] = None,
    plugin_key: Annotated[
        list[str] | None,
        typer.Option(
            "--plugin-key",
            metavar="BASE64",
            help="A public key registry plugins must be signed with (base64 of the raw "
            "Ed25519 key, as `stavily plugin keys` lists it), repeatable; added to "
            "STAVILY_AGENT_PLUGIN_KEYS's (comma-separated). None: trust the orchestrator's",
        ),
    ] = None,
    environment: Annotated[
        str,
        typer.Option(
            help="The environment this agent serves, as plugins ask for it on the agent's "
            "socket (get_agent_info)",
            envvar="STAVILY_AGENT_ENVIRONMENT",
        ),
    ] = "production",
    demo_mode: Annotated[
        bool,
        typer.Option(
            "--demo-mode/--no-demo-mode",
            help="Tell plugins to only simulate their actions (STAVILY_DEMO_MODE=true). "
            "Default: they act for real (STAVILY_DEMO_MODE=false)",
            envvar="STAVILY_AGENT_DEMO_MODE",
        ),
    ] = False,
    install_timeout: Annotated[
        float,
        typer.Option(
            min=1,
            help="Seconds a plugin's requirements may take to install into its environment",
        ),
    ] = 600,
    ca_cert: Annotated[
        Path | None,
        typer.Option(
            help="PEM CA certificate the orchestrator's must chain to (a private CA); "
            "default: the public CAs",
            envvar="STAVILY_AGENT_CA_CERT",
        ),
    ] = None,
    allow_insecure_http: Annotated[
        bool,
        typer.Option(
            "--allow-insecure-http",
            help="Allow a plain http:// URL to a host other than this machine: the "
            "agent's credential then crosses the network in clear",
            envvar="STAVILY_AGENT_ALLOW_INSECURE_HTTP",
        ),
    ] = False,
) -> None:
    """Run the reference agent: poll, run plugins, report, heartbeat.

    Its credentials: --agent-id and --token; else the credentials file; else enrolling
    with --enroll, which writes that file (mode 0600) for later starts.
    """
    from stavily.agent.registry import plugin_key_list
    from stavily.agent.runner import (
        AgentConfig,
        EnrollmentFailed,
        TransportRefused,
        allow_env_patterns,
        default_credentials_file,
        resolve_credentials,
        run_agent,
        tls_verify,
    )
    from stavily.cli.agents import parse_labels
    from stavily.cli.client import CliError, report
    from stavily.logging import configure

    configure("info")
    try:
        extra_labels = parse_labels(labels)
    except CliError as error:
        report(error)
        raise typer.Exit(error.exit_code) from None
    plugins = plugins_dir or Path("plugins")
    try:
        verify = tls_verify(ca_cert)
        credentials = asyncio.run(
            resolve_credentials(
                url=url,
                agent_id=agent_id,
                token=token,
                enroll=enroll,
                name=name,
                labels=extra_labels,
                path=credentials_file or default_credentials_file(plugins_dir),
                verify=verify,
                allow_insecure_http=allow_insecure_http,
            )
        )
    except (EnrollmentFailed, TransportRefused) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    config = AgentConfig(
        url=credentials.url,
        agent_id=credentials.agent_id,
        token=credentials.api_key,
        plugins_dir=plugins,
        heartbeat_interval=heartbeat_interval,
        poll_wait=poll_wait,
        capacity=capacity,
        allow_env=allow_env_patterns(allow_env, os.environ.get("STAVILY_AGENT_ALLOW_ENV")),
        plugin_keys=plugin_key_list(plugin_key, os.environ.get("STAVILY_AGENT_PLUGIN_KEYS")),
        environment=environment,
        demo_mode=demo_mode,
        install_timeout=install_timeout,
        ca_cert=ca_cert,
        allow_insecure_http=allow_insecure_http,
    )
    raise typer.Exit(asyncio.run(run_agent(config)))


@app.command()
def quickstart(
    port: Annotated[int, typer.Option(help="Port for the orchestrator")] = 8700,
    data_dir: Annotated[Path, typer.Option(help="Where the embedded data lives")] = Path(
        ".stavily"
    ),
) -> None:
    """Start the orchestrator on SQLite with one local agent, and run the example workflow."""
    from stavily.cli.quickstart import run

    raise typer.Exit(run(port=port, data_dir=data_dir))


if __name__ == "__main__":
    app()
