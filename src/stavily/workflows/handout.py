"""What passes between the engine and an agent: the instruction as the agent is handed it
(AGENT_API.md, secrets revealed), and what an agent's result says (its output, whether
it timed out)."""

from __future__ import annotations

from typing import Any

from stavily.security import secrets
from stavily.security.secrets import SecretPolicy

# What an agent's result status may say: the step completed, or failed.
COMPLETED = {"completed", "success", "succeeded"}
FAILED = {"failed", "failure", "error", "timeout", "timed_out"}


def step_output(report: dict[str, Any]) -> Any:
    """What a step produced: official agents wrap it in `execution_result.output_data`;
    our agent may send the plugin's output as `result` itself."""
    result = report.get("result")
    if isinstance(result, dict):
        wrapped = result.get("execution_result")
        if isinstance(wrapped, dict) and "output_data" in wrapped:
            return wrapped["output_data"]
    return result


_TIMED_OUT = {"timeout", "timed_out"}


def timed_out(report: dict[str, Any]) -> bool:
    """A failure the agent reports as its plugin overrunning the step's timeout: by its
    status (`timeout`), or in our agent's words ("timed out after 30s")."""
    message = str(report.get("error_message") or "")
    return report.get("status") in _TIMED_OUT or message.startswith("timed out")


# where secrets come from, and a flags plugin's config (kept for its retries)
_UNSHOWN_CONTEXT = ("secrets", "secret_nonce", "config")


def instruction_payload(row: Any, policy: SecretPolicy) -> dict[str, Any]:
    """An instruction as AGENT_API.md fixes it, plus fields old agents ignore; secrets
    revealed (security.secrets), and where they come from left out."""
    context = row.context or {}
    refs, nonce = context.get("secrets") or {}, context.get("secret_nonce")
    if refs or "config" in context:
        context = {k: v for k, v in context.items() if k not in _UNSHOWN_CONTEXT}
    configuration = row.plugin_configuration
    if isinstance(configuration, dict) and configuration.get("protocol") == "flags":
        # A flags plugin never reads it, and an agent that passes `--input` whenever
        # there is a context would break it: only what the agent itself uses.
        context = {k: v for k, v in context.items() if k == "secret_environment"}
    return {
        "id": row.id,
        "plugin_id": row.plugin_id,
        "instruction_type": row.instruction_type,
        "plugin_configuration": secrets.reveal(row.plugin_configuration, nonce, refs, policy),
        "input_data": secrets.reveal(row.input_data, nonce, refs, policy),
        "timeout_seconds": int(row.timeout_seconds),
        "max_retries": int(row.max_retries),
        "correlation_id": row.correlation_id,
        "attempt": int(row.attempt),
        "context": context,
    }
