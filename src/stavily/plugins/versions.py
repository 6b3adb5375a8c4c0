"""Versions and ranges of plugins, as a workflow step names them (npm's semver ranges)."""

from __future__ import annotations

from typing import Annotated, Any

import semantic_version
from pydantic import AfterValidator, Field

LATEST = "latest"


def parse_range(text: str | None) -> semantic_version.NpmSpec | None:
    """`^1.2`, `~1.2.3`, `>=1.0.0 <2.0.0`, `1.x`, an exact version; None for latest.
    ValueError for anything else."""
    if text is None or text.strip() in ("", LATEST, "*"):
        return None
    try:
        return semantic_version.NpmSpec(text.strip())
    except ValueError:
        raise ValueError(
            f"'{text}' is not a version or range such as '1.2.0', '^1.2', '~1.2.3', "
            "'>=1.0.0 <2.0.0' or 'latest'"
        ) from None


def ordered(rows: list[Any]) -> list[Any]:
    """Versions (anything with `.version`), lowest first by semver precedence."""
    return sorted(rows, key=lambda r: semantic_version.Version(r.version))


def choose(versions: list[Any], wanted: str | None) -> Any | None:
    """The highest of `versions` (ordered, with `.version` and `.status`) that `wanted`
    (a version, a range, or None/latest) allows: never a yanked one, a deprecated one
    only when nothing active fits, a pre-release only when asked for."""
    spec = parse_range(wanted)
    fitting = [
        v
        for v in versions
        if v.status != "yanked"
        and (spec is None or spec.match(semantic_version.Version(v.version)))
    ]
    if spec is None:
        released = [v for v in fitting if not semantic_version.Version(v.version).prerelease]
        fitting = released or fitting
    active = [v for v in fitting if v.status == "active"]
    chosen = active or fitting
    return chosen[-1] if chosen else None


def _version_range(value: str | None) -> str | None:
    if value is not None:
        parse_range(value)
    return value


# A step's `version` (and a plugin reference's): a version, a range, or latest.
VersionRange = Annotated[
    str | None,
    Field(
        default=None, max_length=200, description="A version, a range (^1.2, ~1.2.3), or latest."
    ),
    AfterValidator(_version_range),
]
