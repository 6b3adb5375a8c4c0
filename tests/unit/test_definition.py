"""Workflow definitions: the Stavily YAML shape, every problem located, and planning."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from stavily.errors import InvalidInput
from stavily.workflows.definition import (
    WorkflowDefinition,
    parse_duration,
    parse_source,
    plan,
    stored,
    validate,
)

STAVILY_FILE = """
name: "High CPU Remediation"
description: "Multi-step remediation for high CPU usage"
version: "1.2.0"

agents:
  pools:
    - pool_name: "production-servers"
      agent_regex: "prod-.*"
      auto_install_plugins: true
      on_plugin_missing: "skip_agent"
  single_agent: "specific-agent-01"

triggers:
  agents: {single_agent: "trigger-agent-01"}
  steps:
    - name: "cpu-threshold"
      plugin: "prometheus-trigger-v1.0.0"
      config: {metric: "cpu_usage_percent", condition: "> 90", duration: "2m"}

actions:
  agents: {pools: [{pool_name: "actions-pool", agent_regex: "actions-.*"}]}
  steps:
    - name: "analyze-processes"
      plugin: "python-script-action-v2.1.0"
      agents: {pools: [{pool_name: "analysis-pool", agent_regex: "analysis-.*"}]}
      depends_on: []
      config: {script: "analyze_cpu_processes.py"}
      timeout: "30s"
      error_handling: {on_failure: "continue", max_retries: 3, retry_delay: "30s"}
    - name: "kill-high-cpu-processes"
      plugin: "system-command-action-v1.0.0"
      depends_on: ["analyze-processes"]
      config: {command: "pkill -f runaway"}

outputs:
  steps:
    - name: "notify"
      plugin: "slack-output-v1.0.0"
      config: {channel: "#ops"}

monitoring:
  alerts: {on_failure: true}
"""


def problems(source: str) -> list[dict[str, str]]:
    with pytest.raises(InvalidInput) as caught:
        validate(parse_source(source))
    return caught.value.details  # type: ignore[no-any-return]


def test_the_documented_stavily_file_loads_unchanged() -> None:
    definition = validate(parse_source(STAVILY_FILE))
    assert definition.version == "1.2.0"
    step = definition.actions.steps[0]
    assert (step.plugin.id, step.plugin.version) == ("python-script-action", "2.1.0")
    assert step.timeout_seconds == 30
    assert step.error_handling.on_failure == "continue"
    assert definition.triggers is not None
    assert definition.triggers.steps[0].plugin.id == "prometheus-trigger"


def test_plan_resolves_selection_hierarchy_and_output_order() -> None:
    steps = {s["name"]: s for s in plan(validate(parse_source(STAVILY_FILE)))}
    assert list(steps) == ["analyze-processes", "kill-high-cpu-processes", "notify"]
    # the step's own pools win over the stage's, which win over the workflow's
    assert (
        steps["analyze-processes"]["spec"]["selector"]["pools"][0]["agent_regex"] == "analysis-.*"
    )
    assert (
        steps["kill-high-cpu-processes"]["spec"]["selector"]["pools"][0]["agent_regex"]
        == "actions-.*"
    )
    # outputs have no stage selection, so the workflow's applies, single agent included
    assert steps["notify"]["spec"]["selector"]["single_agent"] == "specific-agent-01"
    # outputs run after every action
    assert steps["notify"]["depends_on"] == ["analyze-processes", "kill-high-cpu-processes"]
    assert steps["notify"]["stage"] == "outputs"


def test_every_problem_is_listed_with_its_path() -> None:
    found = problems(
        """
name: broken
colour: blue
actions:
  steps:
    - name: a
      plugin: "Not A Plugin"
      timeout: soon
    - name: b
      depends_on: [deploy]
    - name: a
      plugin: echo
      config: [not, a, mapping]
"""
    )
    paths = {p["path"]: p["message"] for p in found}
    assert "colour" in paths
    assert "plugin reference" in paths["actions.steps[0].plugin"]
    assert "duration" in paths["actions.steps[0].timeout"]
    assert "actions.steps[1].plugin" in paths  # missing
    assert "actions.steps[2].config" in paths


def test_graph_problems_are_located() -> None:
    found = problems(
        """
name: graph
actions:
  steps:
    - {name: a, plugin: echo, depends_on: [c]}
    - {name: b, plugin: echo, depends_on: [a, deploy]}
    - {name: c, plugin: echo, depends_on: [b]}
    - {name: c, plugin: echo}
    - {name: d, plugin: echo, depends_on: [d]}
