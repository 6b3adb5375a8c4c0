"""Fixtures of the integration tests."""

from __future__ import annotations

import pytest

from tests.harness import Invoke, Orchestrator, cli_for


@pytest.fixture
def cli(orchestrator: Orchestrator) -> Invoke:
    """`stavily ...` against the module's orchestrator (see harness.cli_for)."""
    return cli_for(orchestrator)
