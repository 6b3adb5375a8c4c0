"""Secrets: where a workflow's secrets may come from, how their values reach an agent, and
how they are hidden in everything an agent reports.

A step's templates never see a secret's value. `{{ secrets.token }}` renders to a mark,
`mark(nonce, "token")`, and the mark is what is stored (instructions keep no secret
values). The value is put in place of its mark only in what is handed to the agent
(`reveal`), and hidden again, with the forms a plugin could easily print it in, in what
the agent reports (`mask`). The nonce is new for every step's rendering, so a mark
cannot be forged by an input, a trigger or an earlier step's output.

Sources: environment variables of the server, and only those the operator allowed
(`SecretPolicy`), never the server's own settings; and the organization's secret store
(`{store: NAME}`, security.store). A store secret is read once, when its step is queued
(`resolve`, audited as `secret.read`), and only if the step's configuration uses it; the
instruction then keeps a copy sealed with the server's secrets key, which is what its
hand-out reveals and its reports are masked with: no database read at hand-out, the same
value for the agent and for the masking, and no read at all for a step with no store
secret.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import secrets as _random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, quote_plus

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

    from stavily.security.store import SecretStore

_MARK_CHAR = "\u2063"  # INVISIBLE SEPARATOR: never in what a template author types
_MARK = _MARK_CHAR + "secret:{}:{}" + _MARK_CHAR
MASK = "***"
# Derived forms (reversed, base64...) are hidden only for values at least this long: a
# short value's forms are common text.
_DERIVED_FROM = 4
_SETTINGS_PREFIX = "STAVILY_"
# A name in the secret store (security.store).
STORE_NAME = r"^[A-Za-z_][A-Za-z0-9_.-]{0,99}$"
_STORE_NAME = re.compile(STORE_NAME)


class SecretUnavailable(ValueError):
    """A secret that cannot be read; the step that needs it fails with this message."""


@dataclass(frozen=True)
class SecretPolicy:
    """Which environment variables of the server may be secrets: those with `prefix`,
    and the `names` listed; never another STAVILY_* variable (the server's settings: its
    database URL, its bootstrap token)."""

    prefix: str = "STAVILY_SECRET_"
    names: frozenset[str] = frozenset()
    settings: frozenset[str] = frozenset()  # the variables the server's settings read
    store: SecretStore | None = None  # the secret store, where `{store: NAME}` is read

    @classmethod
    def of(
        cls,
        prefix: str,
        names: str | Iterable[str],
        settings: Iterable[str] = (),
        store: SecretStore | None = None,
    ) -> SecretPolicy:
        listed = names.split(",") if isinstance(names, str) else names
        return cls(
            prefix, frozenset(n.strip() for n in listed if n.strip()), frozenset(settings), store
        )

    def problem(self, variable: str) -> str | None:
        """Why `variable` may not be read as a secret, or None."""
        by_prefix = bool(self.prefix) and variable.startswith(self.prefix)
        if variable in self.settings or (
            variable.startswith(_SETTINGS_PREFIX)
            and not (by_prefix and self.prefix.startswith(_SETTINGS_PREFIX))
        ):
            return f"environment variable {variable} is a setting of the orchestrator"
        if by_prefix or variable in self.names:
            return None
        allowed = f"start with {self.prefix} or be" if self.prefix else "be"
        return (
            f"environment variable {variable} may not be read as a secret: secret variables "
            f"{allowed} listed in STAVILY_SECRET_ENV_NAMES"
        )


def name_problem(name: str) -> str | None:
    """Why `name` cannot name a secret of the store, or None."""
    if _STORE_NAME.match(name):
        return None
    return (
        f"'{name}' is not a secret name: up to 100 letters, digits, '_', '.' or '-', "
        "starting with a letter or '_'"
    )


def reference_problems(refs: Mapping[str, Mapping[str, Any]], policy: SecretPolicy) -> list[dict]:
    """A workflow's `secrets:` checked at apply: each problem with its path."""
    problems = []
    for name, ref in refs.items():
        sources = [s for s in ("env", "store", "vault") if ref.get(s)]
        if len(sources) > 1:
            problems.append(
                {"path": f"secrets.{name}", "message": "a secret has one source: env or store"}
            )
        elif ref.get("env"):
            problem = policy.problem(str(ref["env"]))
            if problem:
                problems.append({"path": f"secrets.{name}.env", "message": problem})
        elif ref.get("vault"):
            problems.append(
                {
                    "path": f"secrets.{name}.vault",
                    "message": "vault secrets are not served yet: use env or store",
                }
            )
        elif not ref.get("store"):
            problems.append(
                {"path": f"secrets.{name}", "message": "a secret needs a source (env or store)"}
            )
    return problems


