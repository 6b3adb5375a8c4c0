"""The reference agent installs registry plugins on demand (stavily.agent.registry): a
published version runs with no hand-copy, once verified against its signed manifest; a
tampered or untrustworthy one never runs. Real server, real agent processes."""

from __future__ import annotations

import base64
import io
import json
import tarfile
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.e2e.support import Process, Stack, wait_until, workflow
from tests.harness import fresh_database

pytestmark = pytest.mark.e2e


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    """SQLite only: what is under test is the agent; the server's side of installs runs
    on both databases in tests/integration/test_plugin_workflows.py."""
    with fresh_database("sqlite", tmp_path) as url:
        yield url


# Takes `--input <file>` only when it is given (the convention: none for empty input).
HELLO = """\
import argparse, json, os, sys
parser = argparse.ArgumentParser()
parser.add_argument("--input")
args = parser.parse_args()
data = {}
if args.input:
    with open(args.input) as handle:
        data = json.load(handle)
json.dump(
    {"greeting": (data.get("input_data") or {}).get("greeting"), "cwd": os.getcwd(),
     "argv": sys.argv[1:], "version": "VERSION"},
    sys.stdout,
)
"""


def archive(plugin_id: str, version: str = "1.0.0") -> bytes:
    """A plugin's folder as the tar.gz an operator uploads: plugin.yaml and main.py."""
    manifest = {
        "plugin": {
            "id": plugin_id,
            "name": plugin_id,
            "description": "a registry test plugin",
            "version": version,
            "type": "action",
            "protocol": "input",
            "runtime": {"type": "python", "version": "3.8+", "entry_point": "main.py"},
            "configuration": {"greeting": {"type": "string", "description": "what to say"}},
        }
    }
    files = {
        "plugin.yaml": yaml.safe_dump(manifest),
        "main.py": textwrap.dedent(HELLO).replace("VERSION", version),
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            entry = tarfile.TarInfo(name)
            entry.size = len(data)
            tar.addfile(entry, io.BytesIO(data))
    return buffer.getvalue()


def publish(stack: Stack, plugin_id: str) -> dict[str, Any]:
    response = stack.api.post(
        "/api/v1/plugins", content=archive(plugin_id), headers={"Content-Type": "application/gzip"}
    )
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def start_agent(
    stack: Stack, plugins: Path, env: dict[str, str] | None = None
) -> tuple[str, Process]:
    agent_name = f"registry-agent-{uuid.uuid4().hex[:6]}"
    agent_id, key = stack.create_agent(agent_name)
    plugins.mkdir(parents=True, exist_ok=True)
    return agent_name, stack.start_agent(agent_id, key, plugins, env=env)


def start_run(
    stack: Stack, agent_name: str, plugin_id: str, configs: dict[str, dict[str, Any]]
) -> str:
    """A run of a new workflow with a step per config (by name, independent of each
    other) on `plugin_id` 1.0.0; its execution id."""
    name = f"registry-{uuid.uuid4().hex[:6]}"
    steps = [
        {"name": step, "plugin": {"id": plugin_id, "version": "1.0.0"}, "config": config}
        for step, config in configs.items()
    ]
    stack.apply(workflow(name, agent_name, steps))
    return str(stack.run(name)["id"])


def run_step(stack: Stack, agent_name: str, plugin_id: str, config: dict[str, Any]) -> Any:
    """One run of a one-step workflow on `plugin_id` 1.0.0; the finished step."""
    execution_id = start_run(stack, agent_name, plugin_id, {"hello": config})
    return stack.wait_finished(execution_id, timeout=8)["steps"][0]


def downloads(agent: Process) -> int:
    """Artifacts the agent downloaded, from its log."""
    return sum(
        1
        for line in agent.stderr().splitlines()
        if line.startswith("{") and json.loads(line).get("event") == "plugin artifact downloaded"
    )


def blob(stack: Stack, sha256: str) -> Path:
    return stack.data_dir / "plugins" / "sha256" / sha256[:2] / sha256


def flip_last_byte(path: Path) -> bytes:
    """Tamper a file in place, same size; its original bytes."""
    original = path.read_bytes()
    path.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    return original


def assert_nothing_installed(plugins: Path, plugin_id: str, sha256: str) -> None:
    assert not (plugins / ".registry" / plugin_id / "1.0.0").exists()
    assert not (plugins / ".cache" / f"{sha256}.tar.gz").exists()
    assert not list((plugins / ".cache").glob("*.part")), "a partial download was left"


def test_a_published_plugin_installs_on_demand_then_runs_from_its_install(
    stack: Stack, tmp_path: Path
) -> None:
    published = publish(stack, "hello")
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    agent_name = f"registry-agent-{uuid.uuid4().hex[:6]}"
    created = stack.api.post("/api/v1/agents", json={"name": agent_name, "capacity": 2})
    assert created.status_code == 201, created.text

    # Two steps wait for the agent's two slots: one installs the version, both run it.
    execution_id = start_run(
        stack, agent_name, "hello", {"a": {"greeting": "hi"}, "b": {"greeting": "yo"}}
    )
    agent = stack.start_agent(
        created.json()["agent_id"], created.json()["api_key"], plugins, extra=("--capacity", "2")
    )
    steps = {s["name"]: s for s in stack.wait_finished(execution_id, timeout=8)["steps"]}
    assert steps["b"]["status"] == "succeeded", steps["b"]
    assert steps["b"]["result"]["greeting"] == "yo"
    first = steps["a"]
    assert first["status"] == "succeeded", first
    installed = plugins / ".registry" / "hello" / "1.0.0"
    assert first["result"]["greeting"] == "hi"
    assert Path(first["result"]["cwd"]).resolve() == installed.resolve()
    assert first["result"]["argv"][0] == "--input", first
    marker = json.loads((installed / ".stavily-install.json").read_text())
    assert marker["sha256"] == published["sha256"]
    assert (plugins / ".cache" / f"{published['sha256']}.tar.gz").is_file()
    assert not (plugins / "hello").exists(), "installed as a hand-copy"
    assert downloads(agent) == 1

    # The second run uses the installed copy: no second download.
    second = run_step(stack, agent_name, "hello", {})
    assert second["status"] == "succeeded", second
    assert second["result"]["cwd"] == first["result"]["cwd"]
    assert second["result"]["argv"] == [], "empty input_data still got --input"
    assert downloads(agent) == 1

    # Its heartbeats say it has the version: routing prefers it for the version's steps.
    def has() -> list[dict[str, Any]]:
        answer = stack.api.get(f"/api/v1/agents/{created.json()['agent_id']}/plugins")
        return [p for p in answer.json()["plugins"] if p["sha256"] == published["sha256"]]

    assert wait_until(has, 5, "the heartbeat's plugins")[0]["status"] == "installed"


def test_a_tampered_artifact_is_refused_and_nothing_is_installed(
    stack: Stack, tmp_path: Path
) -> None:
    published = publish(stack, "tampered")
    sha256 = published["sha256"]
    plugins = tmp_path / "plugins"
    agent_name, agent = start_agent(stack, plugins)

    # Served tampered (the server reads its blob at each request): refused.
    original = flip_last_byte(blob(stack, sha256))
    step = run_step(stack, agent_name, "tampered", {"greeting": "hi"})
    assert step["status"] == "failed", step
    assert step["error"].startswith("plugin refused: "), step
    assert f"the signed manifest's {sha256}" in step["error"], step
    assert_nothing_installed(plugins, "tampered", sha256)

    # Served intact: installed. Then the cached copy is tampered and the install lost; the
    # server says the cache is current (304), and the agent's re-hash refuses it.
    blob(stack, sha256).write_bytes(original)
    assert run_step(stack, agent_name, "tampered", {})["status"] == "succeeded"
    flip_last_byte(plugins / ".cache" / f"{sha256}.tar.gz")
    (plugins / ".registry" / "tampered" / "1.0.0" / ".stavily-install.json").unlink()
    step = run_step(stack, agent_name, "tampered", {})
    assert step["status"] == "failed", step
    assert step["error"].startswith("plugin refused: the artifact's sha256 is "), step
    assert not (plugins / ".cache" / f"{sha256}.tar.gz").exists(), "the bad cache was kept"

    # With the bad copy gone, the next run downloads it afresh.
    assert run_step(stack, agent_name, "tampered", {})["status"] == "succeeded"
    assert downloads(agent) == 2


def test_only_pinned_plugin_keys_are_trusted(stack: Stack, tmp_path: Path) -> None:
    published = publish(stack, "pinned")
    other = Ed25519PrivateKey.generate().public_key()
    stranger = base64.b64encode(
        other.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ).decode()
    distrustful, _ = start_agent(
        stack, tmp_path / "distrustful", env={"STAVILY_AGENT_PLUGIN_KEYS": stranger}
    )
    step = run_step(stack, distrustful, "pinned", {"greeting": "hi"})
    assert step["status"] == "failed", step
    assert step["error"] == (
        f"plugin refused: signed by key {published['key_id']}, which this agent does not trust"
    ), step
    assert_nothing_installed(tmp_path / "distrustful", "pinned", published["sha256"])

    # Pinning the registry's own key (beside another) lets it through.
    keys = stack.api.get("/api/v1/plugins/keys").json()["keys"]
    server_key = next(k["public_key"] for k in keys if k["key_id"] == published["key_id"])
    trusting, _ = start_agent(
        stack, tmp_path / "trusting", env={"STAVILY_AGENT_PLUGIN_KEYS": f"{stranger},{server_key}"}
    )
    step = run_step(stack, trusting, "pinned", {"greeting": "hi"})
    assert step["status"] == "succeeded", step
    assert step["result"]["greeting"] == "hi"


def rollout(stack: Stack, plugin_id: str) -> dict[str, Any]:
    """Install 1.0.0 of `plugin_id` on every agent; the rollout once every agent is done."""
    response = stack.api.post(f"/api/v1/plugins/{plugin_id}/rollouts", json={"version": "1.0.0"})
    assert response.status_code in (200, 201), response.text
    path = f"/api/v1/plugins/{plugin_id}/rollouts/{response.json()['id']}"

    def done() -> dict[str, Any] | None:
        view = stack.api.get(path).json()
        return view if view["done"] else None

    return wait_until(done, 8, f"the rollout of {plugin_id} to finish")


def test_a_rollout_installs_verified_and_refuses_a_tampered_version(
    stack: Stack, tmp_path: Path
) -> None:
    published = publish(stack, "rolled")
    tampered = publish(stack, "rolled-tampered")
    flip_last_byte(blob(stack, tampered["sha256"]))
    plugins = tmp_path / "plugins"
    agent_name, agent = start_agent(stack, plugins)

    installed = rollout(stack, "rolled")
    assert [a["status"] for a in installed["agents"]] == ["installed"], installed
    marker = plugins / ".registry" / "rolled" / "1.0.0" / ".stavily-install.json"
    assert json.loads(marker.read_text())["sha256"] == published["sha256"]
    assert downloads(agent) == 1
    # The step that follows runs what the rollout installed.
    step = run_step(stack, agent_name, "rolled", {"greeting": "hi"})
    assert step["status"] == "succeeded", step
    assert downloads(agent) == 1

    refused = rollout(stack, "rolled-tampered")
    assert [a["status"] for a in refused["agents"]] == ["failed"], refused
    assert refused["agents"][0]["error"].startswith("plugin refused: the artifact's sha256"), (
        refused
    )
    assert_nothing_installed(plugins, "rolled-tampered", tampered["sha256"])
