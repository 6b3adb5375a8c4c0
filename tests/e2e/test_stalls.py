"""Requests that once froze the whole server: a real `stavily serve` process keeps
answering /healthz within 100 ms while each is sent, and each gets its clear answer."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from tests.e2e.support import Stack

# It times /healthz to 100 ms: tests running beside it would take the server's CPU.
pytestmark = [pytest.mark.e2e, pytest.mark.alone]

HEALTHY_WITHIN = 0.1


class Prober:
    """Asks /healthz every 20 ms on a thread of its own and keeps the slowest answer."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    answer = client.get("/healthz")
                    if answer.status_code != 200:
                        self.failures.append(f"/healthz answered {answer.status_code}")
                except httpx.HTTPError as exc:
                    self.failures.append(f"/healthz failed: {exc!r}")
                self.latencies.append(time.monotonic() - started)
                self._stop.wait(0.02)

    @contextmanager
    def watching(self, what: str) -> Iterator[None]:
        self.latencies.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop.clear()
        self._thread.start()
        time.sleep(0.1)
        try:
            yield
        finally:
            time.sleep(0.1)
            self._stop.set()
            self._thread.join()
        worst = max(self.latencies)
        assert not self.failures, self.failures
        assert len(self.latencies) >= 5, what
        assert worst < HEALTHY_WITHIN, f"{what}: /healthz took {worst * 1000:.0f} ms"


def _agent(stack: Stack, agent_id: str, key: str) -> httpx.Client:
    """A client speaking as an official agent does."""
    headers = {
        "Authorization": f"Bearer {key}",
        "Content-Type": "application/json",
        "Accept": "application/json",
        "User-Agent": "Stavily-Agent/1.0.0",
    }
    return httpx.Client(base_url=stack.url, headers=headers, timeout=15)


def _yaml_post(stack: Stack, path: str, source: str) -> httpx.Response:
    return stack.api.post(
        path, content=source, headers={"Content-Type": "application/yaml"}, timeout=60
    )


def _chain(name: str, count: int, cycle: bool = False, agent: str = "nobody") -> str:
    lines = [f"name: {name}", f"agents: {{single_agent: {agent}}}", "actions:", "  steps:"]
    for i in range(count):
        dep = i - 1 if i else (count - 1 if cycle else None)
        depends = f", depends_on: [s{dep}]" if dep is not None else ""
        lines.append(f"    - {{name: s{i}, plugin: echo{depends}}}")
    return "\n".join(lines) + "\n"


def _nested(depth: int) -> str:
    """JSON text nested `depth` deep (too deep for the JSON encoders to write)."""
    return '{"a": ' * depth + '"bottom"' + "}" * depth


def test_stalling_requests_leave_the_server_answering(stack: Stack) -> None:
    prober = Prober(stack.url)
    agent_id, key = stack.create_agent(f"stall-{uuid.uuid4().hex[:6]}")
    agent_name = stack.agent(agent_id)["name"]

    # Templates that render for seconds or into megabytes: each step fails, nothing waits.
    templates = {
        "loops": "{% for a in inputs.s %}{% for b in inputs.s %}{% endfor %}{% endfor %}",
        "power": "{{ 7 ** 8000000 }}",
        "repeat": "{{ 'a' * 20000000 }}",
    }
    name = f"stall-{uuid.uuid4().hex[:6]}"
    steps = "\n".join(
        f'    - {{name: {step}, plugin: echo, config: {{x: "{text}"}}, '
        "error_handling: {on_failure: continue}}"
        for step, text in templates.items()
    )
    stack.apply(
        f"name: {name}\nagents: {{single_agent: {agent_name}}}\n"
        f"inputs: {{s: {{type: string}}}}\nactions:\n  steps:\n{steps}\n"
    )
    with prober.watching("templates"):
        execution = stack.run(name, {"s": "x" * 20_000})
        done = stack.wait_finished(execution["id"], 30)
    errors = {s["name"]: s["error"] for s in done["steps"]}
    assert done["status"] == "succeeded"  # every step continues, and failed
    assert "rendering took longer than 1s" in errors["loops"]
    assert "7 ** 8000000 is too large a number" in errors["power"]
    assert "larger than 1048576 bytes" in errors["repeat"]

    # A 12,000-step chain (660 KB) is refused: a workflow has at most 2,000 steps ...
    with prober.watching("a 12,000-step chain"):
        answer = _yaml_post(stack, "/api/v1/workflows", _chain("long", 12_000))
    assert answer.status_code == 422, answer.text
    assert "12000 steps: a workflow has at most 2000" in answer.text
    # ... and one of 2,000 is validated, applied, run and failed (its 1,999 other steps
    # wound down) without holding up the server.
    long_id, long_key = stack.create_agent(f"stall-long-{uuid.uuid4().hex[:6]}")
    chain = _chain("long", 2_000, agent=stack.agent(long_id)["name"])
    with prober.watching("a 2,000-step chain validated and applied"):
        answer = _yaml_post(stack, "/api/v1/workflows/validate", chain)
        assert answer.status_code == 200, answer.text
        assert len(answer.json()["steps"]) == 2_000
        answer = _yaml_post(stack, "/api/v1/workflows", chain)
        assert answer.status_code == 201, answer.text
    with prober.watching("a 2,000-step execution started"):
        long_run = stack.run("long")
    with _agent(stack, long_id, long_key) as agent:
        instruction = agent.get(f"/agents/v1/{long_id}/instructions").json()["instruction"]
        base = f"/agents/v1/{long_id}/instructions/{instruction['id']}"
        with prober.watching("a 2,000-step execution failed and wound down"):
            answer = agent.post(f"{base}/result", json={"status": "failed", "error_message": "x"})
        assert answer.status_code == 200, answer.text
    assert stack.execution(long_run["id"])["status"] == "failed"

    # A 2,000-step cycle is found without recursion (it went 2,000 calls deep): 422.
    with prober.watching("a 2,000-step cycle"):
        answer = _yaml_post(stack, "/api/v1/workflows/validate", _chain("cycle", 2_000, True))
    assert answer.status_code == 422, answer.text
    assert "dependency cycle" in answer.text

    # A result nested 1,000 deep: 422, and its step does not stay running.
    flat = f"flat-{uuid.uuid4().hex[:6]}"
    stack.apply(
        f"name: {flat}\nagents: {{single_agent: {agent_name}}}\n"
        "actions: {steps: [{name: only, plugin: echo}]}\n"
    )
    execution = stack.run(flat)
    with _agent(stack, agent_id, key) as agent:
        instruction = agent.get(f"/agents/v1/{agent_id}/instructions").json()["instruction"]
        base = f"/agents/v1/{agent_id}/instructions/{instruction['id']}"
        assert agent.put(base, json={"status": "executing"}).status_code == 200
        with prober.watching("a result nested 1,000 deep"):
            deep = f'{{"status": "completed", "result": {_nested(1_000)}}}'
            answer = agent.post(f"{base}/result", content=deep)
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["code"] == "invalid_input"
        assert "nests deeper than 128 levels" in answer.text
        # run inputs that deep: 422 too, nothing started
        answer = stack.api.post(
            f"/api/v1/workflows/{flat}/runs",
            content=f'{{"inputs": {_nested(1_000)}}}',
            headers={"Content-Type": "application/json"},
        )
        assert answer.status_code == 422, answer.text
    step = stack.step(execution["id"], "only")
    assert step["status"] == "failed"
    assert "the agent's result was refused" in step["error"]
