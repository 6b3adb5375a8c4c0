"""How executions and their steps look through the API."""

from __future__ import annotations

from typing import Any

from stavily.timeutil import isoformat


def execution_view(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "workflow": row["workflow_name"],
        "workflow_version": row["workflow_version"],
        "status": row["status"],
        "inputs": row["inputs"],
        "trigger": row["trigger"],
        "error": row["error"],
        "created_by": row["created_by"],
        "created_at": isoformat(row["created_at"]),
        "finished_at": isoformat(row["finished_at"]),
        "deadline_at": isoformat(row["deadline_at"]),
        "reruns": row["reruns"],
    }


def step_view(row: Any, names: dict[str, str]) -> dict[str, Any]:
    spec = row["spec"]
    plugin = spec["plugin_id"] + (f"-v{spec['plugin_version']}" if spec["plugin_version"] else "")
    return {
        "name": row["name"],
        "stage": row["stage"],
        "plugin": plugin,
        "depends_on": row["depends_on"],
        "status": row["status"],
        "attempts": row["attempts"],
        "agent_id": row["agent_id"],
        "instruction_id": row["instruction_id"],
        "result": row["output"],
        "error": row["error"],
        "started_at": isoformat(row["started_at"]),
        "finished_at": isoformat(row["finished_at"]),
        "next_attempt_at": isoformat(row["next_attempt_at"]),
        "parent": names.get(row["parent_id"]) if row["parent_id"] else None,
        "item_index": row["item_index"],
    }
