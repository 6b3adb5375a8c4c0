"""The Stavily workflow YAML: parsing, validation with every problem located, and planning."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import re2  # type: ignore[import-untyped]
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from stavily.errors import InvalidInput
from stavily.plugins.versions import VersionRange
from stavily.security.environment import refusal
from stavily.security.secrets import STORE_NAME, SecretPolicy, reference_problems
from stavily.workflows import messages
from stavily.workflows.rules import Rule

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_PLUGIN_REF = re.compile(
    r"^(?P<id>[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)"
    r"(?:-v(?P<version>\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?))?$"
)
DEFAULT_TIMEOUT_SECONDS = 300
MAX_PARALLEL = 1000
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


def _duration_value(value: Any) -> Any:
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError("a duration is a string such as '30s', '2m' or '1h', or seconds")
        parse_duration(value)
    return value


# One check, one message: `timeout: yes` is refused, not read as one second.
Duration = Annotated[str | int | float, BeforeValidator(_duration_value)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, strict=True)


class LabelExpression(_Strict):
    """A label rule beyond equality: `{exists: true}`, `{in: [a, b]}`, `{not_in: [c]}`."""

    # `in` is a Python keyword: written `in`, held as `in_` (stored definitions have both)
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    exists: bool | None = None
    in_: list[str] | None = Field(default=None, alias="in")
    not_in: list[str] | None = None


# `env: prod` (equals), `zone: [a, b]` (one of), or an expression.
LabelRule = str | list[str] | LabelExpression
STRATEGIES = ("least_loaded", "round_robin", "sticky")


def _label_rules(labels: dict[str, LabelRule]) -> dict[str, Any]:
    return {
        key: rule.model_dump(by_alias=True, exclude_none=True)
        if isinstance(rule, LabelExpression)
        else rule
        for key, rule in labels.items()
    }


class Pool(_Strict):
    pool_name: str | None = None
    agent_regex: str | None = None
    labels: dict[str, LabelRule] = Field(default_factory=dict)
    auto_install_plugins: bool = False
    on_plugin_missing: Literal["skip_agent", "fail", "install"] | None = None

    @field_validator("agent_regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re2.compile(value)  # the engine matches with RE2: linear time, no backtracking
            except re2.error as exc:
                raise ValueError(f"invalid regular expression (RE2 syntax): {exc}") from None
        return value


class AgentSelection(_Strict):
    pools: list[Pool] = Field(default_factory=list)
    single_agent: str | None = None
    labels: dict[str, LabelRule] = Field(default_factory=dict)
    # ours: which eligible agent a step goes to first
    strategy: Literal["least_loaded", "round_robin", "sticky"] | None = None


RETRYABLE = ("error", "timeout", "agent_lost")


class ErrorHandling(_Strict):
    on_failure: Literal["fail", "stop", "continue"] = "fail"
    max_retries: int = Field(default=0, ge=0, le=100)
    retry_delay: Duration | None = None
    # ours: how the delay grows, its ceiling, jitter, and which failures retry at all
    backoff: Literal["fixed", "exponential"] = "fixed"
    max_delay: Duration | None = None
    jitter: bool = False
    retry_on: list[Literal["error", "timeout", "agent_lost"]] = Field(
        default_factory=lambda: list(RETRYABLE)
    )

    @field_validator("retry_delay", "max_delay")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        if value is not None:
            parse_duration(value)
        return value

    def policy(self) -> dict[str, Any]:
        return {
            "max_retries": self.max_retries,
            "delay": parse_duration(self.retry_delay) if self.retry_delay is not None else 0.0,
            "backoff": self.backoff,
            "max_delay": parse_duration(self.max_delay) if self.max_delay is not None else None,
            "jitter": self.jitter,
            "retry_on": list(self.retry_on),
        }


class PluginRef(_Strict):
    id: str = Field(pattern=r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$", max_length=200)
    version: VersionRange = None

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
    # ours: the plugin's version or range, beside `plugin: id`
    version: VersionRange = None
    agents: AgentSelection | None = None
    depends_on: list[str] = Field(default_factory=list)
    config: dict[str, Any] = Field(default_factory=dict)
    timeout: Duration | None = None
    error_handling: ErrorHandling = Field(default_factory=ErrorHandling)
    # ours, all optional
    when: str | None = Field(default=None, description="Run only when this expression holds.")
    for_each: str | list[Any] | None = Field(
        default=None, description="Fan out: one run of the step per item (`item`)."
    )
    parallel: bool | int | None = Field(
        default=None, description="for_each: how many items at once (true: all, false: 1)."
    )
    run_on: Literal["success", "failure", "always"] | None = Field(
        default=None, description="outputs only: after the actions succeed, fail, or either."
    )

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, value: Any) -> Any:
        if value is not None:
            seconds = parse_duration(value)
            if not 1 <= seconds <= MAX_TIMEOUT_SECONDS:
                raise ValueError("a step timeout is between 1s and 7d")
        return value

    @field_validator("parallel")
    @classmethod
    def _parallel(cls, value: bool | int | None) -> bool | int | None:
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise ValueError("parallel is true, false or a number of items from 1")
        return value

    @property
    def parallelism(self) -> int:
        if self.parallel is None or self.parallel is True:
            return MAX_PARALLEL
        if self.parallel is False:
            return 1
        return min(int(self.parallel), MAX_PARALLEL)

    @model_validator(mode="after")
    def _one_version(self) -> Step:
        if self.version is not None and self.plugin.version not in (None, self.version):
            raise ValueError(
                f"the plugin says version {self.plugin.version} and `version` says "
                f"{self.version}: write one of them"
            )
        return self

    @property
    def plugin_range(self) -> str | None:
        """The version or range the step asks for (None: the latest)."""
        return self.version or self.plugin.version

    @property
    def timeout_seconds(self) -> int:
        if self.timeout is None:
            return DEFAULT_TIMEOUT_SECONDS
        return max(1, round(parse_duration(self.timeout)))


class Stage(_Strict):
    agents: AgentSelection | None = None
    steps: list[Step] = Field(default_factory=list)


INPUT_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
}


class InputSpec(_Strict):
    type: Literal["string", "integer", "number", "boolean", "array", "object"] = "string"
    required: bool = False
    default: Any = None
    description: str | None = None
    enum: list[Any] | None = None

    def problem(self, value: Any) -> str | None:
        expected = INPUT_TYPES[self.type]
        if isinstance(value, bool) and bool not in expected:
            return f"expected {self.type}, got boolean"
        if not isinstance(value, expected):
            return f"expected {self.type}, got {type(value).__name__}"
        if self.enum is not None and value not in self.enum:
            return f"expected one of {self.enum}"
        return None


class SecretRef(_Strict):
    """A named secret and where it comes from; the value never enters the database."""

    env: str | None = Field(default=None, description="An environment variable.")
    store: str | None = Field(
        default=None,
        pattern=STORE_NAME,
        description="A secret of the organization's secret store (stavily secret set).",
    )
    vault: str | None = Field(default=None, description="A vault path (not served yet).")
    description: str | None = None


class Concurrency(_Strict):
    limit: int = Field(ge=1, le=100_000)
    policy: Literal["queue", "reject"] = "queue"


class Schedule(_Strict):
    """`{cron: "0 9 * * 1-5", timezone: Europe/Paris}` or `{every: 15m}`: when the workflow
    starts by itself (workflows.schedules), with these inputs."""

    name: str | None = Field(default=None, min_length=1, max_length=200)
    cron: str | None = Field(
        default=None, max_length=200, description="Five cron fields, or @hourly, @daily..."
    )
    timezone: str = Field(
        default="UTC", max_length=100, description="The IANA zone the cron is read in."
    )
    every: Duration | None = Field(default=None, description="An interval, from 1s.")
    inputs: dict[str, Any] = Field(default_factory=dict)
    misfire: Literal["skip", "once", "all"] = Field(
        default="once", description="After downtime: skip the missed times, run once, or all."
    )

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        from stavily.workflows.schedules import cron_problem

        if value is not None:
            problem = cron_problem(value)
            if problem:
                raise ValueError(problem)
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        from stavily.workflows.schedules import zone

        zone(value)  # ValueError names it
        return value

    @field_validator("every")
    @classmethod
    def _every(cls, value: Any) -> Any:
        from stavily.workflows.schedules import every_problem

        if value is not None:
            problem = every_problem(parse_duration(value))
            if problem:
                raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _one_timing(self) -> Schedule:
        if (self.cron is None) == (self.every is None):
            raise ValueError("a schedule has exactly one of `cron` and `every`")
        if self.every is not None and self.timezone != "UTC":
            raise ValueError("`timezone` goes with `cron`: an interval is the same everywhere")
        return self


class WorkflowDefinition(_Strict):
    # `on` is a keyword in Python: written `on`, held as `on_` (stored definitions have it)
    model_config = ConfigDict(
        extra="forbid", str_strip_whitespace=True, strict=True, populate_by_name=True
    )

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.()-]*$")
    description: str | None = None
    version: str | None = None
    agents: AgentSelection | None = None
    triggers: Stage | None = None
    actions: Stage
    outputs: Stage | None = None
    monitoring: dict[str, Any] | None = None
    variables: dict[str, Any] | None = None
    secrets: dict[str, SecretRef] | None = None
    tags: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)
    # ours, all optional
    inputs: dict[str, InputSpec] | None = None
    timeout: Duration | None = Field(default=None, description="Whole-execution timeout.")
    concurrency: Concurrency | None = None
    on_: list[Rule] | None = Field(
        default=None,
        alias="on",
        max_length=100,
        description="Events that start the workflow beyond its trigger steps.",
    )
    schedules: list[Schedule] | None = Field(
        default=None, max_length=100, description="Cron and interval schedules that start it."
    )

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, value: Any) -> Any:
        if value is not None and parse_duration(value) < 1:
            raise ValueError("an execution timeout is at least 1s")
        return value

    def resolve_inputs(self, given: dict[str, Any]) -> dict[str, Any]:
        """Declared inputs: defaults applied, each checked; undeclared ones refused."""
        if self.inputs is None:
            return dict(given)
        problems = [
            {"path": f"inputs.{name}", "message": "not an input of this workflow"}
            for name in given
            if name not in self.inputs
        ]
        resolved: dict[str, Any] = {}
        for name, spec in self.inputs.items():
            if name in given:
                problem = spec.problem(given[name])
                if problem:
                    problems.append({"path": f"inputs.{name}", "message": problem})
                resolved[name] = given[name]
            elif spec.default is not None:
                resolved[name] = spec.default
            elif spec.required:
                problems.append({"path": f"inputs.{name}", "message": "required"})
            else:
                resolved[name] = None
        if problems:
            raise InvalidInput("invalid inputs for this workflow", problems)
        return resolved

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        # `version: 1.2` in YAML is a float; the user meant the text.
        return (
            str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value
        )


STAGES = ("triggers", "actions", "outputs")
# every part of a workflow, for suggesting a key where its place cannot be told
_MODELS: tuple[type[BaseModel], ...] = (
    WorkflowDefinition,
    Stage,
    Step,
    PluginRef,
    AgentSelection,
    Pool,
    LabelExpression,
    ErrorHandling,
    InputSpec,
    SecretRef,
    Concurrency,
    Schedule,
)


def _path(loc: tuple[int | str, ...], data: Any = None, missing: bool = False) -> str:
    """`actions.steps[2].timeout`: the location in the document. Parts that are not in the
    document (pydantic's names for the members of a union) are left out."""
    out = ""
    node = data
    for n, part in enumerate(loc):
        last = n == len(loc) - 1
        if isinstance(part, int) and isinstance(node, list) and 0 <= part < len(node):
            out += f"[{part}]"
            node = node[part]
        elif isinstance(part, str) and isinstance(node, dict) and part in node:
            out += f".{part}" if out else part
            node = node[part]
        elif data is None or (missing and last):
            out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
            node = None
    return out or "(root)"


MAX_NODES = 100_000
MAX_DEPTH = 64
DEFAULT_MAX_STEPS = 2000
# libyaml's safe loader when PyYAML was built with it: about ten times faster.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# The context a stored version is validated in (definition.stored): what was judged when it
# was applied (whether its rules can match) is not judged again, so a check made stricter
# later never makes a version already applied unreadable.
STORED = {"stored": True}


def stored(definition: dict[str, Any]) -> WorkflowDefinition:
    """A stored version's definition, validated again as it was applied."""
    return WorkflowDefinition.model_validate(definition, context=STORED)


def parse_source(source: str | bytes, content_type: str | None = None) -> Any:
    """YAML or JSON text -> data. JSON is YAML, but JSON errors read better as JSON."""
    if isinstance(source, bytes):
        try:
            source = source.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput(
                "the workflow is not UTF-8 text", [{"path": "(root)", "message": str(exc)}]
            ) from None
    if "\x00" in source:
        raise InvalidInput(
            "invalid workflow text", [{"path": "(root)", "message": "it holds a NUL character"}]
        )
    try:
        if content_type and "json" in content_type:
            data = json.loads(source, parse_constant=_no_constant)
        else:
            data = yaml.load(source, Loader=_YAML_LOADER)  # noqa: S506 (a safe loader)
            if isinstance(data, dict) and True in data and "on" not in data:
                data["on"] = data.pop(True)  # YAML 1.1 reads a bare `on:` key as true
    except (json.JSONDecodeError, yaml.YAMLError, ValueError, RecursionError) as exc:
        message = (
            "nested too deeply"
            if isinstance(exc, RecursionError)
            else messages.located(source, exc) or str(exc).replace("\n", " ")
        )
        raise InvalidInput(
            "the workflow is not valid YAML or JSON", [{"path": "(root)", "message": message}]
        ) from None
    _check_size(data)
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _check_size(data: Any) -> None:
    """Refuse what would explode when stored: YAML aliases expanding without bound, very
    deep nesting, and numbers JSON cannot carry (NaN, infinities)."""
    budget = MAX_NODES
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        node, depth = stack.pop()
        budget -= 1
        if budget < 0 or depth > MAX_DEPTH:
            what = f"more than {MAX_NODES} values" if budget < 0 else "nested too deeply"
            raise InvalidInput("the workflow is too large", [{"path": "(root)", "message": what}])
        if isinstance(node, float) and not math.isfinite(node):
            raise InvalidInput(
                "invalid workflow",
                [{"path": "(root)", "message": f"{node} is not a number JSON can hold"}],
            )
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
            stack.extend((k, depth + 1) for k in node if not isinstance(k, str))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def _step_count(data: dict[str, Any]) -> int:
    count = 0
    for stage in STAGES:
        section = data.get(stage)
        steps = section.get("steps") if isinstance(section, dict) else None
        count += len(steps) if isinstance(steps, list) else 0
    return count


def validate(
    data: Any, max_steps: int = DEFAULT_MAX_STEPS, secrets: SecretPolicy | None = None
) -> WorkflowDefinition:
    """Every problem in one InvalidInput, each with its path. Linear in steps plus edges.
    `secrets`: where this server lets secrets come from (None: not checked, offline)."""
    if not isinstance(data, dict):
        raise InvalidInput(
            "invalid workflow definition",
            [{"path": "(root)", "message": "a workflow is a mapping with name and actions"}],
        )
    steps = _step_count(data)
    if steps > max_steps:
        raise InvalidInput(
            "the workflow is too large",
            [{"path": "(root)", "message": f"{steps} steps: a workflow has at most {max_steps}"}],
        )
    try:
        definition = WorkflowDefinition.model_validate(data)
    except ValidationError as exc:
        problems = [
            {
                "path": _path(err["loc"], data, err["type"] == "missing"),
                "message": messages.unknown_key(err["loc"], WorkflowDefinition, _MODELS)
                if err["type"] == "extra_forbidden"
                else err["msg"].removeprefix("Value error, "),
            }
            for err in exc.errors(include_url=False)
        ]
        for problem in _graph_problems(_raw_shapes(data)):
            if problem not in problems:
                problems.append(problem)
        raise InvalidInput("invalid workflow definition", problems) from None
    problems = _graph_problems(_shapes(definition))
    if not definition.actions.steps:
        problems.append(
            {"path": "actions.steps", "message": "a workflow needs at least one action"}
        )
    if not problems and secrets is not None and definition.secrets:
        refs = {n: r.model_dump(exclude_none=True) for n, r in definition.secrets.items()}
        problems = reference_problems(refs, secrets)
    if not problems:
        problems = _environment_problems(definition) + _template_problems(definition)
        problems += _schedule_problems(definition)
    if problems:
        raise InvalidInput("invalid workflow definition", problems)
    return definition


def _schedule_problems(definition: WorkflowDefinition) -> list[dict[str, str]]:
    """Schedule inputs the workflow would refuse at each fire, refused now."""
    problems = []
    for i, entry in enumerate(definition.schedules or []):
        try:
            definition.resolve_inputs(entry.inputs)
        except InvalidInput as refused:
            problems += [
                {"path": f"schedules[{i}].{d['path']}", "message": d["message"]}
                for d in refused.details or []
            ]
    return problems


def _stage_steps(definition: WorkflowDefinition, stage_name: str) -> list[Step]:
    stage: Stage | None = getattr(definition, stage_name)
    return stage.steps if stage else []


@dataclass
class _Shape:
    """What the dependency checks need of a step, from the model or from raw data."""

    index: int
    name: str
    depends_on: list[str]
    run_on: Any = None
    parallel: Any = None
    for_each: Any = None


def _shapes(definition: WorkflowDefinition) -> dict[str, list[_Shape]]:
    return {
        stage: [
            _Shape(i, s.name, list(s.depends_on), s.run_on, s.parallel, s.for_each)
            for i, s in enumerate(_stage_steps(definition, stage))
        ]
        for stage in STAGES
    }


def _raw_shapes(data: dict[str, Any]) -> dict[str, list[_Shape]]:
    """The same from a document that failed validation, taking what can be read."""
    shapes: dict[str, list[_Shape]] = {stage: [] for stage in STAGES}
    for stage in STAGES:
        section = data.get(stage)
        steps = section.get("steps") if isinstance(section, dict) else None
        for i, step in enumerate(steps if isinstance(steps, list) else []):
            if not isinstance(step, dict) or not isinstance(step.get("name"), str):
                continue
            deps = step.get("depends_on")
            shapes[stage].append(
                _Shape(
                    i,
                    step["name"],
                    [d for d in deps if isinstance(d, str)] if isinstance(deps, list) else [],
                    step.get("run_on"),
                    step.get("parallel"),
                    step.get("for_each"),
                )
            )
    return shapes


def _graph_problems(shapes: dict[str, list[_Shape]]) -> list[dict[str, str]]:
    problems: list[dict[str, str]] = []
    seen: dict[str, str] = {}
    for stage_name in STAGES:
        for step in shapes[stage_name]:
            where = f"{stage_name}.steps[{step.index}]"
            if step.name in seen:
                problems.append(
                    {
                        "path": f"{where}.name",
                        "message": f"duplicate step '{step.name}' (first at {seen[step.name]})",
                    }
                )
            else:
                seen[step.name] = f"{where}.name"
            if step.run_on is not None and stage_name != "outputs":
                problems.append({"path": f"{where}.run_on", "message": "only outputs have run_on"})
            if step.parallel is not None and step.for_each is None:
                problems.append(
                    {"path": f"{where}.parallel", "message": "parallel goes with for_each"}
                )
    # What each stage's steps may depend on: their own stage; outputs may also name actions.
    allowed = {stage: {s.name for s in shapes[stage]} for stage in ("triggers", "actions")}
    allowed["outputs"] = allowed["actions"] | {s.name for s in shapes["outputs"]}
    for stage_name in STAGES:
        steps = shapes[stage_name]
        for step in steps:
            for j, dep in enumerate(step.depends_on):
                where = f"{stage_name}.steps[{step.index}].depends_on[{j}]"
                if dep == step.name:
                    problems.append({"path": where, "message": "a step cannot depend on itself"})
                elif dep not in allowed[stage_name]:
                    problems.append({"path": where, "message": f"unknown step '{dep}'"})
        graph = {s.name: list(s.depends_on) for s in steps}
        cycle = _find_cycle(graph)
        if cycle:
            problems.append(
                {
                    "path": f"{stage_name}.steps",
                    "message": "dependency cycle: " + " -> ".join(cycle),
                }
            )
            stuck = _downstream(graph, set(cycle))
            for step in steps:
                if step.name in stuck - set(cycle):
                    problems.append(
                        {
                            "path": f"{stage_name}.steps[{step.index}]",
                            "message": f"unreachable: '{step.name}' waits on a dependency cycle",
                        }
                    )
    return problems


def _downstream(graph: dict[str, list[str]], roots: set[str]) -> set[str]:
    dependents: dict[str, list[str]] = {}
    for node, deps in graph.items():
        for dep in deps:
            dependents.setdefault(dep, []).append(node)
    reached = set(roots)
    stack = list(roots)
    while stack:
        for node in dependents.get(stack.pop(), ()):
            if node not in reached:
                reached.add(node)
                stack.append(node)
    return reached


class _Upstream:
    """Which steps are upstream of which, as bit sets over the steps in dependency order:
    built once, in one pass over steps and edges, and only if a template reads `steps`."""

    def __init__(self, graph: dict[str, list[str]]) -> None:
        self.graph = graph
        self._bits: dict[str, int] | None = None
        self._index = {name: i for i, name in enumerate(graph)}

    def _build(self) -> dict[str, int]:
        bits: dict[str, int] = {}
        for name in _dependency_order(self.graph):
            mask = 0
            for dep in self.graph[name]:
                if dep in self._index and dep != name:
                    mask |= bits.get(dep, 0) | (1 << self._index[dep])
            bits[name] = mask
        return bits

    def names_not_upstream(self, step: str, names: set[str]) -> set[str]:
        if not names:
            return set()
        if self._bits is None:
            self._bits = self._build()
        mask = self._bits.get(step, 0)
        return {n for n in names if n not in self._index or not mask >> self._index[n] & 1}


def _dependency_order(graph: dict[str, list[str]]) -> list[str]:
    """Each step after the steps it depends on (Kahn's algorithm; a valid graph has no
    cycle, and steps on one would be left out)."""
    waiting = {name: 0 for name in graph}
    dependents: dict[str, list[str]] = {}
    for name, deps in graph.items():
        for dep in set(deps):
            if dep in graph and dep != name:
                waiting[name] += 1
                dependents.setdefault(dep, []).append(name)
    ready = [name for name, count in waiting.items() if count == 0]
    order = []
    while ready:
        name = ready.pop()
        order.append(name)
        for dependent in dependents.get(name, ()):
            waiting[dependent] -= 1
            if waiting[dependent] == 0:
                ready.append(dependent)
    return order


def _environment_problems(definition: WorkflowDefinition) -> list[dict[str, str]]:
    """Variables no agent gives a plugin (security.environment), refused here too: the
    official agents pass a step's `environment` as it is."""
    problems = []
    for stage_name in STAGES:
        for i, step in enumerate(_stage_steps(definition, stage_name)):
            environment = step.config.get("environment")
            if not isinstance(environment, dict):
                continue
            for name in environment:
                reason = refusal(str(name))
                if reason:
                    problems.append(
                        {
                            "path": f"{stage_name}.steps[{i}].config.environment.{name}",
                            "message": f"environment variable '{name}' is refused: {reason}",
                        }
                    )
    return problems


def _template_problems(definition: WorkflowDefinition) -> list[dict[str, str]]:
    """Unknown names in templates, where they can be known before anything runs."""
    from stavily.workflows.templating import ROOTS, references

    problems: list[dict[str, str]] = []
    actions = {s.name: list(s.depends_on) for s in definition.actions.steps}
    outputs = {s.name: list(s.depends_on) for s in _stage_steps(definition, "outputs")}
    # Outputs run after every action: they depend on the actions' last steps, which is the
    # same upstream as on all of them, in edges linear in the steps.
    depended_on = {dep for deps in actions.values() for dep in deps}
    last_actions = [name for name in actions if name not in depended_on]
    graph = {**actions, **{name: deps + last_actions for name, deps in outputs.items()}}
    upstream = _Upstream(graph)
    declared = {
        "inputs": set(definition.inputs) if definition.inputs is not None else None,
        "secrets": set(definition.secrets or {}),
        "variables": set(definition.variables or {}),
    }
    for stage_name in ("actions", "outputs"):
        for i, step in enumerate(_stage_steps(definition, stage_name)):
            fields = {"config": step.config, "when": step.when, "for_each": step.for_each}
            for field_name, value in fields.items():
                base = f"{stage_name}.steps[{i}].{field_name}"
                if field_name == "when" and isinstance(value, str):
                    value = as_expression(value)
                for where, problem, roots, attrs in references(value, base):
                    if field_name != "config" and "secrets" in roots:
                        problems.append(
                            {
                                "path": where,
                                "message": f"secrets cannot be used in {field_name}: only "
                                "in config, inserted as they are ({{ secrets.NAME }})",
                            }
                        )
                        continue
                    if problem:
                        problems.append({"path": where, "message": problem})
                        continue
                    allowed_roots = set(ROOTS) - ({"item"} if step.for_each is None else set())
                    if field_name == "for_each":
                        allowed_roots.discard("item")
                    for root in sorted(roots - allowed_roots):
                        problems.append({"path": where, "message": f"unknown name '{root}'"})
                    read = attrs.get("steps", set())
                    for name in sorted(upstream.names_not_upstream(step.name, read)):
                        message = (
                            f"'steps.{name}' is not upstream of this step"
                            if name in graph
                            else f"unknown step '{name}'"
                        )
                        problems.append({"path": where, "message": message})
                    for root, names in declared.items():
                        if names is None:
                            continue
                        for name in sorted(attrs.get(root, set()) - names):
                            problems.append(
                                {"path": where, "message": f"unknown {root[:-1]} '{name}'"}
                            )
    return problems


def as_expression(condition: str) -> str:
    """`when:` may be written with or without the braces."""
    stripped = condition.strip()
    return stripped if stripped.startswith("{{") else f"{{{{ {stripped} }}}}"


def _find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """A dependency cycle as a path (its first step again at the end), or None. Iterative:
    a chain of thousands of steps is no deeper for it than one step."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    for start in graph:
        if start in state:
            continue
        path: list[str] = [start]
        pending: list[Iterator[str]] = [iter(graph[start])]
        state[start] = 1
        while pending:
            dep = next(pending[-1], None)
            if dep is None:
                state[path.pop()] = 2
                pending.pop()
                continue
            if dep not in graph or dep == path[-1]:
                continue
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state:
                state[dep] = 1
                path.append(dep)
                pending.append(iter(graph[dep]))
    return None


def _selector(*levels: AgentSelection | None) -> dict[str, Any]:
    """The most specific selection wins: step over stage over workflow. A strategy set at
    any level applies unless a more specific level sets its own."""
    strategy = next((lv.strategy for lv in levels if lv is not None and lv.strategy), None)
    chosen = {"single_agent": None, "pools": [], "labels": {}}
    for level in levels:
        if level is not None and (level.single_agent or level.pools or level.labels):
            chosen = {
                "single_agent": level.single_agent,
                "pools": [
                    {
                        "pool_name": p.pool_name,
                        "agent_regex": p.agent_regex,
                        "labels": _label_rules(p.labels),
                    }
                    for p in level.pools
                ],
                "labels": _label_rules(level.labels),
            }
            break
    return {**chosen, "strategy": strategy or "least_loaded"}


def plan(
    definition: WorkflowDefinition, pins: dict[str, dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """The steps one execution runs, resolved: actions, then outputs after every action.
    `pins`: each step's plugin version, chosen when the workflow was applied
    (plugins.pins); a step without one runs its plugin as the agent has it."""
    steps: list[dict[str, Any]] = []
    action_names = [s.name for s in definition.actions.steps]
    secrets = {
        name: ref.model_dump(exclude_none=True) for name, ref in (definition.secrets or {}).items()
    }
    for stage_name in ("actions", "outputs"):
        stage: Stage | None = getattr(definition, stage_name)
        for step in stage.steps if stage else []:
            depends_on = list(step.depends_on)
            pin = (pins or {}).get(step.name)
            if stage_name == "outputs":
                depends_on = list(dict.fromkeys(action_names + depends_on))
            steps.append(
                {
                    "stage": stage_name,
                    "name": step.name,
                    "position": len(steps),
                    "depends_on": depends_on,
                    "waiting": len(depends_on),
                    "spec": {
                        "plugin_id": step.plugin.id,
                        "plugin_version": pin["version"] if pin else step.plugin.version,
                        "plugin": pin,
                        "config": step.config,
                        "agent_type": "action",
                        "selector": _selector(step.agents, stage.agents, definition.agents),
                        "timeout_seconds": step.timeout_seconds
                        if step.timeout is not None or not pin or not pin["execution_time"]
                        else pin["execution_time"],
                        "max_retries": step.error_handling.max_retries,
                        "retry": step.error_handling.policy(),
                        "on_failure": step.error_handling.on_failure,
                        "when": as_expression(step.when) if step.when else None,
                        "for_each": step.for_each,
                        "parallel": step.parallelism,
                        "run_on": (step.run_on or "success") if stage_name == "outputs" else None,
                        "secrets": secrets,
                        "reads": _reads(step),
                    },
                }
            )
    dependents: dict[str, list[str]] = {s["name"]: [] for s in steps}
    for step_plan in steps:
        for dep in step_plan["depends_on"]:
            dependents[dep].append(step_plan["name"])
    for step_plan in steps:
        step_plan["dependents"] = dependents[step_plan["name"]]
    return steps


def watches(
    definition: WorkflowDefinition, pins: dict[str, dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """The triggers stage's steps, resolved: each a plugin the sensor agents its agent
    selection picks keep running as a watcher (workflows.watches), not a step of a run."""
    stage = definition.triggers
    found = []
    for step in stage.steps if stage else []:
        pin = (pins or {}).get(step.name)
        found.append(
            {
                "name": step.name,
                "plugin_id": step.plugin.id,
                "plugin_version": pin["version"] if pin else step.plugin.version,
                "plugin": pin,
                "config": step.config,
                "agent_type": "sensor",
                "selector": _selector(step.agents, stage.agents, definition.agents),
            }
        )
    return found


def _reads(step: Step) -> list[str] | None:
    """The steps whose results the step's templates read; None when that cannot be told."""
    from stavily.workflows.templating import references

    names: set[str] = set()
    for value in (step.config, as_expression(step.when) if step.when else None, step.for_each):
        for _, _, roots, attrs in references(value, ""):
            if "steps" in roots:
                if not attrs.get("steps"):
                    return None  # `steps` used as a whole: give it every step
                names |= attrs["steps"]
    return sorted(names)


def workflow_schema() -> dict[str, Any]:
    """The published JSON Schema; a plugin may be written `<id>-v<version>` or as a mapping."""
    schema = WorkflowDefinition.model_json_schema()
    plugin = schema["$defs"]["Step"]["properties"]["plugin"]
    schema["$defs"]["Step"]["properties"]["plugin"] = {
        "anyOf": [{"type": "string", "pattern": _PLUGIN_REF.pattern}, plugin],
        "description": "A plugin: '<id>-v<version>', '<id>', or {id, version}.",
    }
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Stavily workflow"
    return schema
