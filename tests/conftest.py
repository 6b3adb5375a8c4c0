"""Shared fixtures: every database-backed test runs on SQLite, and on PostgreSQL when
STAVILY_TEST_DATABASE_URL is set."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from tests.harness import PG_URL, Orchestrator, fresh_database, serve

# The servers of these tests run in this process: their log lines go to the real standard
# error, never into the output of a CLI command a test captures (CliRunner swaps
# sys.stdout and sys.stderr), and loggers are not cached, so capture_logs sees them.
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.__stderr__))

BACKENDS = [
    "sqlite",
    pytest.param(
        "postgresql",
        marks=pytest.mark.skipif(
            not PG_URL, reason="STAVILY_TEST_DATABASE_URL is not set: PostgreSQL runs skipped"
        ),
    ),
]


@pytest.fixture(params=BACKENDS, scope="module")
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def orchestrator(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orchestrator]:
    """One orchestrator per test module and backend; tests use unique names."""
    tmp = tmp_path_factory.mktemp(f"orch-{backend}")
    with fresh_database(backend, tmp) as url, serve(url, tmp) as running:
        yield running


@pytest.fixture
def fresh_orchestrator(backend: str, tmp_path: Path) -> Iterator[Orchestrator]:
    """An orchestrator of this test's own, for tests that need an empty fleet or queue."""
    with fresh_database(backend, tmp_path) as url, serve(url, tmp_path) as running:
        yield running


@pytest.fixture
def pg_url(tmp_path: Path) -> Iterator[str]:
    """A PostgreSQL database of this test's own (tests using it are marked PG_ONLY)."""
    with fresh_database("postgresql", tmp_path) as url:
        yield url
