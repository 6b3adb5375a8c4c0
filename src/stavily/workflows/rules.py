"""A workflow's `on:` rules: which events start it beyond its own trigger steps, by
source and type, with filters on the payload, and how the event becomes its inputs
(docs/triggers.md, "Rules"). A rule that can never match is refused at apply."""

from __future__ import annotations

import fnmatch
import math
from typing import Any, Literal

import re2  # type: ignore[import-untyped]
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

from stavily.fleet.agents import regex

_COMPARISONS = ("gt", "ge", "lt", "le")
_OPERATORS = ("eq", "ne", "gt", "ge", "lt", "le", "matches", "in_", "not_in", "contains", "exists")
_MISSING = object()  # a field the payload does not have


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class Condition(_Strict):
    """One test of one payload field: `{field: data.usage, gt: 90}`; exactly one of the
    operators. `field` is a dotted path into the payload (`data.host`, `tags.0`)."""

    field: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.-]+$")
    eq: Any = None
    ne: Any = None
    gt: int | float | None = None
    ge: int | float | None = None
    lt: int | float | None = None
    le: int | float | None = None
    matches: str | None = Field(default=None, max_length=1000)
    in_: list[Any] | None = Field(default=None, alias="in", max_length=1000)
    not_in: list[Any] | None = Field(default=None, max_length=1000)
    contains: Any = None
    exists: bool | None = None

    @field_validator("matches")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                regex(value)
            except re2.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from None
        return value

    @field_validator("gt", "ge", "lt", "le")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if isinstance(value, bool) or (value is not None and not math.isfinite(value)):
            raise ValueError("a comparison takes a finite number")
        return value

    @model_validator(mode="after")
    def _one_operator(self) -> Condition:
        given = self.operators()
        if len(given) != 1:
            raise ValueError(
                "a condition has exactly one operator (eq, ne, gt, ge, lt, le, matches, in, "
                f"not_in, contains, exists), not {len(given)}"
            )
        (operator, value), *_ = given.items()
        if value is None and operator not in ("eq", "ne", "contains"):
            raise ValueError(f"`{operator}` needs a value ({self.field})")
        if operator == "in" and not value:
            raise ValueError(f"`in: []` never matches: no value is in an empty list ({self.field})")
        return self

    def operators(self) -> dict[str, Any]:
        """The operator given (`eq: null` is one), as written (`in`)."""
        return {
            name.rstrip("_"): getattr(self, name)
            for name in _OPERATORS
            if name in self.model_fields_set
        }

    @model_serializer
    def _as_written(self) -> dict[str, Any]:
        """Stored as written: the field and its one operator."""
        return {"field": self.field, **self.operators()}

    def holds(self, payload: Any) -> bool:
        value = _lookup(payload, self.field)
        (operator, expected), *_ = self.operators().items()
        if operator == "exists":
            return (value is not _MISSING) is expected
        if value is _MISSING:
            return operator in ("ne", "not_in")
        if operator == "eq":
            return bool(value == expected)
        if operator == "ne":
            return bool(value != expected)
        if operator in _COMPARISONS:
            if isinstance(value, bool) or not isinstance(value, int | float):
                return False
            return {
                "gt": value > expected,
                "ge": value >= expected,
                "lt": value < expected,
                "le": value <= expected,
            }[operator]
        if operator == "matches":
            return isinstance(value, str) and regex(expected).search(value) is not None
        if operator == "in":
            return value in expected
        if operator == "not_in":
            return value not in expected
        # contains: a list holding the value, or a string holding the text
        if isinstance(value, list):
            return expected in value
        return isinstance(value, str) and isinstance(expected, str) and expected in value


class AllOf(_Strict):
    all: list[Filter] = Field(min_length=1, max_length=100)


class AnyOf(_Strict):
    any: list[Filter] = Field(min_length=1, max_length=100)


class NotOf(_Strict):
    not_: Filter = Field(alias="not")


