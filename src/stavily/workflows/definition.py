"""The Stavily workflow YAML: parsing, validation with every problem located, and planning."""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stavily.errors import InvalidInput

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_PLUGIN_REF = re.compile(
    r"^(?P<id>[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)"
    r"(?:-v(?P<version>\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?))?$"
)
_SEMVER = re.compile(r"^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")
DEFAULT_TIMEOUT_SECONDS = 300
MAX_TIMEOUT_SECONDS = 7 * 86400


def parse_duration(value: str | int | float) -> float:
    """`30s`, `2m`, `1h`, `1.5d`, `250ms` or plain seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration is a string such as '30s', '2m' or '1h'")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(value)
        if not match:
            raise ValueError(f"'{value}' is not a duration such as '30s', '2m' or '1h'")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class Pool(_Strict):
    pool_name: str | None = None
    agent_regex: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    auto_install_plugins: bool = False
    on_plugin_missing: Literal["skip_agent", "fail", "install"] | None = None

    @field_validator("agent_regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from None
        return value


class AgentSelection(_Strict):
    pools: list[Pool] = Field(default_factory=list)
    single_agent: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)


class ErrorHandling(_Strict):
    on_failure: Literal["fail", "stop", "continue"] = "fail"
    max_retries: int = Field(default=0, ge=0, le=100)
    retry_delay: str | int | None = None

    @field_validator("retry_delay")
    @classmethod
    def _duration(cls, value: str | int | None) -> str | int | None:
        if value is not None:
            parse_duration(value)
        return value


class PluginRef(_Strict):
    id: str = Field(pattern=r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$", max_length=200)
    version: str | None = Field(default=None, pattern=_SEMVER.pattern)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            match = _PLUGIN_REF.match(value.strip())
            if not match:
                raise ValueError(
                    f"'{value}' is not a plugin reference such as 'service-restart-v1.2.0'"
                )
            return {"id": match.group("id"), "version": match.group("version")}
        return value

    def __str__(self) -> str:
        return f"{self.id}-v{self.version}" if self.version else self.id


class Step(_Strict):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str | None = None
    plugin: PluginRef
    agents: AgentSelection | None = None
    depends_on: list[str] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict)
    timeout: str | int | None = None
    error_handling: ErrorHandling = Field(default_factory=ErrorHandling)

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, value: str | int | None) -> str | int | None:
        if value is not None:
            seconds = parse_duration(value)
            if not 1 <= seconds <= MAX_TIMEOUT_SECONDS:
                raise ValueError("a step timeout is between 1s and 7d")
        return value

    @property
    def timeout_seconds(self) -> int:
        if self.timeout is None:
            return DEFAULT_TIMEOUT_SECONDS
        return max(1, round(parse_duration(self.timeout)))


class Stage(_Strict):
    agents: AgentSelection | None = None
    steps: list[Step] = Field(default_factory=list)


class WorkflowDefinition(_Strict):
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.()-]*$")
    description: str | None = None
    version: str | None = None
    agents: AgentSelection | None = None
    triggers: Stage | None = None
    actions: Stage
    outputs: Stage | None = None
    monitoring: dict[str, Any] | None = None
    variables: dict[str, Any] | None = None
    tags: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        # `version: 1.2` in YAML is a float; the user meant the text.
        return (
            str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value
        )


STAGES = ("triggers", "actions", "outputs")


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(root)"


def parse_source(source: str | bytes, content_type: str | None = None) -> Any:
    """YAML or JSON text -> data. JSON is YAML, but JSON errors read better as JSON."""
    text = source.decode("utf-8", errors="strict") if isinstance(source, bytes) else source
    try:
        if content_type and "json" in content_type:
            return json.loads(text)
        return yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise InvalidInput(
            "the workflow is not valid YAML or JSON",
            [{"path": "(root)", "message": str(exc).replace("\n", " ")}],
        ) from None


def validate(data: Any) -> WorkflowDefinition:
    """Every problem in one InvalidInput, each with its path."""
    if not isinstance(data, dict):
        raise InvalidInput(
            "invalid workflow definition",
            [{"path": "(root)", "message": "a workflow is a mapping with name and actions"}],
        )
    try:
        definition = WorkflowDefinition.model_validate(data)
    except ValidationError as exc:
        problems = [
            {"path": _path(err["loc"]), "message": err["msg"].removeprefix("Value error, ")}
            for err in exc.errors(include_url=False)
        ]
        raise InvalidInput("invalid workflow definition", problems) from None
    problems = _graph_problems(definition)
    if problems:
        raise InvalidInput("invalid workflow definition", problems)
    return definition


def _graph_problems(definition: WorkflowDefinition) -> list[dict[str, str]]:
    problems: list[dict[str, str]] = []
    seen: dict[str, str] = {}
    for stage_name in STAGES:
        stage = getattr(definition, stage_name)
        for i, step in enumerate(stage.steps if stage else []):
            where = f"{stage_name}.steps[{i}].name"
            if step.name in seen:
                problems.append(
                    {
                        "path": where,
                        "message": f"duplicate step '{step.name}' (first at {seen[step.name]})",
                    }
                )
            else:
                seen[step.name] = where
    if not definition.actions.steps:
        problems.append(
            {"path": "actions.steps", "message": "a workflow needs at least one action"}
        )
    # What each stage's steps may depend on: their own stage; outputs may also name actions.
    allowed = {
        "triggers": {s.name for s in (definition.triggers.steps if definition.triggers else [])},
        "actions": {s.name for s in definition.actions.steps},
    }
    allowed["outputs"] = allowed["actions"] | {
        s.name for s in (definition.outputs.steps if definition.outputs else [])
    }
    for stage_name in STAGES:
        stage = getattr(definition, stage_name)
        steps = stage.steps if stage else []
        for i, step in enumerate(steps):
            for j, dep in enumerate(step.depends_on):
                where = f"{stage_name}.steps[{i}].depends_on[{j}]"
                if dep == step.name:
                    problems.append({"path": where, "message": "a step cannot depend on itself"})
                elif dep not in allowed[stage_name]:
                    problems.append({"path": where, "message": f"unknown step '{dep}'"})
        cycle = _find_cycle({s.name: list(s.depends_on) for s in steps})
        if cycle:
            problems.append(
                {
                    "path": f"{stage_name}.steps",
                    "message": "dependency cycle: " + " -> ".join(cycle),
                }
            )
    return problems


def _find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in graph.get(node, []):
            if dep not in graph or dep == node:
                continue
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _selector(*levels: AgentSelection | None) -> dict[str, Any]:
    """The most specific selection wins: step over stage over workflow."""
    for level in levels:
        if level is not None and (level.single_agent or level.pools or level.labels):
            return {
                "single_agent": level.single_agent,
                "pools": [
                    {"pool_name": p.pool_name, "agent_regex": p.agent_regex, "labels": p.labels}
                    for p in level.pools
                ],
                "labels": level.labels,
            }
    return {"single_agent": None, "pools": [], "labels": {}}


def plan(definition: WorkflowDefinition) -> list[dict[str, Any]]:
    """The steps one execution runs, resolved: actions, then outputs after every action."""
    steps: list[dict[str, Any]] = []
    action_names = [s.name for s in definition.actions.steps]
    for stage_name in ("actions", "outputs"):
        stage: Stage | None = getattr(definition, stage_name)
        for step in stage.steps if stage else []:
            depends_on = list(step.depends_on)
            if stage_name == "outputs":
                depends_on = list(dict.fromkeys(action_names + depends_on))
            steps.append(
                {
                    "stage": stage_name,
                    "name": step.name,
                    "position": len(steps),
                    "depends_on": depends_on,
                    "spec": {
                        "plugin_id": step.plugin.id,
                        "plugin_version": step.plugin.version,
                        "config": step.config,
                        "agent_type": "action",
                        "selector": _selector(step.agents, stage.agents, definition.agents),
                        "timeout_seconds": step.timeout_seconds,
                        "max_retries": step.error_handling.max_retries,
                        "on_failure": step.error_handling.on_failure,
                    },
                }
            )
    return steps
