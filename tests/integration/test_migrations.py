"""The migrations build exactly the tables the code declares, on each database."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

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
