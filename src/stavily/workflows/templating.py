"""Templating of step configuration: a sandboxed Jinja2 environment, checked at apply time,
rendered off the event loop within a time budget and an output size.

A string that is exactly one expression (`"{{ steps.scan.result.hosts }}"`) renders to
the expression's native value (a list stays a list); any other string renders to text.

Limits: the operators and filters that build big values in one step of C code (`**`,
`*`, `%`, `+`, `center`, `replace`...) check the size of what they would make first, and
the text a template writes is counted as it is written. What loops in Python (nested
`for`) is stopped at the time budget: rendering runs on a worker thread, never on the
event loop's, and the thread is interrupted when the budget is spent.
"""

from __future__ import annotations

import asyncio
import ctypes
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import orjson
from jinja2 import StrictUndefined, TemplateError, nodes
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The names a template may use; `item` only inside a for_each step.
ROOTS = ("inputs", "variables", "trigger", "steps", "execution", "secrets", "item")
# The largest integer arithmetic may make, in bits (str() of one is limited anyway).
MAX_INTEGER_BITS = 64 * 1024
_WIDTH = re.compile(r"\d{5,}")


class TemplateProblem(ValueError):
    """A template that cannot be rendered; the step fails with this message."""


class TemplateTimeout(TemplateProblem):
    """Raised inside the rendering thread when its time is up."""


@dataclass(frozen=True)
class RenderLimits:
    timeout: float = 1.0  # seconds
    max_output: int = 1024 * 1024  # bytes (characters, for text)


_limits = threading.local()


def _max_output() -> int:
    return getattr(_limits, "max_output", RenderLimits.max_output)


def _too_big(what: str) -> TemplateProblem:
    return TemplateProblem(f"{what} would be larger than {_max_output()} bytes")


def _size(value: Any) -> int | None:
    return len(value) if isinstance(value, str | bytes | list | tuple) else None


def _checked_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse an operation whose result would pass the limits, before it runs."""
    if isinstance(left, bool) or isinstance(right, bool):
        return
    if operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
        bits = right * math.log2(abs(left)) if abs(left) > 1 else 0
        if bits > MAX_INTEGER_BITS:
            raise TemplateProblem(f"{left} ** {right} is too large a number")
    elif operator == "*":
        if isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > MAX_INTEGER_BITS:
                raise TemplateProblem("the product is too large a number")
            return
        size, times = (_size(left), right) if _size(left) is not None else (_size(right), left)
        if size is not None and isinstance(times, int) and size * times > _max_output():
            raise _too_big("the repeated value")
    elif operator == "+":
        sizes = (_size(left), _size(right))
        if None not in sizes and sum(sizes) > _max_output():  # type: ignore[arg-type]
            raise _too_big("the joined value")
    elif operator == "%" and isinstance(left, str):
        _check_widths(left)


def _check_widths(text: str) -> None:
    """A format string's widths (`%99999999d`, `{:>99999999}`) make text of that size."""
    for digits in _WIDTH.findall(text):
        if int(digits) > _max_output():
            raise _too_big("the formatted text")