def new_nonce() -> str:
    return _random.token_hex(8)


def mark(nonce: str, name: str) -> str:
    return _MARK.format(nonce, name)


def marks(nonce: str, names: Iterable[str]) -> dict[str, str]:
    """What `secrets` is in a step's templates: each name's mark."""
    return {name: mark(nonce, name) for name in names}


def _value(name: str, ref: Mapping[str, Any], policy: SecretPolicy) -> str:
    if ref.get("store"):
        sealed = ref.get("sealed")
        if not sealed or policy.store is None:
            raise SecretUnavailable(f"secret '{name}' was not read from the secret store")
        try:
            return policy.store.open_copy(name, str(sealed))
        except ValueError as exc:
            raise SecretUnavailable(f"secret '{name}': {exc}") from exc
    variable = ref.get("env")
    if not variable:
        raise SecretUnavailable(f"secret '{name}' has no source this orchestrator can read")
    problem = policy.problem(str(variable))
    if problem:
        raise SecretUnavailable(f"secret '{name}': {problem}")
    value = os.environ.get(str(variable))
    if value is None:
        raise SecretUnavailable(
            f"secret '{name}' is not available: environment variable {variable} is not set "
            "on the orchestrator"
        )
    return value


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _replace_strings(value: Any, replace: Callable[[str], str], keys: bool = False) -> Any:
    if isinstance(value, str):
        return replace(value)
    if isinstance(value, dict):
        return {
            (replace(k) if keys and isinstance(k, str) else k): _replace_strings(v, replace, keys)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_replace_strings(v, replace, keys) for v in value]
    return value


def _used(value: Any, nonce: str, names: Iterable[str]) -> set[str]:
    """Which of `names` have their mark somewhere in `value`."""
    whole = marks(nonce, names)
    used: set[str] = set()
    for text in _strings(value):
        if _MARK_CHAR in text:
            used.update(name for name, secret_mark in whole.items() if secret_mark in text)
    return used


async def resolve(
    conn: AsyncConnection,
    value: Any,
    nonce: str,
    refs: Mapping[str, Mapping[str, Any]],
    policy: SecretPolicy,
    organization_id: str,
) -> tuple[dict[str, Any], dict[str, str]]:
    """A step's secrets as its instruction keeps them, from its rendered configuration:
    each store secret it uses read (one query) and sealed into its ref, those it does not
    use left out; and what was read, for the audit: its name in the store -> its id.
    SecretUnavailable if one it uses is not in the store. No read without a store secret."""
    stored = {name: ref for name, ref in refs.items() if ref.get("store")}
    if not stored:
        return dict(refs), {}
    used = _used(value, nonce, stored)
    kept = {name: ref for name, ref in refs.items() if name not in stored or name in used}
    if not used:
        return kept, {}
    if policy.store is None:
        raise SecretUnavailable("this orchestrator has no secret store")
    wanted = {name: str(stored[name]["store"]) for name in used}
    try:
        found = await policy.store.read(conn, organization_id, wanted.values())
    except ValueError as exc:
        raise SecretUnavailable(f"a secret of the store cannot be read: {exc}") from exc
    read: dict[str, str] = {}
    for name in sorted(used):
        if wanted[name] not in found:
            raise SecretUnavailable(
                f"secret '{name}' is not available: there is no secret '{wanted[name]}' in "
                "the secret store (stavily secret set)"
            )
        secret_id, secret = found[wanted[name]]
        kept[name] = {**stored[name], "sealed": policy.store.seal_copy(name, secret)}
        read[wanted[name]] = secret_id
    return kept, read


