"""The three ways published plugins speak (PLUGINS.md, "How plugins speak"), driven over a
started plugin process: one-shot runs that print their result (`--input` and flags), and
the older plugins' conversation of JSON lines on stdin.

Each turns what the plugin said into one result shape (docs/plugins.md, "Results"): a
mapping, the plugin's own, whichever agent ran it; a failure only from what the plugin
said or did (its exit status, `status: error`, `success: false`, no answer at all),
never a success read into silence."""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

# What a plugin may print as its result, and the longest answer line on stdin.
MAX_OUTPUT = 16 * 1024 * 1024
MAX_LOG_LINE = 8 * 1024
STDERR_KEPT = 64 * 1024
_FAILED = {"failed", "failure", "error"}
# After `stop`, how long a stdin plugin has to exit before its group is killed.
EXIT_GRACE = 5.0


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class RunLog:
    """An instruction's log as a run writes it: at most `limit` lines, each at most
    MAX_LOG_LINE characters, `changed` called after each so the agent can send it on
    while the plugin runs."""

    def __init__(
        self,
        lines: list[str] | None = None,
        changed: Callable[[], None] | None = None,
        limit: int = 5000,
    ) -> None:
        self.lines = lines if lines is not None else []
        self.changed = changed
        self.limit = limit
        self.dropped = 0

    def add(self, line: str) -> None:
        if len(self.lines) >= self.limit:
            self.dropped += 1
            return
        if len(line) > MAX_LOG_LINE:
            line = line[:MAX_LOG_LINE] + f"… ({len(line) - MAX_LOG_LINE} more characters)"
        self.lines.append(line)
        if self.changed is not None:
            self.changed()

    def note(self, message: str) -> None:
        """A line of the agent's own, with its time."""
        self.add(f"[{now()}] {message}")

    def close(self) -> None:
        if self.dropped:
            self.lines.append(
                f"[{now()}] {self.dropped} more log lines dropped (limit {self.limit})"
            )
            self.dropped = 0


@dataclass
class Said:
    """What a run's plugin said: success, the result, the failure's message."""

    success: bool
    output: Any = None
    error_message: str | None = None
    timed_out: bool = False


class PluginGone(Exception):
    """The plugin closed its output (or its input) before answering."""


class TooLarge(Exception):
    """The plugin printed more than MAX_OUTPUT."""


def parse_output(text: str) -> Any:
    """One JSON object becomes the result; anything else comes back as raw output."""
    try:
        value = json.loads(text.strip())
    except ValueError:
        return {"raw_output": text}
    return value if isinstance(value, dict) else {"raw_output": text}


def as_result(value: Any) -> dict[str, Any]:
    """A plugin's value as a result: a mapping as it is, anything else as its JSON text."""
    if isinstance(value, dict):
        return value
    return {"raw_output": json.dumps(value, ensure_ascii=False)}


class StderrPump:
    """A plugin's standard error, line by line into the run's log as it comes (its log,
    never its result), with the tail kept for the outcome."""

    def __init__(self, stream: asyncio.StreamReader, log: RunLog) -> None:
        self.log = log
        self.tail: collections.deque[str] = collections.deque(maxlen=1000)
        self.task = asyncio.create_task(self._pump(stream))

    def _emit(self, raw: bytes) -> None:
        text = raw.decode(errors="replace").rstrip("\r")
        self.tail.append(text)
        self.log.add(text)

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        pending = b""
        while chunk := await stream.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._emit(line)
            if len(pending) > MAX_LOG_LINE:  # a line without end: cut, not kept whole
                self._emit(pending)
                pending = b""
        if pending:
            self._emit(pending)

    async def finish(self) -> str:
        """Once the process is gone: the rest of its stderr (a second at most: a child
        that escaped the group may hold the pipe), and the kept tail."""
        try:
            await asyncio.wait_for(asyncio.shield(self.task), 1.0)
        except TimeoutError:
            self.task.cancel()
        text = "\n".join(self.tail)
        return text[-STDERR_KEPT:]


async def read_capped(stream: asyncio.StreamReader, cap: int = MAX_OUTPUT) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await stream.read(65536):
        size += len(chunk)
        if size > cap:
            raise TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def oneshot_result(protocol: str, text: str, exit_code: int) -> Said:
    """`--input` and flags plugins: what they printed is the result, a non-zero exit a
    failure. A flags plugin says `{"status": "success"|"partial"|"error", ...}`: its
    `error` is a failure, and printing nothing is no answer."""
    output = parse_output(text) if text.strip() or exit_code == 0 else None
    if exit_code != 0:
        return Said(False, output, f"exit status {exit_code}")
    if protocol == "flags":
        if not text.strip():
            return Said(False, None, "the plugin printed no result (a flags plugin prints JSON)")
        status = str(output.get("status") or "").lower()
        if status in _FAILED:
            message = output.get("message") or output.get("error") or "status: error"
            return Said(False, output, f"the plugin reported an error: {message}")
    return Said(True, output)


