"""Shared fixtures: every database-backed test runs on SQLite, and on PostgreSQL when
STAVILY_TEST_DATABASE_URL is set."""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import structlog

from tests.harness import PG_URL, Orchestrator, fresh_database, serve

# The servers of these tests run in this process: their log lines go to the real standard
# error, never into the output of a CLI command a test captures (CliRunner swaps
# sys.stdout and sys.stderr), and loggers are not cached, so capture_logs sees them.
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.__stderr__))


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, each worker's temporary folders go in `<basetemp>/gw0` rather
    than `<basetemp>/popen-gw0`: paths under tmp_path stay about as long as in a run
    without xdist, so a Unix socket a test puts there fits in its 107-byte limit."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    basetemp = config.option.basetemp
    if worker and basetemp:
        if Path(basetemp).name == f"popen-{worker}":
            config.option.basetemp = basetemp = str(Path(basetemp).with_name(worker))
        # the folder of this run, shared by its workers (made before they start)
        config.stash[_TURNS] = _Turns(Path(basetemp).parent)


class _Turns:
    """Tests marked `alone` (they time how fast something answers: a test running beside
    them would take their CPU) run while no other test does. Under pytest-xdist every
    test holds a shared lock on a file of the run's, an `alone` one an exclusive lock;
    the gate lets an `alone` test waiting for its turn in before the next shared one."""

    def __init__(self, folder: Path) -> None:
        self.gate = (folder / "alone.gate").open("ab")
        self.lock = (folder / "alone.lock").open("ab")

    @contextmanager
    def turn(self, alone: bool) -> Iterator[None]:
        if alone:
            fcntl.flock(self.gate, fcntl.LOCK_EX)
            fcntl.flock(self.lock, fcntl.LOCK_EX)
        else:
            fcntl.flock(self.gate, fcntl.LOCK_SH)
            fcntl.flock(self.lock, fcntl.LOCK_SH)
            fcntl.flock(self.gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(self.lock, fcntl.LOCK_UN)
            if alone:
                fcntl.flock(self.gate, fcntl.LOCK_UN)


_TURNS = pytest.StashKey[_Turns]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Setup, call and teardown of a test in its turn (see _Turns); without xdist, at once."""
    turns = item.config.stash.get(_TURNS, None)
    if turns is None:
        return (yield)
    with turns.turn(alone=item.get_closest_marker("alone") is not None):
        return (yield)


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
