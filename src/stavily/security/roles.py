"""Permissions and roles: what a token may do.

A permission is `resource:action`. A role is a set of them: the four built-in roles
below, or a custom role an organization defines (`roles` table) from the same catalog.
A role the server does not know - a custom role deleted while tokens still named it, a
typo written straight into the database - grants nothing: every route declares the
permission it needs (`api.deps.permitted`), and a role without it is refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# Every permission there is, with what it allows: the catalog custom roles pick from.
PERMISSIONS: dict[str, str] = {
    "agents:read": "see agents, enrollment tokens and the fleet",
    "agents:write": "register, enroll, drain, revoke agents and rotate their keys",
    "workflows:read": "see workflows, their versions, webhooks and schedules",
    "workflows:write": "apply and delete workflows, webhooks and schedules",
    "executions:read": "see executions, their steps, logs and events",
    "executions:run": "run workflows, send events, cancel and rerun executions",
    "plugins:read": "see plugins, their versions, keys and rollouts",
    "plugins:write": "publish plugins, pin versions and roll them out",
    "secrets:read": "see the names of stored secrets (never their values)",
    "secrets:write": "store, replace and delete secrets and rotate their key",
    "secrets:use": "apply workflows that use secrets (their steps are handed the values)",
    "audit:read": "read the audit log",
    "metrics:read": "read the organization's metrics (`GET /metrics`, for Prometheus)",
    "tokens:read": "see the organization's API tokens and sessions",
    "tokens:write": "create and revoke API tokens",
    "users:read": "see the organization's users",
    "users:write": "add, change and remove users",
    "roles:read": "see roles",
    "roles:write": "define and delete custom roles",
    "organizations:read": "see the organizations one belongs to",
    "organizations:write": "create and rename organizations",
}

_READ = frozenset(
    {
        "agents:read",
        "workflows:read",
        "executions:read",
        "plugins:read",
        "metrics:read",
        "roles:read",
        "organizations:read",
    }
)
BUILTIN_ROLES: dict[str, frozenset[str]] = {
    "admin": frozenset(PERMISSIONS),
    "operator": _READ | {"workflows:write", "executions:run", "secrets:read", "secrets:use"},
    "viewer": _READ,
    "auditor": _READ | {"audit:read"},
}
ROLE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")


def builtin(role: str) -> frozenset[str] | None:
    return BUILTIN_ROLES.get(role)


def unknown_permissions(permissions: Iterable[str]) -> list[str]:
    return sorted(p for p in set(permissions) if p not in PERMISSIONS)


def exceeding(granted: Iterable[str], held: frozenset[str]) -> list[str]:
    """What of `granted` the holder of `held` does not have: no one hands out more than
    they may do themselves."""
    return sorted(set(granted) - held)
