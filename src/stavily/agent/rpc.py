"""The socket a running plugin talks back to the agent on: JSON-RPC 2.0, one request per line,
on a Unix socket named by STAVILY_AGENT_SOCKET (with STAVILY_INSTRUCTION_ID beside it).

A plugin may ask who the agent is (`ping`, `get_agent_info`), read its step's configuration
(`get_config`), add lines to its instruction's log (`upload_logs`) and report a trigger
(`report_trigger`). Everything arrives from code the agent does not trust, so every request is
checked, sizes and rates are bounded, and nothing a plugin sends can stop the server or block the
agent's event loop: a bad request gets an error answer, a bad connection gets closed.

The plugins' published client sends one request per connection and reads its answer with a
single `recv(65536)`: answers are kept small, except a `get_config` answer for a very large
configuration (over about 60 KiB), which is still sent whole but may not reach that client in
one piece.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import math
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog

log = structlog.get_logger("stavily.agent")

# Standard JSON-RPC 2.0 error codes, and the one server-defined code this server uses.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
BUSY = -32000  # rate limited or too many connections: retry later

MAX_BATCH = 100
MAX_LOG_ENTRIES = 1000
MAX_LOG_MESSAGE = 8 * 1024  # bytes of UTF-8 per log message
TRUNCATED = " …[truncated]"
MAX_LEVEL = 16
MAX_TIMESTAMP = 64
MAX_TRIGGER_NAME = 200
CONFIG_WARNING = 60 * 1024  # a get_config answer larger than this may not fit one recv(65536)
# sun_path holds 108 bytes on Linux, one of them the terminating NUL.
MAX_SOCKET_PATH = 107
_NAME_SHOWN = 64  # how much of an unknown method's name an error message repeats
_MAX_REFUSING = 64  # refused connections being answered at once; past that, just closed
_CLOSE_GRACE = 1.0  # seconds a refused connection has to finish sending before it is closed


@dataclass
class RunChannel:
    """What one plugin run may ask the agent, and where its logs and triggers go.

    `on_logs` gets validated, normalised entries (`level`, `message`, `timestamp`); `on_trigger`
    gets a trigger's name and payload and answers the plugin; a ValueError it raises is the
    plugin's fault (an invalid params answer with its message), anything else is the agent's (an
    internal error answer, logged). Both are called on the agent's event loop, so they must be
    quick and never block; either may be a coroutine function instead, and is then awaited.
    """

    instruction_id: str
    agent_id: str
    agent_version: str
    environment: str
    config: Any  # the step's config, a mapping usually
    on_logs: Callable[[list[dict[str, Any]]], None | Awaitable[None]]
    on_trigger: Callable[[str, dict[str, Any]], dict[str, Any] | Awaitable[dict[str, Any]]]


@dataclass
class RunSocketStats:
    """Counters of one run's socket, for the caller to log when the run ends."""

    connections: int = 0
    refused_connections: int = 0
    requests: int = 0
    errors: int = 0
    rate_limited: int = 0
    oversized: int = 0
    timeouts: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class _Invalid(Exception):
    """A JSON-RPC error to answer with: raised inside request handling, never out of it."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


@dataclass
class _TokenBucket:
    """`rate` requests a second on average, `burst` at once: a flood gets answers it can count
    on (rate limited) instead of the agent's time."""

    rate: float
    burst: int
    tokens: float = field(init=False)
    stamp: float = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = float(self.burst)
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def wait(self) -> float:
        """Seconds until the next token, for the error's data."""
        return round(max(0.0, 1.0 - self.tokens) / self.rate, 3)


def _error(code: int, message: str, request_id: Any = None, data: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "error": error, "id": request_id}


def _no_constants(name: str) -> Any:
    """NaN and Infinity are not JSON; Python's parser takes them unless told not to."""
    raise ValueError(f"{name} is not valid JSON")


