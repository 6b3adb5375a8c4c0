"""docs/triggers.md's webhook examples run as written: the signature computed in shell
(openssl, curl) and in Python is accepted by a real server."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness import Orchestrator

DOC = Path(__file__).resolve().parents[2] / "docs" / "triggers.md"


def block(after: str, language: str) -> str:
    text = DOC.read_text()
    start = text.index(after)
    match = re.compile(rf"```{language}\n(.*?)```", re.S).search(text, start)
    assert match, f"no {language} block after {after!r}"
    return match.group(1)


@pytest.fixture
def hook(orchestrator: Orchestrator) -> dict[str, str]:
    name = f"docs-{time.monotonic_ns()}"
    orchestrator.apply(f"name: {name}\nactions:\n  steps:\n  - {{name: a, plugin: echo}}\n")
    response = orchestrator.api.post("/api/v1/webhooks", json={"workflow": name})
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def filled(code: str, hook: dict[str, str]) -> str:
    code = code.replace("whsec_…", hook["secret"])
    return re.sub(r"http://127\.0\.0\.1:8700/hooks/hook_01J…", hook["url"], code)


def accepted(orchestrator: Orchestrator, output: str) -> None:
    event_id = re.search(r"evt_[0-9A-Z]{26}", output)
    assert event_id and "accepted" in output, output
    event = orchestrator.api.get(f"/api/v1/events/{event_id.group(0)}").json()
    assert (event["type"], event["payload"]["pusher"]["name"]) == ("push", "ada")


def test_the_shell_example_is_accepted(orchestrator: Orchestrator, hook: dict[str, str]) -> None:
    code = filled(block("In shell", "sh"), hook)
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    accepted(orchestrator, done.stdout)


def test_the_python_example_is_accepted(orchestrator: Orchestrator, hook: dict[str, str]) -> None:
    code = filled(block("In Python", "python"), hook)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    accepted(orchestrator, done.stdout)