"""
    )
    messages = {p["path"]: p["message"] for p in found}
    assert messages["actions.steps[1].depends_on[1]"] == "unknown step 'deploy'"
    assert "duplicate step 'c'" in messages["actions.steps[3].name"]
    assert messages["actions.steps[4].depends_on[0]"] == "a step cannot depend on itself"


def test_cycle_is_refused() -> None:
    found = problems(
        """
name: cycle
actions:
  steps:
    - {name: a, plugin: echo, depends_on: [c]}
    - {name: b, plugin: echo, depends_on: [a]}
    - {name: c, plugin: echo, depends_on: [b]}
"""
    )
    assert found == [{"path": "actions.steps", "message": "dependency cycle: a -> c -> b -> a"}]


@pytest.mark.parametrize(
    "source, path",
    [
        ("[1, 2]", "(root)"),
        ("name: x\nactions: {steps: []}", "actions.steps"),
        ("name: x", "actions"),
        (
            "name: x\nactions: {steps: [{name: a, plugin: echo}]}\noutputs: {steps: [{name: o, plugin: echo, depends_on: [nope]}]}",
            "outputs.steps[0].depends_on[0]",
        ),
        ("name: [x\n", "(root)"),
    ],
)
def test_malformed_documents(source: str, path: str) -> None:
    assert path in {p["path"] for p in problems(source)}


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("30s", 30),
        ("2m", 120),
        ("1h", 3600),
        ("1.5d", 129600),
        ("250ms", 0.25),
        (45, 45),
        ("10", 10),
    ],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-1s", "1w", "s30", True])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_plugin_reference_forms() -> None:
    definition = validate(
        parse_source(
            """
name: refs
actions:
  steps:
    - {name: a, plugin: service-restart-v1.2.0}
    - {name: b, plugin: service-restart}
    - {name: c, plugin: {id: service-restart, version: 2.0.0-rc.1}}
    - {name: d, plugin: my-v2-tool-v3.0.1}