def check_rendered(
    value: Any, nonce: str, refs: Mapping[str, Mapping[str, Any]], policy: SecretPolicy
) -> None:
    """A step's rendered configuration, before it is queued: each secret it uses can be
    read now, and every mark is whole (a filter applied to a secret would change its
    mark, and the agent would get neither the value nor an error)."""
    whole = marks(nonce, refs)
    for text in _strings(value):
        if _MARK_CHAR not in text:
            continue
        for name, secret_mark in whole.items():
            if secret_mark in text:
                _value(name, refs[name], policy)
                text = text.replace(secret_mark, "")
        if _MARK_CHAR in text:
            raise SecretUnavailable(
                "a secret was changed by a template expression: insert it as it is, "
                "{{ secrets.NAME }}"
            )


def environment_names(configuration: Any, nonce: str, refs: Iterable[str]) -> list[str]:
    """The keys of `environment` in a step's configuration whose value is one secret, as
    it is: the agent passes these to the plugin (PLUGINS.md: an environment the agent
    decides, with the secrets the step references)."""
    environment = configuration.get("environment") if isinstance(configuration, dict) else None
    if not isinstance(environment, dict):
        return []
    whole = set(marks(nonce, refs).values())
    return sorted(str(k) for k, v in environment.items() if isinstance(v, str) and v in whole)


def reveal(
    value: Any, nonce: str | None, refs: Mapping[str, Mapping[str, Any]], policy: SecretPolicy
) -> Any:
    """What is handed to an agent: each mark replaced by its secret's value. A mark whose
    secret cannot be read (this replica lacks the variable) becomes empty: no mark ever
    reaches an agent."""
    if not refs or not nonce:
        return value
    whole = marks(nonce, refs)

    def replace(text: str) -> str:
        if _MARK_CHAR not in text:
            return text
        for name, secret_mark in whole.items():
            if secret_mark in text:
                try:
                    secret = _value(name, refs[name], policy)
                except SecretUnavailable:
                    secret = ""
                text = text.replace(secret_mark, secret)
        return text

    return _replace_strings(value, replace)


def _base64_cores(raw: bytes) -> Iterable[str]:
    """The base64 text that encodes `raw` wherever it starts in an encoded stream: for
    each of the three alignments, the characters that depend on `raw` alone."""
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + raw).decode()
        start, end = -(-8 * shift // 6), 8 * (shift + len(raw)) // 6
        core = encoded[start:end]
        yield core
        yield core.replace("+", "-").replace("/", "_")  # the URL-safe alphabet


@lru_cache(maxsize=1024)
def _forms(secret: str) -> tuple[str, ...]:
    """The value and the forms a plugin could easily print it in, longest first."""
    forms = {secret}
    if len(secret) >= _DERIVED_FROM:
        raw = secret.encode()
        forms.update(
            {
                secret[::-1],
                binascii.hexlify(raw).decode(),
                binascii.hexlify(raw).decode().upper(),
                quote(secret, safe=""),
                quote_plus(secret),
                json.dumps(secret)[1:-1],
                json.dumps(secret, ensure_ascii=False)[1:-1],
            }
        )
        forms.update(core for core in _base64_cores(raw) if len(core) >= _DERIVED_FROM)
    return tuple(sorted((f for f in forms if f), key=len, reverse=True))


def mask(value: Any, refs: Mapping[str, Mapping[str, Any]], policy: SecretPolicy) -> Any:
    """What an agent reports, before it is stored or shown: every secret of the step, in
    every form `_forms` knows, replaced by `***`."""
    if not refs:
        return value
    hidden: list[str] = []
    for name, ref in refs.items():
        try:
            secret = _value(name, ref, policy)
        except SecretUnavailable:
            continue
        if secret:
            hidden.extend(_forms(secret))
    if not hidden:
        return value
    hidden.sort(key=len, reverse=True)

    def replace(text: str) -> str:
        for form in hidden:
            if form in text:
                text = text.replace(form, MASK)
        return text

    return _replace_strings(value, replace, keys=True)
