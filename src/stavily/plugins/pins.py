"""A workflow's steps pinned to plugin versions when it is applied.

Each step's `plugin` (and `version`: a version, a range or latest) is resolved against
the registry once, at apply; the version chosen, its digest and what the orchestrator
needs to build the step's instructions (entry point, protocol, flags, time limit, git
source) are kept with the workflow version. A run never resolves again: publishing
1.3.0 changes nothing for a workflow pinned to 1.2.0 until it is applied again."""

from __future__ import annotations

import difflib
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from stavily import offload
from stavily.errors import InvalidInput
from stavily.plugins.manifest import config_problems, flag_of
from stavily.plugins.versions import choose, ordered
from stavily.store.models import plugin_versions
from stavily.workflows.definition import STAGES, Step, WorkflowDefinition, parse_duration


def pin_of(row: Any) -> dict[str, Any]:
    """What a step's instructions are built from (orchestration), from a version's row."""
    manifest = row.manifest
    limit = (manifest.get("limits") or {}).get("execution_time")
    pin: dict[str, Any] = {
        "version": row.version,
        "sha256": row.sha256,
        "entry_point": manifest["runtime"]["entry_point"],
        "protocol": row.protocol,
        "socket": bool(row.socket),
        "execution_time": max(1, round(parse_duration(limit))) if limit is not None else None,
        "source": row.source,
    }
    if row.protocol == "flags":
        pin["flags"] = {
            name: {"flag": flag_of(name, setting), "type": setting.get("type", "string")}
            for name, setting in (manifest.get("configuration") or {}).items()
        }
    return pin


def _steps(definition: WorkflowDefinition) -> list[tuple[str, Step]]:
    found = []
    for stage_name in STAGES:
        stage = getattr(definition, stage_name)
        for index, step in enumerate(stage.steps if stage else []):
            found.append((f"{stage_name}.steps[{index}]", step))
    return found


async def pin_steps(
    conn: AsyncConnection, organization_id: str, definition: WorkflowDefinition, unregistered: str
) -> dict[str, dict[str, Any]]:
    """Each step's pin, by step name; InvalidInput with every problem (an unknown plugin,
    no version satisfying the range, a config the plugin's schema refuses). A plugin the
    registry does not have is skipped when `unregistered` is `allow`."""
    steps = _steps(definition)
    wanted = sorted({step.plugin.id for _, step in steps})
    rows = (
        await conn.execute(
            sa.select(plugin_versions).where(
                plugin_versions.c.organization_id == organization_id,
                plugin_versions.c.plugin_id.in_(wanted),
            )
        )
    ).all()
    known: list[str] = []
    if unregistered != "allow" and set(wanted) - {r.plugin_id for r in rows}:
        # for "did you mean"
        every = (
            sa.select(plugin_versions.c.plugin_id)
            .distinct()
            .where(plugin_versions.c.organization_id == organization_id)
        )
        known = list((await conn.execute(every)).scalars())
    by_plugin: dict[str, list[Any]] = {}
    for row in rows:
        by_plugin.setdefault(row.plugin_id, []).append(row)
    return await offload.run(_pin, steps, by_plugin, known, unregistered)


def _pin(
    steps: list[tuple[str, Step]],
    by_plugin: dict[str, list[Any]],
    known: list[str],
    unregistered: str,
) -> dict[str, dict[str, Any]]:
    problems: list[dict[str, str]] = []
    pins: dict[str, dict[str, Any]] = {}
    versions = {plugin_id: ordered(rows) for plugin_id, rows in by_plugin.items()}
    for path, step in steps:
        plugin_id = step.plugin.id
        rows = versions.get(plugin_id)
        if not rows:
            if unregistered == "allow":
                continue
            close = difflib.get_close_matches(plugin_id, known, n=1, cutoff=0.6)
            hint = (
                f": did you mean `{close[0]}`?"
                if close
                else ": publish it first (stavily plugin publish)"
            )
            problems.append(
                {
                    "path": f"{path}.plugin",
                    "message": f"the registry has no plugin '{plugin_id}'{hint}",
                }
            )
            continue
        chosen = choose(rows, step.plugin_range)
        if chosen is None:
            published = ", ".join(
                v.version + ("" if v.status == "active" else f" ({v.status})") for v in rows
            )
            where = "version" if step.version else "plugin"
            problems.append(
                {
                    "path": f"{path}.{where}",
                    "message": f"no usable version of '{plugin_id}' satisfies "
                    f"'{step.plugin_range}': published {published}",
                }
            )
            continue
        configuration = chosen.manifest.get("configuration") or {}
        problems.extend(config_problems(step.config, configuration, f"{path}.config"))
        pins[step.name] = pin_of(chosen)
    if problems:
        raise InvalidInput("the workflow's plugins were refused", problems)
    return pins