class Conversation:
    """The stdin protocol: one JSON command a line, one JSON answer a line (PLUGINS.md).

    The order that works with the published plugins: `initialize` with the config,
    `start`, then `execute_action` (actions, outputs) or `detect_triggers` (triggers,
    monitors), then `stop`. Each answer is waited for before the next command goes: a
    plugin whose `initialize` failed must not act with its defaults. Answers are read as
    they come: the agent runs Python plugins unbuffered (PYTHONUNBUFFERED=1)."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        log: RunLog,
        answer_timeout: float,
        deadline: float,
    ) -> None:
        assert process.stdin is not None and process.stdout is not None
        self.writer = process.stdin
        self.reader = process.stdout
        self.log = log
        self.answer_timeout = answer_timeout
        self.deadline = deadline

    async def ask(self, action: str, wait: float | None = None, **fields: Any) -> dict[str, Any]:
        """Send one command, return its answer. TimeoutError when none comes within `wait`
        seconds (the run's deadline at most); PluginGone when the plugin closed its output;
        TooLarge for an answer line over MAX_OUTPUT."""
        loop = asyncio.get_running_loop()
        line = json.dumps({"action": action, **fields}, separators=(",", ":"), default=str)
        try:
            self.writer.write(line.encode() + b"\n")
            await self.writer.drain()
        except (BrokenPipeError, ConnectionResetError):
            raise PluginGone from None
        until = self.deadline if wait is None else min(self.deadline, loop.time() + wait)
        async with asyncio.timeout_at(until):
            while True:
                try:
                    raw = await self.reader.readline()
                except ValueError:  # a line over the reader's limit
                    raise TooLarge from None
                if not raw:
                    raise PluginGone
                try:
                    answer = json.loads(raw)
                except ValueError:
                    self.log.add(raw.decode(errors="replace").rstrip())
                    continue
                if not isinstance(answer, dict):
                    self.log.note(
                        f"stdin: ignored an answer that is not a JSON object: {raw[:200]!r}"
                    )
                    continue
                said = answer.get("action")
                if said is not None and said != action:
                    self.log.note(
                        f"stdin: ignored an answer to '{said}' while waiting for '{action}'"
                    )
                    continue
                return answer

    async def run(self, kind: str, instruction_id: str, config: Any) -> Said:
        """initialize, start, the action (or trigger detection), stop; then stdin is closed
        and the plugin has EXIT_GRACE seconds to exit (the caller kills it after)."""
        failed = await self._open(config)
        if failed is not None:
            return failed
        if kind == "detect_triggers":
            said = await self._act("detect_triggers", {}, _triggers_result)
        else:
            request = {"action_request": {"id": instruction_id, "parameters": config}}
            said = await self._act("execute_action", request, _action_result)
        if said.timed_out:
            return said
        try:
            stopped = await self.ask("stop", min(self.answer_timeout, EXIT_GRACE))
            self.log.note("stdin: stop: " + (_refusal("stop", stopped) or "ok"))
        except (TimeoutError, PluginGone, TooLarge):
            self.log.note("stdin: stop: no answer")
        return said

    async def _open(self, config: Any) -> Said | None:
        """`initialize` with the config, then `start`: None once both succeeded."""
        for action, fields in (("initialize", {"config": config}), ("start", {})):
            try:
                answer = await self.ask(action, self.answer_timeout, **fields)
            except TimeoutError:
                late = asyncio.get_running_loop().time() >= self.deadline
                message = f"no answer to '{action}' within {self.answer_timeout:g}s"
                return Said(False, None, message, timed_out=late)
            refused = _refusal(action, answer)
            if refused:
                return Said(False, answer.get("data"), refused)
            self.log.note(f"stdin: {action}: ok")
        return None

    async def watch(self, config: Any, interval: float, report: Callable[[Any], None]) -> Said:
        """A trigger kept running (a watch): `initialize`, `start`, then `detect_triggers`
        every `interval` seconds, each event it answers reported, until the plugin dies
        (PluginGone) or the run is cancelled; a failed detection is logged, not fatal."""
        failed = await self._open(config)
        if failed is not None:
            return failed
        while True:
            try:
                answer = await self.ask("detect_triggers", self.answer_timeout)
            except TimeoutError:
                return Said(
                    False, None, f"no answer to 'detect_triggers' within {self.answer_timeout:g}s"
                )
            refused = _refusal("detect_triggers", answer)
            if refused:
                self.log.note(refused)
            else:
                for event in _triggers_result(answer).output["events"]:
                    report(event)
            await asyncio.sleep(interval)

    async def _act(
        self, action: str, fields: dict[str, Any], read: Callable[[dict[str, Any]], Said]
    ) -> Said:
        try:
            answer = await self.ask(action, **fields)
        except TimeoutError:  # the run's deadline: the caller says "timed out after …"
            return Said(False, None, f"no answer to '{action}'", timed_out=True)
        refused = _refusal(action, answer)
        if refused:
            return Said(False, answer.get("data"), refused)
        return read(answer)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (BrokenPipeError, ConnectionResetError):
            pass


def _refusal(action: str, answer: dict[str, Any]) -> str | None:
    """The outer answer's failure: `success` not true, with the plugin's `error`."""
    if answer.get("success") is True:
        return None
    error = answer.get("error") or "success: false"
    return f"the plugin answered '{action}' with a failure: {error}"


def _action_result(answer: dict[str, Any]) -> Said:
    """The inner result of `execute_action`: its `data`, a failure when it says so (a
    `status` of failed/error, `success: false`, or an `error` such as "Plugin is not
    running" with no status)."""
    data = answer.get("data")
    if data is None:
        return Said(False, None, "the plugin answered 'execute_action' with no result (no data)")
    if not isinstance(data, dict):
        return Said(True, as_result(data))
    status = str(data.get("status") or "").lower()
    failed = data.get("success") is False or status in _FAILED
    if failed or (data.get("error") and not status):
        message = data.get("error") or data.get("message") or f"status: {status or 'failed'}"
        return Said(False, data, f"the plugin's action failed: {message}")
    return Said(True, data)


def _triggers_result(answer: dict[str, Any]) -> Said:
    """`detect_triggers` answers an event, a list of them, or null: the result lists them."""
    data = answer.get("data")
    events = [] if data is None else data if isinstance(data, list) else [data]
    return Said(True, {"events": events})
