"""Templating of step configuration: a sandboxed Jinja2 environment, checked at apply time.

A string that is exactly one expression (`"{{ steps.scan.result.hosts }}"`) renders to
the expression's native value (a list stays a list); any other string renders to text.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, TemplateError, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The names a template may use; `item` only inside a for_each step.
ROOTS = ("inputs", "variables", "trigger", "steps", "execution", "secrets", "item")

_env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False)


class TemplateProblem(ValueError):
    """A template that cannot be rendered; the step fails with this message."""


def _is_template(text: str) -> bool:
    return "{{" in text or "{%" in text


def _single_expression(text: str) -> str | None:
    stripped = text.strip()
    if stripped.startswith("{{") and stripped.endswith("}}") and stripped.count("{{") == 1:
        return stripped[2:-2].strip()
    return None


@lru_cache(maxsize=4096)
def _compiled(text: str) -> Any:
    expression = _single_expression(text)
    if expression is not None:
        return _env.compile_expression(expression, undefined_to_none=False)
    return _env.from_string(text)


def render(value: Any, context: dict[str, Any]) -> Any:
    """Render every string inside `value` (dicts and lists walked); raises TemplateProblem."""
    if isinstance(value, str):
        if not _is_template(value):
            return value
        try:
            compiled = _compiled(value)
            if _single_expression(value) is not None:
                result = compiled(**context)
                if isinstance(result, StrictUndefined):
                    str(result)  # raises the UndefinedError with its message
                return result
            return compiled.render(**context)
        except TemplateError as exc:
            raise TemplateProblem(f"template {value!r}: {exc.message or exc}") from None
        except (TypeError, ValueError, ArithmeticError, LookupError) as exc:
            raise TemplateProblem(f"template {value!r}: {exc}") from None
    if isinstance(value, dict):
        return {key: render(item, context) for key, item in value.items()}
    if isinstance(value, list):
        return [render(item, context) for item in value]
    return value


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        if _is_template(value):
            yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, f"{path}[{i}]")


def references(value: Any, path: str) -> Iterator[tuple[str, str, set[str], dict[str, set[str]]]]:
    """Each template in `value`: (path, problem or "", root names used, and for each root
    the attribute names read from it: `steps.scan.result` gives {"steps": {"scan"}})."""
    for where, text in _strings(value, path):
        expression = _single_expression(text)
        source = f"{{{{ {expression} }}}}" if expression is not None else text
        try:
            tree = _env.parse(source)
        except TemplateError as exc:
            yield where, f"invalid template: {exc.message or exc}", set(), {}
            continue
        names = list(tree.find_all(nodes.Name))
        assigned = {n.name for n in names if n.ctx in ("store", "param")}
        roots = {n.name for n in names if n.ctx == "load"} - assigned
        attrs: dict[str, set[str]] = {}
        for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
            target = node.node
            if not isinstance(target, nodes.Name) or target.name in assigned:
                continue
            if isinstance(node, nodes.Getattr):
                attrs.setdefault(target.name, set()).add(node.attr)
            elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
                attrs.setdefault(target.name, set()).add(node.arg.value)
        yield where, "", roots, attrs