def _kind(value: Any) -> str:
    """A value's JSON kind, for messages: never the value itself, which may be a secret."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int | float):
        return "a number"
    return f"a {type(value).__name__}"


def _valid_id(value: Any) -> bool:
    """JSON-RPC ids are strings, numbers or null (booleans are not numbers here)."""
    if value is None or isinstance(value, str):
        return True
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, float) and math.isfinite(value)


def _cap(text: str, limit: int) -> str:
    """`text` in at most `limit` bytes of UTF-8, marked when cut, never splitting a character."""
    raw = text.encode("utf-8", "replace")  # lone surrogates (JSON allows "\\ud800") become "?"
    if len(raw) <= limit:
        return raw.decode("utf-8")
    marker = TRUNCATED.encode()
    kept = raw[: limit - len(marker)].decode("utf-8", "ignore")
    return kept + TRUNCATED


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _object_params(params: Any) -> dict[str, Any]:
    """The methods take named params; none, null or an empty array mean no params."""
    if params is None or params == []:
        return {}
    if isinstance(params, dict):
        return params
    raise _Invalid(INVALID_PARAMS, "invalid params: params must be an object")


class RunSocket:
    """One per plugin run: an asyncio Unix server on `path`, in a folder the caller provides.

    The caller makes a private (0700) run folder and removes it afterwards; this class refuses a
    folder others may write to, since they could swap the socket. The socket is bound, chmod'ed
    0600 and only then listened on: until `listen` no client can connect, so there is no moment
    when a client could use it with looser permissions, and the process umask (shared by every
    thread) is never touched. The file is unlinked on close.

    Use as `async with RunSocket(path, channel) as sock:`; `sock.stats` has the counters.

    Limits: `max_message` bytes per request line (larger: one invalid request answer, then the
    connection is closed), `max_connections` at once (more: a busy answer, then closed),
    `read_timeout` seconds to send a whole line or to read an answer (else closed), and a token
    bucket of `rate` requests a second with bursts of `burst` for the whole run (over it: a busy
    answer per request, so a flood costs answers, not memory). A connection holds at most about
    2 x `max_message` of unread input (asyncio stops reading past that) and one answer being
    written.
    """

    def __init__(
        self,
        path: Path,
        channel: RunChannel,
        *,
        max_message: int = 1 << 20,
        max_connections: int = 32,
        read_timeout: float = 5.0,
        rate: float = 200.0,
        burst: int = 400,
    ) -> None:
        if max_message < 256:
            raise ValueError("max_message must be at least 256 bytes")
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if read_timeout <= 0 or rate <= 0 or burst < 1:
            raise ValueError("read_timeout and rate must be positive, burst at least 1")
        self.path = Path(path)
        self.channel = channel
        self.max_message = max_message
        self.max_connections = max_connections
        self.read_timeout = read_timeout
        self.stats = RunSocketStats()
        self._bucket = _TokenBucket(rate, burst)
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._active = 0
        self._refusing = 0
        self._methods: dict[str, Callable[[Any], Awaitable[Any]]] = {
            "ping": self._ping,
            "get_agent_info": self._get_agent_info,
            "get_config": self._get_config,
            "upload_logs": self._upload_logs,
            "report_trigger": self._report_trigger,
        }

    # -- life cycle --------------------------------------------------------------------------

    async def __aenter__(self) -> RunSocket:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Bind, restrict, then listen: the order is what keeps other users out."""
        if self._server is not None:
            raise RuntimeError("the run socket is already started")
        sock = _bound_socket(self.path)
        try:
            # create_unix_server calls listen(): only from then on may a client connect.
            self._server = await asyncio.start_unix_server(
                self._connection, sock=sock, limit=self.max_message
            )
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                self.path.unlink()
            raise

    async def close(self) -> None:
        """Stop listening, end the connections still open, remove the socket file."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    # -- connections -------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One client connection: never lets anything out, so the server goes on regardless."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            if self._active >= self.max_connections:
                await self._refuse(reader, writer)
            else:
                self._active += 1
                self.stats.connections += 1
                try:
                    await self._serve(reader, writer)
                finally:
                    self._active -= 1
        except asyncio.CancelledError:
            raise
        except OSError:  # ConnectionError, TimeoutError: the client went away or stalled
            pass
        except Exception:
            log.exception("plugin socket connection failed", instruction_id=self._instruction)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            if task is not None:
                self._tasks.discard(task)

    @property
    def _instruction(self) -> str:
        return self.channel.instruction_id

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection too many: a busy answer, then closed. The client may still be sending
        its request; it gets a moment to finish so that it reads the answer instead of a broken
        pipe. Refusals in progress are bounded too: past that, closed without a word."""
        self.stats.refused_connections += 1
        if self._refusing >= max(_MAX_REFUSING, self.max_connections):
            return
        self._refusing += 1
        try:
            answer = _error(
                BUSY,
                f"too many connections (limit {self.max_connections}), retry later",
                data={"limit": self.max_connections},
            )
            self.stats.errors += 1
            await self._write(writer, answer)
            await self._discard(reader, min(self.read_timeout, _CLOSE_GRACE))
        finally:
            self._refusing -= 1

    async def _discard(self, reader: asyncio.StreamReader, seconds: float) -> None:
        """Read and drop what the client still sends, until it is done, time is up or enough
        has been dropped: so its send completes and it can read the answer it was given."""
        budget = max(4 * self.max_message, 1 << 20)
        deadline = asyncio.get_running_loop().time() + seconds
        loop = asyncio.get_running_loop()
        while budget > 0:
            left = deadline - loop.time()
            if left <= 0:
                return
            try:
                chunk = await asyncio.wait_for(reader.read(65536), left)
            except OSError:  # TimeoutError, ConnectionError
                return
            if not chunk:
                return
            budget -= len(chunk)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Requests, one a line, until the client is done, stalls or sends too much."""
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), self.read_timeout)
            except TimeoutError:
                self.stats.timeouts += 1
                return
            except ValueError:  # the StreamReader's limit: LimitOverrunError, turned ValueError
                self.stats.oversized += 1
                self.stats.errors += 1
                answer = _error(
                    INVALID_REQUEST,
                    f"request too large (limit {self.max_message} bytes)",
                    data={"limit": self.max_message},
                )
                await self._write(writer, answer)
                await self._discard(reader, min(self.read_timeout, _CLOSE_GRACE))
                return
            if not line:
                return  # EOF
            if line.strip():
                answer = await self._answer(line)
                if answer is not None:
                    await self._write(writer, answer)
            if not line.endswith(b"\n"):
                return  # the last, unterminated line before EOF: served leniently

    async def _write(self, writer: asyncio.StreamWriter, answer: Any) -> None:
        """One line, one write, then drain: a client that does not read is dropped at the
        timeout instead of holding the answer in memory for ever."""
        writer.write((json.dumps(answer) + "\n").encode())
        try:
            await asyncio.wait_for(writer.drain(), self.read_timeout)
        except TimeoutError:
            self.stats.timeouts += 1
            raise

    # -- requests ----------------------------------------------------------------------------

    async def _answer(self, line: bytes) -> Any:
        """The answer to one line: an object, an array for a batch, or None when nothing is due
        (notifications only)."""
        try:
            message = json.loads(line, parse_constant=_no_constants)
        except (ValueError, RecursionError):
            self.stats.requests += 1
            if not self._bucket.take():
                return self._rate_limited(None)
            self.stats.errors += 1
            return _error(PARSE_ERROR, "parse error: the request is not valid JSON")
        if isinstance(message, list):
            if not 1 <= len(message) <= MAX_BATCH:
                self.stats.requests += 1
                if not self._bucket.take():
                    return self._rate_limited(None)
                self.stats.errors += 1
                text = "empty batch" if not message else f"batch too large (limit {MAX_BATCH})"
                return _error(INVALID_REQUEST, f"invalid request: {text}")
            answers = [await self._one(item) for item in message]
            kept = [answer for answer in answers if answer is not None]
            return kept or None
        return await self._one(message)

    def _rate_limited(self, request_id: Any) -> dict[str, Any]:
        self.stats.rate_limited += 1
        self.stats.errors += 1
        rate = self._bucket.rate
        return _error(
            BUSY,
            f"rate limited: more than {rate:g} requests a second, retry later",
            request_id,
            data={"retry_after": self._bucket.wait()},
        )

    async def _one(self, request: Any) -> dict[str, Any] | None:
        """One request object's answer, or None for a notification."""
        self.stats.requests += 1
        notification = isinstance(request, dict) and "id" not in request
        request_id = request.get("id") if isinstance(request, dict) else None
        if not _valid_id(request_id):
            request_id = None
        if not self._bucket.take():
            return None if notification else self._rate_limited(request_id)
        try:
            method, params = self._check(request)
            handler = self._methods.get(method)
            if handler is None:
                shown = method if len(method) <= _NAME_SHOWN else method[:_NAME_SHOWN] + "…"
                raise _Invalid(METHOD_NOT_FOUND, f"method not found: {shown!r}")
            result = await handler(params)
            answer = {"jsonrpc": "2.0", "result": result, "id": request_id}
            json.dumps(answer, allow_nan=False)  # an unsendable result is the agent's error
        except _Invalid as invalid:
            self.stats.errors += 1
            # A malformed request is answered even without an id: it is no notification.
            if notification and invalid.code != INVALID_REQUEST:
                return None
            return _error(invalid.code, invalid.message, request_id, invalid.data)
        except Exception:
            log.exception(
                "plugin socket request failed",
                instruction_id=self._instruction,
                method=request.get("method") if isinstance(request, dict) else None,
            )
            self.stats.errors += 1
            return None if notification else _error(INTERNAL_ERROR, "internal error", request_id)
        return None if notification else answer

    def _check(self, request: Any) -> tuple[str, Any]:
        """The method and params of a well-formed request; _Invalid for anything else."""
        if not isinstance(request, dict):
            raise _Invalid(
                INVALID_REQUEST, f"invalid request: a request is an object, not {_kind(request)}"
            )
        if request.get("jsonrpc") != "2.0":
            raise _Invalid(INVALID_REQUEST, 'invalid request: "jsonrpc" must be "2.0"')
        if "id" in request and not _valid_id(request["id"]):
            raise _Invalid(
                INVALID_REQUEST,
                f'invalid request: "id" must be a string, a number or null, not '
                f"{_kind(request['id'])}",
            )
        method = request.get("method")
        if not isinstance(method, str):
            raise _Invalid(
                INVALID_REQUEST, f'invalid request: "method" must be a string, not {_kind(method)}'
            )
        params = request.get("params")
        if params is not None and not isinstance(params, dict | list):
            raise _Invalid(
                INVALID_REQUEST,
                f'invalid request: "params" must be an object or an array, not {_kind(params)}',
            )
        return method, params

    # -- methods -----------------------------------------------------------------------------

    async def _ping(self, params: Any) -> dict[str, Any]:
        return {"pong": True}

    async def _get_agent_info(self, params: Any) -> dict[str, Any]:
        channel = self.channel
        return {
            "agent_id": channel.agent_id,
            "version": channel.agent_version,
            "environment": channel.environment,
        }

    async def _get_config(self, params: Any) -> dict[str, Any]:
        """The step's config: all of it for no section or "", one top-level key's value for a
        section, and {} for a section the config does not have (the client treats a missing
        section as empty, so an error would only make plugins handle one more case)."""
        args = _object_params(params)
        section = args.get("section")
        if section is not None and not isinstance(section, str):
            raise _Invalid(
                INVALID_PARAMS, f"invalid params: section must be a string, not {_kind(section)}"
            )
        config = self.channel.config
        if not section:
            value = config if config is not None else {}
        elif isinstance(config, Mapping) and section in config:
            value = config[section]
        else:
            value = {}
        result = {"config": value}
        size = len(json.dumps(result))
        if size > CONFIG_WARNING:
            log.warning(
                "plugin config answer is larger than one read of the published client",
                instruction_id=self._instruction,
                size=size,
            )
        return result

    async def _upload_logs(self, params: Any) -> dict[str, Any]:
        args = _object_params(params)
        self._check_instruction(args)
        logs = args.get("logs")
        if not isinstance(logs, list):
            raise _Invalid(
                INVALID_PARAMS, f"invalid params: logs must be an array, not {_kind(logs)}"
            )
        if len(logs) > MAX_LOG_ENTRIES:
            raise _Invalid(
                INVALID_PARAMS,
                f"invalid params: logs has {len(logs)} entries (limit {MAX_LOG_ENTRIES} per call)",
            )
        entries = [_log_entry(index, entry) for index, entry in enumerate(logs)]
        if entries:
            await _call(self.channel.on_logs, entries)
        return {"accepted": len(entries)}

    def _check_instruction(self, args: dict[str, Any]) -> None:
        """A plugin may name its instruction; it may not name another one."""
        if "instruction_id" not in args or args["instruction_id"] is None:
            return
        given = args["instruction_id"]
        if not isinstance(given, str):
            raise _Invalid(
                INVALID_PARAMS,
                f"invalid params: instruction_id must be a string, not {_kind(given)}",
            )
        if given != self.channel.instruction_id:
            raise _Invalid(INVALID_PARAMS, "invalid params: instruction_id is not this run's")

    async def _report_trigger(self, params: Any) -> Any:
        args = _object_params(params)
        name = args.get("trigger_name")
        if not isinstance(name, str) or not name.strip():
            raise _Invalid(
                INVALID_PARAMS, "invalid params: trigger_name must be a non-empty string"
            )
        if len(name) > MAX_TRIGGER_NAME:
            raise _Invalid(
                INVALID_PARAMS,
                f"invalid params: trigger_name is longer than {MAX_TRIGGER_NAME} characters",
            )
        payload = args.get("payload", {})
        if payload is None:
            payload = {}
        if not isinstance(payload, dict):
            raise _Invalid(
                INVALID_PARAMS, f"invalid params: payload must be an object, not {_kind(payload)}"
            )
        try:
            return await _call(self.channel.on_trigger, name, payload)
        except ValueError as refused:
            raise _Invalid(INVALID_PARAMS, _cap(f"invalid params: {refused}", 1024)) from None


