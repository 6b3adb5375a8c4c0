"""The migrations build exactly the tables the code declares, on each database."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Connection

from stavily.store import migrate
from stavily.store.db import Database
from stavily.store.models import metadata
from tests.harness import fresh_database


def test_migrated_schema_matches_the_models(backend: str, tmp_path: Path) -> None:
    async def diff(url: str) -> list[object]:
        db = Database(url)
        try:
            await migrate.upgrade(db)
            await migrate.upgrade(db)  # a second run is a no-op
            async with db.engine.connect() as conn:
                return await conn.run_sync(
                    lambda sync: compare_metadata(MigrationContext.configure(sync), metadata)
                )
        finally:
            await db.dispose()

    with fresh_database(backend, tmp_path) as url:
        assert asyncio.run(diff(url)) == []


def test_the_latest_migration_undoes_and_redoes(backend: str, tmp_path: Path) -> None:
    def step_back_and_forth(sync: Connection) -> list[object]:
        config = migrate.alembic_config(sync)
        command.downgrade(config, "-1")
        command.upgrade(config, "head")
        return compare_metadata(MigrationContext.configure(sync), metadata)

    async def diff(url: str) -> list[object]:
        db = Database(url)
        try:
            await migrate.upgrade(db)
            async with db.engine.begin() as conn:
                return await conn.run_sync(step_back_and_forth)
        finally:
            await db.dispose()

    with fresh_database(backend, tmp_path) as url:
        assert asyncio.run(diff(url)) == []