Filter = Condition | AllOf | AnyOf | NotOf
AllOf.model_rebuild()
AnyOf.model_rebuild()
NotOf.model_rebuild()


def _lookup(payload: Any, path: str) -> Any:
    value = payload
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def holds(where: Filter | list[Filter] | None, payload: Any) -> bool:
    if where is None:
        return True
    if isinstance(where, list):
        return all(holds(f, payload) for f in where)
    if isinstance(where, Condition):
        return where.holds(payload)
    if isinstance(where, AllOf):
        return all(holds(f, payload) for f in where.all)
    if isinstance(where, AnyOf):
        return any(holds(f, payload) for f in where.any)
    return not holds(where.not_, payload)


def _impossible(conditions: list[Filter]) -> str | None:
    """Why conditions that must all hold cannot: bounds on one field that leave no
    number, or a field required both equal to a value and unequal to it (or absent)."""
    lower: dict[str, tuple[float, bool]] = {}
    upper: dict[str, tuple[float, bool]] = {}
    equal: dict[str, Any] = {}
    for condition in conditions:
        if not isinstance(condition, Condition):
            continue
        (operator, value), *_ = condition.operators().items()
        name = condition.field
        if operator in ("gt", "ge"):
            bound = (float(value), operator == "ge")
            if name not in lower or bound[0] > lower[name][0]:
                lower[name] = bound
        elif operator in ("lt", "le"):
            bound = (float(value), operator == "le")
            if name not in upper or bound[0] < upper[name][0]:
                upper[name] = bound
        elif operator == "eq":
            if name in equal and equal[name] != value:
                return f"{name} cannot equal both {equal[name]!r} and {value!r}"
            equal[name] = value
    for condition in conditions:
        if isinstance(condition, Condition):
            (operator, value), *_ = condition.operators().items()
            name = condition.field
            if name in equal and (
                (operator == "ne" and value == equal[name])
                or (operator == "exists" and value is False)
                or (operator == "not_in" and equal[name] in value)
            ):
                return f"{name} cannot both equal {equal[name]!r} and not"
    for name in lower.keys() & upper.keys():
        (low, low_in), (high, high_in) = lower[name], upper[name]
        if low > high or (low == high and not (low_in and high_in)):
            above = f"{'>=' if low_in else '>'} {low:g}"
            below = f"{'<=' if high_in else '<'} {high:g}"
            return f"no number is both {above} and {below} ({name})"
    return None


class Rule(_Strict):
    """`on: [{source: webhook, type: "push", where: [...], inputs: {...}}]`: events of
    this source (any by default) and type (a glob, any by default) whose payload passes
    `where` start the workflow, its inputs rendered from `trigger.*`."""

    source: Literal["any", "agent", "api", "manual", "webhook", "schedule"] = "any"
    type: str | None = Field(default=None, min_length=1, max_length=200)
    where: Filter | list[Filter] | None = None
    inputs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _can_match(self) -> Rule:
        if self.source == "manual":
            raise ValueError(
                "a manual run starts its workflow itself: `source: manual` never matches"
            )
        groups: list[list[Filter]] = []
        if isinstance(self.where, list):
            groups.append(self.where)
        stack: list[Any] = [self.where] if self.where is not None else []
        while stack:
            node = stack.pop()
            if isinstance(node, list):
                stack.extend(node)
            elif isinstance(node, AllOf):
                groups.append(node.all)
                stack.extend(node.all)
            elif isinstance(node, AnyOf):
                stack.extend(node.any)
            elif isinstance(node, NotOf):
                stack.append(node.not_)
        if isinstance(self.where, Condition):
            groups.append([self.where])
        for group in groups:
            reason = _impossible(group)
            if reason:
                raise ValueError(f"this rule can never match: {reason}")
        return self

    def matches(self, source: str, event_type: str, payload: Any) -> bool:
        if self.source != "any" and self.source != source:
            return False
        if self.type is not None and not fnmatch.fnmatchcase(event_type, self.type):
            return False
        return holds(self.where, payload)
