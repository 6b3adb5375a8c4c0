"""What a workflow's problems say: where a YAML or JSON syntax error is, and the key an
unknown one was probably meant to be."""

from __future__ import annotations

import difflib
import json
import types
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel


def located(source: str, exc: Exception) -> str | None:
    """`line 4, column 11: mapping values are not allowed here: `  bad: a: b``: where a
    YAML or JSON syntax error is (counted from 1) and the line it is on, or None."""
    if isinstance(exc, json.JSONDecodeError):
        line, column, problem = exc.lineno, exc.colno, exc.msg
    elif isinstance(exc, yaml.MarkedYAMLError) and (exc.problem_mark or exc.context_mark):
        mark = exc.problem_mark or exc.context_mark
        line, column = mark.line + 1, mark.column + 1
        problem = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem and exc.context_mark is not None:
            problem = f"{problem} ({exc.context} at line {exc.context_mark.line + 1})"
    else:
        return None
    lines = source.splitlines()
    text = lines[line - 1] if 0 < line <= len(lines) else ""
    if len(text) > 120:  # a long line: the part around the column
        start = max(0, column - 60)
        text = ("…" if start else "") + text[start : start + 120] + "…"
    where = f"line {line}, column {column}: {problem}"
    shown = text.replace("\t", "\\t")  # a tab is a YAML error of its own: make it seen
    return f"{where}: `{shown}`" if text.strip() else where


def unknown_key(
    loc: tuple[int | str, ...], root: type[BaseModel], every: tuple[type[BaseModel], ...]
) -> str:
    """`unknown key 'confg': did you mean `config`?`, from the keys of the model where
    the key was found, from `root` down (or, if that cannot be told, of `every` model)."""
    key = str(loc[-1]) if loc else ""
    model = _model_at(loc[:-1], root)
    known = _keys(model) if model is not None else sorted(set().union(*map(_keys, every)))
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"unknown key '{key}': did you mean `{close[0]}`?"
    if model is not None:
        return f"unknown key '{key}': expected one of {', '.join(known)}"
    return f"unknown key '{key}'"


def _keys(model: type[BaseModel]) -> list[str]:
    """The keys a model takes as written in a document: aliases where there are some."""
    return [info.alias or name for name, info in model.model_fields.items()]


def _members(annotation: Any) -> list[Any]:
    """The types an annotation may hold: Optional, unions and Annotated unwrapped."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _members(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return [m for arg in get_args(annotation) for m in _members(arg)]
    return [annotation]


def _model_at(loc: tuple[int | str, ...], root: type[BaseModel]) -> type[BaseModel] | None:
    """The model validating the value at a pydantic error location, or None. The location
    names fields, list indexes, mapping keys and, in a union, the member tried (by its
    class name)."""
    candidates: list[Any] = [root]
    for part in loc:
        following: list[Any] = []
        for tp in candidates:
            for member in _members(tp):
                origin = get_origin(member)
                if isinstance(member, type) and issubclass(member, BaseModel):
                    if member.__name__ == part:
                        following.append(member)
                    for name, info in member.model_fields.items():
                        if part in (name, info.alias):
                            following.append(info.annotation)
                elif origin is list and isinstance(part, int):
                    following.extend(get_args(member)[:1])
                elif origin is dict and isinstance(part, str):
                    following.extend(get_args(member)[1:2])
        candidates = following
    models = [
        m
        for tp in candidates
        for m in _members(tp)
        if isinstance(m, type) and issubclass(m, BaseModel)
    ]
    return models[0] if len(models) == 1 else None