def _check_sizes(what: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """A width or a count past the limit (`center(10**9)`) would make text that large."""
    for arg in (*args, *kwargs.values()):
        if isinstance(arg, int) and not isinstance(arg, bool) and arg > _max_output():
            raise _too_big(what)


def _sized_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """A filter whose numeric arguments (a width, a count) or replacement may make text
    beyond the limit, checked before it runs."""

    def checked(value: Any, *args: Any, **kwargs: Any) -> Any:
        _check_sizes(f"the result of '{name}'", args, kwargs)
        if name == "replace" and len(args) >= 2 and isinstance(value, str):
            old, new = str(args[0]), str(args[1])
            grows = (value.count(old) if old else len(value) + 1) * len(new)
            if len(value) + grows > _max_output():
                raise _too_big("the result of 'replace'")
        if name == "format" and isinstance(value, str):
            _check_widths(value)
        return function(value, *args, **kwargs)

    return checked


class _LimitedEnvironment(ImmutableSandboxedEnvironment):
    # Intercepted operators are not folded at compile time either.
    intercepted_binops = frozenset(("**", "*", "%", "+"))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _checked_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _check_sizes(f"the result of {getattr(__obj, '__name__', 'the call')}", args, kwargs)
        if getattr(__obj, "__name__", None) in ("format", "format_map"):
            # the sandbox hands out str.format wrapped: the string is the wrapped one's
            owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
            if isinstance(owner, str):
                _check_widths(owner)
        return super().call(__context, __obj, *args, **kwargs)

    @staticmethod
    def checked_join(parts: tuple[Any, ...]) -> str:
        """`a ~ b`: joined only if the result stays within the limit."""
        texts = [str(part) for part in parts]
        if sum(len(t) for t in texts) > _max_output():
            raise _too_big("the joined text")
        return "".join(texts)


class _LimitedCodeGenerator(CodeGenerator):
    """Compiles `~` to a size-checked join (Jinja joins in one C call otherwise)."""

    @optimizeconst
    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.checked_join((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


_LimitedEnvironment.code_generator_class = _LimitedCodeGenerator
_env = _LimitedEnvironment(undefined=StrictUndefined, autoescape=False)
for _name in ("center", "indent", "wordwrap", "replace", "format", "truncate", "batch", "slice"):
    _env.filters[_name] = _sized_filter(_name, _env.filters[_name])


def _is_template(text: str) -> bool:
    return "{{" in text or "{%" in text


def has_templates(value: Any) -> bool:
    if isinstance(value, str):
        return _is_template(value)
    if isinstance(value, dict):
        return any(has_templates(v) for v in value.values())
    if isinstance(value, list):
        return any(has_templates(v) for v in value)
    return False


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


def _render_text(compiled: Any, context: dict[str, Any], budget: list[int]) -> str:
    """Text, counted as it is written: a loop writing without end stops at the limit."""
    chunks = []
    for chunk in compiled.generate(**context):
        budget[0] -= len(chunk)
        if budget[0] < 0:
            raise _too_big("the rendered text")
        chunks.append(chunk)
    return "".join(chunks)


def _render(value: Any, context: dict[str, Any], budget: list[int]) -> Any:
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
            return _render_text(compiled, context, budget)
        except TemplateTimeout:
            raise
        except TemplateProblem as exc:
            raise TemplateProblem(f"template {value!r}: {exc}") from None
        except TemplateError as exc:
            raise TemplateProblem(f"template {value!r}: {exc.message or exc}") from None
        except (TypeError, ValueError, ArithmeticError, LookupError, RecursionError) as exc:
            raise TemplateProblem(f"template {value!r}: {exc}") from None
        except MemoryError:
            raise TemplateProblem(f"template {value!r}: out of memory") from None
    if isinstance(value, dict):
        return {key: _render(item, context, budget) for key, item in value.items()}
    if isinstance(value, list):
        return [_render(item, context, budget) for item in value]
    return value


def render(value: Any, context: dict[str, Any], limits: RenderLimits | None = None) -> Any:
    """Render every string inside `value` (dicts and lists walked), on this thread, with
    the size limits but no time budget (see render_limited); raises TemplateProblem."""
    limits = limits or RenderLimits()
    previous = getattr(_limits, "max_output", None)
    _limits.max_output = limits.max_output
    try:
        rendered = _render(value, context, [limits.max_output])
        try:
            size = len(orjson.dumps(rendered, option=orjson.OPT_NON_STR_KEYS))
        except (TypeError, orjson.JSONEncodeError) as exc:
            raise TemplateProblem(f"the rendered value cannot be stored: {exc}") from None
        if size > limits.max_output:
            raise _too_big("the rendered configuration")
        return rendered
    finally:
        if previous is None:
            del _limits.max_output
        else:
            _limits.max_output = previous


# -- off the event loop, within the time budget -----------------------------------------------

_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="stavily-template")
_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)


class _Run:
    """One rendering on a worker thread, which the event loop may interrupt once: the
    exception is raised in the thread at its next Python instruction."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.thread: int | None = None
        self.done = False
        self.interrupted = False

    def __call__(self, value: Any, context: dict[str, Any], limits: RenderLimits) -> Any:
        with self.lock:
            if self.interrupted:  # its time ran out while it waited for a thread
                raise TemplateTimeout(f"rendering took longer than {limits.timeout:g}s")
            self.thread = threading.get_ident()
        try:
            try:
                return render(value, context, limits)
            finally:
                with self.lock:
                    self.done = True
                    if self.interrupted:  # not raised yet: it must not escape this call
                        _set_async_exc(self.thread, ctypes.py_object())
        except TemplateTimeout:
            raise TemplateTimeout(f"rendering took longer than {limits.timeout:g}s") from None

    def interrupt(self) -> None:
        with self.lock:
            if self.interrupted or self.done:
                return
            self.interrupted = True
            if self.thread is not None:  # running: else it will not start
                _set_async_exc(self.thread, ctypes.py_object(TemplateTimeout))


async def render_limited(
    value: Any, context: dict[str, Any], limits: RenderLimits | None = None
) -> Any:
    """`render` on a worker thread, given at most `limits.timeout` seconds: the event loop
    goes on meanwhile. Values without templates come back as they are, at no cost."""
    if not has_templates(value):
        return value
    limits = limits or RenderLimits()
    run = _Run()
    future = asyncio.get_running_loop().run_in_executor(_pool, run, value, context, limits)
    started = time.monotonic()
    try:
        return await asyncio.wait_for(asyncio.shield(future), limits.timeout)
    except TimeoutError:
        run.interrupt()
        try:  # the thread stops at its next instruction; one C call may finish first
            return await asyncio.wait_for(future, 1.0)
        except TimeoutError:
            pass
        raise TemplateTimeout(
            f"rendering took longer than {limits.timeout:g}s "
            f"(stopped after {time.monotonic() - started:.1f}s)"
        ) from None


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
        if "secrets" in roots and not _secrets_as_they_are(tree):
            yield where, SECRETS_AS_THEY_ARE, roots, attrs
            continue
        yield where, "", roots, attrs


SECRETS_AS_THEY_ARE = (
    "a secret is inserted as it is, {{ secrets.NAME }}: filters, tests and expressions on "
    "secrets are not allowed (they would act on a placeholder, not on the value)"
)


def _secrets_as_they_are(tree: nodes.Template) -> bool:
    """Every use of `secrets` is a whole `{{ secrets.NAME }}`: what the agent gets is then
    the value itself, put in place of its mark (security.secrets)."""
    bare = set()
    for output in tree.find_all(nodes.Output):
        for child in output.nodes:
            if (
                isinstance(child, nodes.Getattr | nodes.Getitem)
                and isinstance(child.node, nodes.Name)
                and child.node.name == "secrets"
                and (
                    isinstance(child, nodes.Getattr)
                    or (isinstance(child.arg, nodes.Const) and isinstance(child.arg.value, str))
                )
            ):
                bare.add(id(child.node))
    return all(id(n) in bare for n in tree.find_all(nodes.Name) if n.name == "secrets")
