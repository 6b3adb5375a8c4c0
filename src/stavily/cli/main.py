"""`stavily ...`: the operator's daily tool (Typer)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import typer

from stavily import __version__
from stavily.cli.executions import app as execution_app
from stavily.cli.workflows import app as workflow_app

app = typer.Typer(
    help="Stavily Orchestrator: the central server of the Stavily automation platform.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)
agent_app = typer.Typer(help="The reference agent.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(agent_app, name="agent")
app.add_typer(workflow_app, name="workflow")
app.add_typer(execution_app, name="execution")


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
) -> None:
    """Run the orchestrator (migrations run on start)."""
    import uvicorn

    from stavily.app import create_app
    from stavily.logging import configure

    settings = _settings(
        host=host,
        port=port,
        database_url=database_url,
        data_dir=data_dir,
        bootstrap_token=bootstrap_token,
    )
    configure(settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        timeout_graceful_shutdown=5,
    )


@db_app.command("upgrade")
def db_upgrade(database_url: DatabaseOpt = None, data_dir: DataDirOpt = None) -> None:
    """Apply every pending migration."""
    from stavily.store import migrate
    from stavily.store.db import Database

    settings = _settings(database_url=database_url, data_dir=data_dir)

    async def run() -> None:
        db = Database(settings.effective_database_url)
        try:
            await migrate.upgrade(db)
        finally:
            await db.dispose()

    asyncio.run(run())
    typer.echo("database is up to date")


@agent_app.command("run")
def agent_run(
    url: Annotated[str, typer.Option(help="The orchestrator's base URL", envvar="STAVILY_URL")],
    agent_id: Annotated[str, typer.Option(help="This agent's id", envvar="STAVILY_AGENT_ID")],
    token: Annotated[
        str, typer.Option(help="This agent's credential", envvar="STAVILY_AGENT_TOKEN")
    ],
    plugins_dir: Annotated[
        Path, typer.Option(help="Folder holding one folder per plugin id")
    ] = Path("plugins"),
    heartbeat_interval: Annotated[float, typer.Option(help="Seconds between heartbeats")] = 30,
    poll_wait: Annotated[float, typer.Option(help="Long-poll wait in seconds")] = 25,
) -> None:
    """Run the reference agent: poll, run plugins, report, heartbeat."""
    from stavily.agent.runner import AgentConfig, run_agent
    from stavily.logging import configure

    configure("info")
    config = AgentConfig(
        url=url,
        agent_id=agent_id,
        token=token,
        plugins_dir=plugins_dir,
        heartbeat_interval=heartbeat_interval,
        poll_wait=poll_wait,
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