"""
        )
    )
    refs = [(s.plugin.id, s.plugin.version) for s in definition.actions.steps]
    assert refs == [
        ("service-restart", "1.2.0"),
        ("service-restart", None),
        ("service-restart", "2.0.0-rc.1"),
        ("my-v2-tool", "3.0.1"),
    ]


names = st.sampled_from([f"s{i}" for i in range(8)])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(names, st.lists(names, max_size=3)), min_size=1, max_size=8))
def test_random_graphs_are_accepted_exactly_when_they_are_dags(
    steps: list[tuple[str, list[str]]],
) -> None:
    """Property: validation never crashes, and refuses exactly what cannot run."""
    data = {
        "name": "random",
        "actions": {
            "steps": [{"name": n, "plugin": "echo", "depends_on": deps} for n, deps in steps]
        },
    }
    names_seen = [n for n, _ in steps]
    graph = dict(steps)
    unique = len(set(names_seen)) == len(names_seen)
    known = all(d in graph and d != n for n, deps in steps for d in deps)

    def acyclic() -> bool:
        remaining = {n: set(deps) for n, deps in graph.items()}
        while remaining:
            free = [n for n, deps in remaining.items() if not deps & remaining.keys()]
            if not free:
                return False
            for n in free:
                del remaining[n]
        return True

    try:
        definition = validate(data)
    except InvalidInput as exc:
        assert exc.details, "a refusal lists its problems"
        assert not (unique and known and acyclic())
        return
    assert unique and known and acyclic()
    order = [s["name"] for s in plan(definition)]
    assert sorted(order) == sorted(names_seen)


# -- hardening: size, linear checks, strict types, secrets -------------------------------------


def _chain(count: int, cycle: bool = False, config: str = "") -> dict:
    steps = []
    for i in range(count):
        step: dict = {"name": f"s{i}", "plugin": "echo"}
        if i or cycle:
            step["depends_on"] = [f"s{(i - 1) % count}"]
        if config and i:
            step["config"] = {"x": config}
        steps.append(step)
    return {"name": "chain", "actions": {"steps": steps}}


def test_a_workflow_has_at_most_max_steps() -> None:
    validate(_chain(2000))
    with pytest.raises(InvalidInput) as refused:
        validate(_chain(2001))
    assert refused.value.details == [
        {"path": "(root)", "message": "2001 steps: a workflow has at most 2000"}
    ]
    validate(_chain(2001), max_steps=2001)


def test_a_long_cycle_is_found_without_recursion() -> None:
    with pytest.raises(InvalidInput) as refused:
        validate(_chain(5000, cycle=True), max_steps=5000)
    (problem,) = [p for p in refused.value.details if "cycle" in p["message"]]
    assert problem["path"] == "actions.steps"
    assert problem["message"].count(" -> ") == 5000


def test_reading_an_early_step_from_a_long_chain_is_checked_quickly() -> None:
    """Every step reads the first: upstream checks over a 6,000-step chain (each was a
    walk of its ancestors before: quadratic)."""
    definition = validate(_chain(6000, config="{{ steps.s0.result }}"), max_steps=6000)
    planned = plan(definition)
    assert planned[0]["dependents"] == ["s1"] and planned[-1]["dependents"] == []
    bad = _chain(3, config="{{ steps.s2.result }}")
    with pytest.raises(InvalidInput) as refused:
        validate(bad)
    assert {p["message"] for p in refused.value.details} == {
        "'steps.s2' is not upstream of this step"
    }


def test_outputs_read_every_action_upstream() -> None:
    definition = validate(
        {
            "name": "w",
            "actions": {"steps": [{"name": "a", "plugin": "p"}, {"name": "b", "plugin": "p"}]},
            "outputs": {
                "steps": [
                    {"name": "o", "plugin": "p", "config": {"x": "{{ steps.a.result }}"}},
                    {
                        "name": "p",
                        "plugin": "p",
                        "depends_on": ["o"],
                        "config": {"y": "{{ steps.o.result }}"},
                    },
                ]
            },
        }
    )
    assert [s["depends_on"] for s in plan(definition)] == [[], [], ["a", "b"], ["a", "b", "o"]]


@pytest.mark.parametrize(
    ("step", "path"),
    [
        ({"error_handling": {"max_retries": "3"}}, "actions.steps[0].error_handling.max_retries"),
        ({"error_handling": {"max_retries": True}}, "actions.steps[0].error_handling.max_retries"),
        ({"error_handling": {"jitter": "yes"}}, "actions.steps[0].error_handling.jitter"),
        ({"parallel": "2", "for_each": [1]}, "actions.steps[0].parallel"),
    ],
)
def test_types_are_not_coerced(step: dict, path: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        validate({"name": "w", "actions": {"steps": [{"name": "a", "plugin": "p", **step}]}})
    assert path in {p["path"] for p in refused.value.details}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("config", "{{ secrets.tok | upper }}", "a secret is inserted as it is"),
        ("when", "secrets.tok == 'x'", "secrets cannot be used in when"),
        ("for_each", "{{ secrets.tok }}", "secrets cannot be used in for_each"),
    ],
)
def test_secrets_only_as_they_are(field: str, value: str, message: str) -> None:
    step = {"name": "a", "plugin": "p", field: {"x": value} if field == "config" else value}
    with pytest.raises(InvalidInput) as refused:
        validate(
            {
                "name": "w",
                "secrets": {"tok": {"env": "STAVILY_SECRET_T"}},
                "actions": {"steps": [step]},
            }
        )
    assert any(message in p["message"] for p in refused.value.details), refused.value.details


def test_denied_environment_variables_are_refused_at_apply() -> None:
    step = {
        "name": "a",
        "plugin": "p",
        "config": {"environment": {"LD_PRELOAD": "/tmp/x.so", "APP_MODE": "fast", "PATH": "/x"}},
    }
    with pytest.raises(InvalidInput) as refused:
        validate({"name": "w", "actions": {"steps": [step]}})
    assert [p["path"] for p in refused.value.details] == [
        "actions.steps[0].config.environment.LD_PRELOAD",
        "actions.steps[0].config.environment.PATH",
    ]


def test_a_stored_version_is_not_judged_again_by_a_stricter_rule_check() -> None:
    """A rule an earlier check let through (JSON's equality: `true` is not 1) keeps its
    version readable: its organization's watches and events must not fail for it."""
    source = {
        "name": "old",
        "on": [{"source": "api", "where": [{"field": "x", "eq": 1}, {"field": "x", "eq": True}]}],
        "actions": {"steps": [{"name": "a", "plugin": "echo"}]},
    }
    with pytest.raises(ValidationError, match="can never match"):
        WorkflowDefinition.model_validate(source)
    assert stored(source).on_ is not None
