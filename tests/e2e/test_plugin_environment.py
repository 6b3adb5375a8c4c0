"""The environment a plugin gets is the agent's to decide (docs/plugins-environment.md),
seen through a real server and a real `stavily agent run`."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.support import (
    Processes,
    Stack,
    workflow,
    write_plugin,
)
from tests.harness import fresh_database

pytestmark = pytest.mark.e2e


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    """SQLite only: what is under test is what the agent gives its plugins; the server's side of it runs on
    both databases in the integration tests."""
    with fresh_database("sqlite", tmp_path) as url:
        yield url


SECRET_VARIABLE = "STAVILY_SECRET_E2E_API"
SECRET_VALUE = "e2e-secret-value-0123456789"

# Prints the variables it was asked about (and a digest of API_TOKEN: a secret's value
# would come back masked).
ENV_PLUGIN = (
    f"\nHOST_SECRET = {SECRET_VALUE!r}\n"
    + """
names = ["APP_MODE", "DEPLOY_TARGET", "REGION", "FOO", "PYTHONWARNINGS", "BROWSER"]
token = os.environ.get("API_TOKEN")
json.dump(
    {
        "env": {name: os.environ.get(name) for name in names},
        "token_sha256": token and __import__("hashlib").sha256(token.encode()).hexdigest(),
        "host_secret_seen": HOST_SECRET in os.environ.values(),
    },
    sys.stdout,
)
"""
)

OTHER_FILE = """
import os
open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "other-ran"), "w").close()
"""


class SecretStack(Stack):
    """An orchestrator with a secret in its environment."""

    def server_env(self) -> dict[str, str]:
        return {**super().server_env(), SECRET_VARIABLE: SECRET_VALUE}


@pytest.fixture
def stack(database_url: str, processes: Processes, tmp_path: Path) -> Iterator[Stack]:
    """conftest's stack, its server holding a secret."""
    running = SecretStack(processes, tmp_path, database_url)
    try:
        running.start_server()
        yield running
    finally:
        running.close()


def _plugin(plugins: Path) -> Path:
    folder = write_plugin(plugins, "env-inspect", ENV_PLUGIN)
    manifest = yaml.safe_load((folder / "plugin.yaml").read_text())
    manifest["plugin"]["permissions"] = {"network": False, "environment": ["APP_*"]}
    (folder / "plugin.yaml").write_text(yaml.safe_dump(manifest))
    (folder / "other.py").write_text(OTHER_FILE)
    return folder


def _agent(stack: Stack, plugins: Path) -> str:
    """An agent allowing DEPLOY_* by its flag and REGION by STAVILY_AGENT_ALLOW_ENV; its
    own environment holds a secret of the host's."""
    agent_name = f"env-agent-{uuid.uuid4().hex[:6]}"
    agent_id, key = stack.create_agent(agent_name)
    env = {"STAVILY_AGENT_ALLOW_ENV": "REGION", "HOST_SECRET": SECRET_VALUE}
    stack.start_agent(agent_id, key, plugins, extra=("--allow-env", "DEPLOY_*"), env=env)
    return agent_name


def _step(name: str, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "plugin": "env-inspect",
        "config": config,
        "error_handling": {"on_failure": "continue"},
    }


def test_the_agent_decides_what_reaches_the_plugin(stack: Stack, tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    folder = _plugin(plugins)
    agent_name = _agent(stack, plugins)
    marker = tmp_path / "browsed"
    name = f"env-{uuid.uuid4().hex[:6]}"
    steps = [
        _step(
            "allowed",
            {"environment": {"APP_MODE": "fast", "DEPLOY_TARGET": "blue", "REGION": "eu"}},
        ),
        _step("unallowed", {"environment": {"FOO": "bar"}}),
        _step("other-file", {"entrypoint": "other.py"}),
    ]
    # The exploit is refused when the workflow is applied (official agents would pass it
    # on; our agent refuses it too: tests/unit/test_plugin_environment.py).
    exploit = _step(
        "exploit",
        {
            "environment": {
                "PYTHONWARNINGS": "all:0:antigravity.x:0:0",
                "BROWSER": f"sh -c 'touch {marker}' #%s",
            }
        },
    )
    refused = stack.api.post(
        "/api/v1/workflows",
        content=yaml.safe_dump(workflow(name, agent_name, [*steps, exploit])),
        headers={"Content-Type": "application/yaml"},
    )
    assert refused.status_code == 422, refused.text
    assert {p["path"] for p in refused.json()["error"]["details"]} == {
        "actions.steps[3].config.environment.PYTHONWARNINGS",
        "actions.steps[3].config.environment.BROWSER",
    }
    stack.apply(workflow(name, agent_name, steps))
    done = stack.wait_finished(stack.run(name)["id"], timeout=30)
    by_name = {s["name"]: s for s in done["steps"]}

    allowed = by_name["allowed"]
    assert allowed["status"] == "succeeded", allowed
    assert allowed["result"]["env"] == {
        "APP_MODE": "fast",  # the manifest's permissions.environment
        "DEPLOY_TARGET": "blue",  # --allow-env
        "REGION": "eu",  # STAVILY_AGENT_ALLOW_ENV
        "FOO": None,
        "PYTHONWARNINGS": None,
        "BROWSER": None,
    }
    # The agent's own environment stays its own.
    assert allowed["result"]["host_secret_seen"] is False

    assert not marker.exists(), "the injected command ran"

    unallowed = by_name["unallowed"]
    assert unallowed["status"] == "failed", unallowed
    assert unallowed["error"] == (
        "environment variable 'FOO' is not allowed by the plugin's manifest "
        "(permissions.environment) or the agent's --allow-env"
    ), unallowed

    other = by_name["other-file"]
    assert other["status"] == "failed", other
    assert "is refused: the plugin's manifest runs 'main.py'" in other["error"], other
    assert not (folder / "other-ran").exists()


def test_a_secret_the_step_references_reaches_the_plugin(stack: Stack, tmp_path: Path) -> None:
    """The server names, in `context.secret_environment`, the variables whose value is one
    secret: those pass without an allow rule; a refused name stays refused."""
    plugins = tmp_path / "plugins"
    _plugin(plugins)
    agent_name = _agent(stack, plugins)
    name = f"env-secret-{uuid.uuid4().hex[:6]}"
    steps = [
        _step("secret", {"environment": {"API_TOKEN": "{{ secrets.api }}"}}),
    ]
    secrets = {"api": {"env": SECRET_VARIABLE}}
    denied = _step("denied-secret", {"environment": {"LD_PRELOAD": "{{ secrets.api }}"}})
    refused = stack.api.post(
        "/api/v1/workflows",
        content=yaml.safe_dump(workflow(name, agent_name, [*steps, denied], secrets=secrets)),
        headers={"Content-Type": "application/yaml"},
    )
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["details"] == [
        {
            "path": "actions.steps[1].config.environment.LD_PRELOAD",
            "message": "environment variable 'LD_PRELOAD' is refused: loader and interpreter "
            "variables are never passed to plugins",
        }
    ]
    stack.apply(workflow(name, agent_name, steps, secrets=secrets))
    done = stack.wait_finished(stack.run(name)["id"], timeout=30)
    by_name = {s["name"]: s for s in done["steps"]}

    secret = by_name["secret"]
    assert secret["status"] == "succeeded", secret
    assert secret["result"]["token_sha256"] == hashlib.sha256(SECRET_VALUE.encode()).hexdigest()
