"""Templates render within a time budget and an output size, off the event loop."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from stavily.workflows.templating import (
    RenderLimits,
    TemplateProblem,
    TemplateTimeout,
    references,
    render_limited,
)

CONTEXT = {"inputs": {"s": "x" * 20_000, "n": 3}}
LIMITS = RenderLimits(timeout=0.5, max_output=1024 * 1024)


async def _render_watching_the_loop(template: Any, limits: RenderLimits = LIMITS) -> Any:
    """Render while a task measures how long the loop goes without running it; returns
    (outcome, longest stall in seconds)."""
    stop = asyncio.Event()

    async def beat() -> float:
        worst = 0.0
        while not stop.is_set():
            before = time.monotonic()
            await asyncio.sleep(0.005)
            worst = max(worst, time.monotonic() - before - 0.005)
        return worst

    watcher = asyncio.create_task(beat())
    await asyncio.sleep(0.01)
    try:
        outcome: Any = await render_limited({"v": template}, CONTEXT, limits)
    except TemplateProblem as exc:
        outcome = exc
    stop.set()
    return outcome, await watcher


@pytest.mark.parametrize(
    ("template", "message"),
    [
        # a nested loop writing nothing: only the time budget stops it
        (
            "{% for a in inputs.s %}{% for b in inputs.s %}{% endfor %}{% endfor %}",
            "rendering took longer than 0.5s",
        ),
        # a nested loop writing: the output limit stops it first
        (
            "{% for a in inputs.s %}{% for b in inputs.s %}{{ b }}{% endfor %}{% endfor %}",
            "the rendered text would be larger than 1048576 bytes",
        ),
        ("{{ 7 ** 8000000 }}", "7 ** 8000000 is too large a number"),
        ("{{ 'a' * 20000000 }}", "the repeated value would be larger than 1048576 bytes"),
        ("{{ [0] * 20000000 }}", "the repeated value would be larger"),
        ("{{ 'x'|center(100000000) }}", "the result of 'center' would be larger"),
        ("{{ '{:>999999999}'.format(1) }}", "the formatted text would be larger"),
        ("{{ '%999999999d' % 1 }}", "the formatted text would be larger"),
        ("{{ inputs.s|replace('x', inputs.s) }}", "the result of 'replace' would be larger"),
        (
            "{% set ns = namespace(x=inputs.s) %}{% for i in range(30) %}"
            "{% set ns.x = ns.x ~ ns.x %}{% endfor %}{{ ns.x|length }}",
            "the joined text would be larger",
        ),
        (
            "{% set ns = namespace(x=[1]) %}{% for i in range(40) %}"
            "{% set ns.x = ns.x + ns.x %}{% endfor %}{{ ns.x|length }}",
            "the joined value would be larger",
        ),
        ("{{ (10 ** 10000) * (10 ** 10000) }}", "too large a number"),
    ],
)
async def test_expensive_templates_fail_the_step_and_never_stall_the_loop(
    template: str, message: str
) -> None:
    outcome, stall = await _render_watching_the_loop(template)
    assert isinstance(outcome, TemplateProblem), outcome
    assert message in str(outcome)
    assert stall < 0.1, f"the event loop stalled {stall * 1000:.0f} ms"


async def test_the_budget_is_configurable() -> None:
    slow = "{% for a in inputs.s %}{% for b in inputs.s[:2000] %}{% endfor %}{% endfor %}"
    outcome, _ = await _render_watching_the_loop(slow, RenderLimits(timeout=0.1))
    assert isinstance(outcome, TemplateTimeout)
    assert "longer than 0.1s" in str(outcome)


async def test_the_output_limit_is_configurable_and_counts_the_whole_config() -> None:
    small = RenderLimits(timeout=1, max_output=4096)
    with pytest.raises(TemplateProblem, match="larger than 4096 bytes"):
        await render_limited(
            {"a": "{{ inputs.s[:3000] }}", "b": "{{ inputs.s[:3000] }}"}, CONTEXT, small
        )
    assert await render_limited({"a": "{{ inputs.s[:3000] }}"}, CONTEXT, small) == {"a": "x" * 3000}


async def test_ordinary_templates_render_as_before() -> None:
    config = {
        "native": "{{ inputs.n }}",
        "text": "n={{ inputs.n * 2 }} {{ 'a' ~ 'b' }} {{ [1, 2] + [3] }} {{ 2 ** 10 }}",
        "loop": "{% for i in range(inputs.n) %}{{ i }}{% endfor %}",
        "plain": "no template",
        "nested": [{"x": "{{ '%05d' % inputs.n }}"}],
    }
    assert await render_limited(config, CONTEXT, LIMITS) == {
        "native": 3,
        "text": "n=6 ab [1, 2, 3] 1024",
        "loop": "012",
        "plain": "no template",
        "nested": [{"x": "00003"}],
    }


async def test_renders_in_a_row_after_a_timeout_are_not_interrupted() -> None:
    """The interrupt meant for a timed-out rendering never reaches the next one."""
    slow = "{% for a in inputs.s %}{% for b in inputs.s %}{% endfor %}{% endfor %}"
    for _ in range(3):
        with pytest.raises(TemplateTimeout):
            await render_limited({"v": slow}, CONTEXT, RenderLimits(timeout=0.05))
        for _ in range(20):
            assert await render_limited({"v": "{{ inputs.n }}"}, CONTEXT, LIMITS) == {"v": 3}


def _problem(template: str) -> str:
    return next(references({"v": template}, "config"))[1]


@pytest.mark.parametrize(
    "template",
    [
        "{{ secrets.tok | upper }}",
        "{{ secrets.tok | length }}",
        "{{ secrets.tok ~ 'x' }}",
        "{{ secrets.tok[:3] }}",
        "{% if secrets.tok == 'guess' %}yes{% endif %}",
        "{{ secrets }}",
        "{% for c in secrets.tok %}{{ c }}{% endfor %}",
        "{{ 'x' if secrets.tok else 'y' }}",
    ],
)
def test_secrets_used_in_expressions_are_refused(template: str) -> None:
    assert "a secret is inserted as it is" in _problem(template)


@pytest.mark.parametrize(
    "template",
    [
        "{{ secrets.tok }}",
        "Bearer {{ secrets.tok }}",
        "{{ secrets['tok'] }}:{{ secrets.other }}",
        "{% if inputs.n %}{{ secrets.tok }}{% endif %}",
    ],
)
def test_secrets_inserted_as_they_are_are_accepted(template: str) -> None:
    assert _problem(template) == ""


async def test_renderings_that_waited_past_their_budget_never_start() -> None:
    """With every worker busy, a rendering whose time runs out in the queue is dropped,
    not started later without a budget."""
    slow = "{% for a in inputs.s %}{% for b in inputs.s %}{% endfor %}{% endfor %}"
    busy = [
        asyncio.create_task(render_limited({"v": slow}, CONTEXT, RenderLimits(timeout=0.5)))
        for _ in range(4)
    ]
    await asyncio.sleep(0.05)
    started: list[bool] = []

    def tick() -> str:
        started.append(True)
        return ""

    queued = {"v": "{{ tick() }}" + slow}
    with pytest.raises(TemplateTimeout):
        await render_limited(queued, {**CONTEXT, "tick": tick}, RenderLimits(timeout=0.05))
    for task in busy:
        with pytest.raises(TemplateTimeout):
            await task
    assert await render_limited({"v": "{{ inputs.n }}"}, CONTEXT, LIMITS) == {"v": 3}
    await asyncio.sleep(0.1)
    assert started == []  # the queued one never ran
