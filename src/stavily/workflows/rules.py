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
    ValidationInfo,
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

    def operator(self) -> tuple[str, Any]:
        """The one operator, as written, and its value: `("gt", 90)`."""
        (operator, value), *_ = self.operators().items()
        return operator, value

    def holds(self, payload: Any) -> bool:
        return self.passes(_lookup(payload, self.field))

    def passes(self, value: Any) -> bool:
        """Whether the field's value (`_MISSING` when the payload lacks it) passes."""
        operator, expected = self.operator()
        if operator == "exists":
            return (value is not _MISSING) is expected
        if value is _MISSING:
            return operator in ("ne", "not_in")
        if operator == "eq":
            return _same(value, expected)
        if operator == "ne":
            return not _same(value, expected)
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
            return any(_same(value, e) for e in expected)
        if operator == "not_in":
            return not any(_same(value, e) for e in expected)
        # contains: a list holding the value, or a string holding the text
        if isinstance(value, list):
            return any(_same(e, expected) for e in value)
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


def _same(a: Any, b: Any) -> bool:
    """JSON's equality, not Python's: `true` is not `1`, nor `[true]` `[1]`; `1` is `1.0`."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    same_kind = type(a) is type(b) or (_is_number(a) and _is_number(b))
    return same_kind and bool(a == b)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


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


# Judging a rule at apply. A rule is refused only when no payload can pass its `where`:
# each check below is sound (it never refuses a rule some payload passes), not complete.

_EFFORT = 100_000  # tests of a value one rule's check may make; beyond, it is let through
_WORDS = {
    "eq": "equal",
    "ne": "differ from",
    "gt": "be >",
    "ge": "be >=",
    "lt": "be <",
    "le": "be <=",
    "matches": "match",
    "in": "be one of",
    "not_in": "be none of",
    "contains": "contain",
}


class _Effort:
    """What is left of a rule's `_EFFORT`: a check that would pass it gives up instead
    (the rule is let through), so a huge `where` cannot stall an apply."""

    def __init__(self) -> None:
        self.left = _EFFORT

    def spend(self, tests: int) -> bool:
        self.left -= tests
        return self.left >= 0


def _never(filters: list[Filter], beside: list[Condition], effort: _Effort) -> str | None:
    """Why filters that must all hold, together with the conditions `beside` (the
    enclosing conjunction's), never can; None when they may. An `any` fails only when
    each of its branches does; a `not` is never judged (that needs a tautology check)."""
    fresh, choices = _conjuncts(filters)
    facts = [*beside, *fresh]
    if not effort.spend(len(facts)):
        return None
    reason = _contradiction(facts, {c.field for c in fresh}, effort)
    if reason:
        return reason
    for choice in choices:
        reason = _every_branch_fails(choice, facts, effort)
        if reason:
            return reason
    return None


def _every_branch_fails(choice: AnyOf, beside: list[Condition], effort: _Effort) -> str | None:
    """Why no branch of an `any` can hold beside the conditions around it; None once one may."""
    reasons = []
    for branch in choice.any:
        reason = _never([branch], beside, effort)
        if reason is None:
            return None
        reasons.append(reason)
    more = f" (and {len(reasons) - 3} more)" if len(reasons) > 3 else ""
    return f"no branch of an `any` can match: {'; '.join(reasons[:3])}{more}"


def _conjuncts(filters: list[Filter]) -> tuple[list[Condition], list[AnyOf]]:
    """The conditions that must all hold and the `any`s that must, nested `all`s (and an
    `any` of one branch) opened; a `not` is left out, as if it may hold."""
    conditions: list[Condition] = []
    choices: list[AnyOf] = []
    for item in filters:
        if isinstance(item, Condition):
            conditions.append(item)
        elif isinstance(item, AllOf) or (isinstance(item, AnyOf) and len(item.any) == 1):
            inner = _conjuncts(item.all if isinstance(item, AllOf) else item.any)
            conditions += inner[0]
            choices += inner[1]
        elif isinstance(item, AnyOf):
            choices.append(item)
    return conditions, choices


def _contradiction(conditions: list[Condition], fresh: set[str], effort: _Effort) -> str | None:
    """Why conditions that must all hold cannot, judging the fields named in `fresh`
    and those inside them (the others were judged already); None when they may."""
    fields: dict[str, list[Condition]] = {}
    for condition in conditions:
        fields.setdefault(condition.field, []).append(condition)
    for name, on_field in fields.items():
        if name not in fresh and not fresh.intersection(_parents(name)):
            continue
        reason = (
            _absent_yet_tested(name, on_field)
            or _kinds_clash(name, on_field)
            or _no_number(name, on_field)
            or _no_value(name, on_field, effort)
            or _no_parent(name, on_field, fields, effort)
        )
        if reason:
            return reason
    return None


def _absent_yet_tested(name: str, conditions: list[Condition]) -> str | None:
    """`exists: false` beside a condition that a missing field fails (`eq`, `gt`, ...)."""
    absent = [c for c in conditions if c.operator() == ("exists", False)]
    present = [c for c in conditions if not c.passes(_MISSING)]
    if absent and present:
        return f"{name} cannot {_together([absent[0], present[0]])}"
    return None


def _kinds(condition: Condition) -> set[str] | None:
    """The kinds of value a condition can pass, when it is that particular: a number
    for a comparison, text for `matches`, a list (or text, for text) for `contains`."""
    operator, value = condition.operator()
    if operator in _COMPARISONS:
        return {"number"}
    if operator == "matches":
        return {"text"}
    if operator == "contains":
        return {"list", "text"} if isinstance(value, str) else {"list"}
    return None


def _kinds_clash(name: str, conditions: list[Condition]) -> str | None:
    """Two conditions that need different kinds of value (`gt` and `matches`)."""
    seen: dict[frozenset[str], Condition] = {}
    for condition in conditions:
        kinds = _kinds(condition)
        if kinds is not None:
            seen.setdefault(frozenset(kinds), condition)
    for first, one in seen.items():
        for second, other in seen.items():
            if not first & second:
                return f"{name} cannot {_together([one, other])}"
    return None


def _no_number(name: str, conditions: list[Condition]) -> str | None:
    """Lower and upper bounds on a field that leave no number between them."""
    lower: tuple[int | float, bool] | None = None  # the bound, and whether it is in
    upper: tuple[int | float, bool] | None = None
    for condition in conditions:
        operator, value = condition.operator()
        bound = (value, operator in ("ge", "le"))
        if operator in ("gt", "ge") and (lower is None or _tighter(bound, lower, 1)):
            lower = bound
        elif operator in ("lt", "le") and (upper is None or _tighter(bound, upper, -1)):
            upper = bound
    if lower is None or upper is None:
        return None
    (low, low_in), (high, high_in) = lower, upper
    if low < high or (low == high and low_in and high_in):
        return None
    above = f"{'>=' if low_in else '>'} {_number(low)}"
    below = f"{'<=' if high_in else '<'} {_number(high)}"
    return f"no number is both {above} and {below} ({name})"


def _tighter(bound: tuple[int | float, bool], than: tuple[int | float, bool], sign: int) -> bool:
    """Whether a bound leaves fewer numbers than another (sign 1: lower bounds)."""
    return bound[0] * sign > than[0] * sign or (bound[0] == than[0] and not bound[1])


def _no_value(name: str, conditions: list[Condition], effort: _Effort) -> str | None:
    """A field pinned to some values (`eq`, `in`) none of which passes its other
    conditions."""
    pins = [c for c in conditions if c.operator()[0] in ("eq", "in")]
    if not pins:
        return None
    pin = min(pins, key=lambda c: len(_candidates(c)))
    values, others = _candidates(pin), [c for c in conditions if c is not pin]
    if not values or not effort.spend(len(values) * sum(_cost(c) for c in others)):
        return None
    if any(all(c.passes(v) for c in others) for v in values):
        return None
    blamed = [c for c in others if not any(c.passes(v) for v in values)][:1] or [
        c for c in others if not all(c.passes(v) for v in values)
    ]
    return f"{name} cannot {_together([pin, *blamed])}"


def _candidates(pin: Condition) -> list[Any]:
    """The values an `eq` or `in` allows."""
    operator, value = pin.operator()
    return [value] if operator == "eq" else list(value)


def _cost(condition: Condition) -> int:
    operator, value = condition.operator()
    return 1 + (len(value) if operator in ("in", "not_in") else 0)


def _no_parent(
    name: str, conditions: list[Condition], fields: dict[str, list[Condition]], effort: _Effort
) -> str | None:
    """A field inside another (`data.host` in `data`) is there only when its parent is
    an object or a list that has it: not when the parent must be absent, a number or
    text, or values without it."""
    inner = next((c for c in conditions if not c.passes(_MISSING)), None)
    if inner is None:
        return None
    for parent in _parents(name):
        rest = name[len(parent) + 1 :]
        for outer in fields.get(parent, []):
            if not effort.spend(_cost(outer)):
                return None
            if not _may_have(outer, rest):
                return f"{parent} must {_said(outer)}, so {name} cannot {_said(inner)}"
    return None


def _parents(name: str) -> list[str]:
    """The fields a dotted path goes through: `a.b.c` goes through `a` and `a.b`."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _may_have(condition: Condition, path: str) -> bool:
    """Whether a value passing the condition can hold something at `path`."""
    operator, value = condition.operator()
    if operator in ("eq", "in"):
        values = [value] if operator == "eq" else value
        return any(_lookup(v, path) is not _MISSING for v in values)
    if operator == "contains":  # a list, the only one of a list and text with parts
        return path.split(".")[0].isdigit()
    return operator in ("ne", "not_in") or (operator, value) == ("exists", True)


def _together(conditions: list[Condition]) -> str:
    """`both be > 5 and match 'a'`, or `a, b and c at once`."""
    said = [_said(c) for c in conditions]
    if len(said) == 2:
        return f"both {said[0]} and {said[1]}"
    return f"{', '.join(said[:-1])} and {said[-1]} at once"


def _said(condition: Condition) -> str:
    """What a condition asks of its field, after "must": `be > 90`, `equal 'prod'`."""
    operator, value = condition.operator()
    if operator == "exists":
        return "be present" if value else "be absent"
    shown = _number(value) if operator in _COMPARISONS else _short(repr(value))
    return f"{_WORDS[operator]} {shown}"


def _number(value: int | float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _short(text: str) -> str:
    """At most 80 characters of a value, so that a long `in` list stays readable."""
    return text if len(text) <= 80 else f"{text[:79]}…"


class Rule(_Strict):
    """`on: [{source: webhook, type: "push", where: [...], inputs: {...}}]`: events of
    this source (any by default) and type (a glob, any by default) whose payload passes
    `where` start the workflow, its inputs rendered from `trigger.*`."""

    source: Literal["any", "agent", "api", "manual", "webhook", "schedule"] = "any"
    type: str | None = Field(default=None, min_length=1, max_length=200)
    where: Filter | list[Filter] | None = None
    inputs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _can_match(self, info: ValidationInfo) -> Rule:
        if info.context and info.context.get("stored"):
            return self  # judged when it was applied: a stricter check must not undo that
        if self.source == "manual":
            raise ValueError(
                "a manual run starts its workflow itself: `source: manual` never matches"
            )
        where = self.where
        filters = where if isinstance(where, list) else [] if where is None else [where]
        reason = _never(filters, [], _Effort())
        if reason:
            raise ValueError(f"this rule can never match: {reason}")
        return self

    def matches(self, source: str, event_type: str, payload: Any) -> bool:
        if self.source != "any" and self.source != source:
            return False
        if self.type is not None and not fnmatch.fnmatchcase(event_type, self.type):
            return False
        return holds(self.where, payload)