def _bound_socket(path: Path) -> socket.socket:
    """A Unix socket bound to `path` and chmod'ed 0600, not yet listening: connecting to it is
    refused until then, so nobody can use it before its mode is right."""
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH:
        raise ValueError(
            f"socket path too long ({size} bytes, limit {MAX_SOCKET_PATH}): "
            "use a shorter run folder"
        )
    if path.parent.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        # Others could remove the socket and put their own in its place.
        raise PermissionError(f"the socket's folder {path.parent} is writable by others")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.bind(os.fspath(path))  # fails when the path exists: never someone else's socket
    except BaseException:
        sock.close()
        raise
    try:
        os.chmod(path, 0o600)
    except BaseException:
        sock.close()
        path.unlink(missing_ok=True)
        raise
    return sock


async def _call(callback: Callable[..., Any], *args: Any) -> Any:
    """A callback's result, awaited when it is a coroutine's."""
    result = callback(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


def _log_entry(index: int, entry: Any) -> dict[str, Any]:
    """One checked log entry: level lower case (info when blank), message capped, timestamp the
    plugin's or, when it gave none, the time the agent got it."""
    where = f"logs[{index}]"
    if not isinstance(entry, dict):
        raise _Invalid(
            INVALID_PARAMS, f"invalid params: {where} must be an object, not {_kind(entry)}"
        )
    level, message = entry.get("level"), entry.get("message")
    if not isinstance(level, str):
        raise _Invalid(
            INVALID_PARAMS, f"invalid params: {where}.level must be a string, not {_kind(level)}"
        )
    if not isinstance(message, str):
        raise _Invalid(
            INVALID_PARAMS,
            f"invalid params: {where}.message must be a string, not {_kind(message)}",
        )
    timestamp = entry.get("timestamp")
    if timestamp is None:
        timestamp = _now()
    elif isinstance(timestamp, bool) or not isinstance(timestamp, str | int | float):
        raise _Invalid(
            INVALID_PARAMS,
            f"invalid params: {where}.timestamp must be a string or a number, not "
            f"{_kind(timestamp)}",
        )
    elif isinstance(timestamp, str):
        timestamp = timestamp[:MAX_TIMESTAMP]
    return {
        "level": _cap(level.strip().lower()[:MAX_LEVEL], 4 * MAX_LEVEL) or "info",
        "message": _cap(message, MAX_LOG_MESSAGE),
        "timestamp": timestamp,
    }
