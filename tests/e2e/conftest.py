"""Fixtures for end-to-end tests: each test gets its own database, processes and logs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.support import Processes, Stack
from tests.harness import fresh_database

_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Iterator[pytest.TestReport]:
    """Keep each phase's report on the item, so fixtures know at teardown whether it failed."""
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    reports = request.node.stash.get(_REPORTS, {})
    return any(r.failed for r in reports.values())


@pytest.fixture
def processes(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Processes]:
    """Every process a test starts; all stopped at the end, their output printed on failure."""
    running = Processes(tmp_path / "logs")
    try:
        yield running
    finally:
        running.close()
        if _failed(request):
            print(running.report())


@pytest.fixture
def database_url(backend: str, tmp_path: Path) -> Iterator[str]:
    with fresh_database(backend, tmp_path) as url:
        yield url


@pytest.fixture
def stack(database_url: str, processes: Processes, tmp_path: Path) -> Iterator[Stack]:
    """An orchestrator process on a fresh database, started; agents are up to each test.

    `database_url` comes first so that the database outlives the processes using it."""
    running = Stack(processes, tmp_path, database_url)
    try:
        running.start_server()
        yield running
    finally:
        running.close()
