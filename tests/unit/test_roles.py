"""Roles, permissions and the login lockout's back-off."""

from __future__ import annotations

from stavily.security import roles
from stavily.security.identities import MAX_LOCKOUT_SECONDS, LoginPolicy


def test_the_built_in_roles_are_made_of_the_catalog() -> None:
    for granted in roles.BUILTIN_ROLES.values():
        assert granted <= set(roles.PERMISSIONS)
    admin, operator = roles.BUILTIN_ROLES["admin"], roles.BUILTIN_ROLES["operator"]
    assert admin == set(roles.PERMISSIONS)
    assert roles.BUILTIN_ROLES["viewer"] < operator < admin
    assert roles.BUILTIN_ROLES["viewer"] < roles.BUILTIN_ROLES["auditor"]
    assert "audit:read" not in operator and "users:write" not in operator


def test_what_a_giver_lacks_is_named() -> None:
    viewer = roles.BUILTIN_ROLES["viewer"]
    assert roles.exceeding(["agents:read"], viewer) == []
    assert roles.exceeding(["agents:read", "audit:read", "users:write"], viewer) == [
        "audit:read",
        "users:write",
    ]
    assert roles.unknown_permissions(["agents:read", "agents:fly", "x"]) == ["agents:fly", "x"]


def test_lockouts_double_from_the_threshold_up_to_an_hour() -> None:
    policy = LoginPolicy(idle_seconds=60, max_seconds=600, lockout_after=3, lockout_seconds=30)
    assert [policy.lockout(n) for n in range(6)] == [0, 0, 0, 30, 60, 120]
    assert policy.lockout(50) == MAX_LOCKOUT_SECONDS
