"""The socket plugins talk back to the agent on: real Unix sockets, a blocking client written
like the plugins' published one, and raw clients for what a bad plugin could send."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from stavily.agent.rpc import MAX_LOG_MESSAGE, RunChannel, RunSocket, _bound_socket

CONFIG = {"threshold": 80, "alerts": {"email": "ops@example.com"}, "empty": None}

# The plugins' published client, per call: one connection, one request, one recv.
CLIENT = """
import json, socket

class RpcError(Exception):
    def __init__(self, code, message, data=None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.data = code, message, data

def call(path, method, params=None, request_id=1):
    request = {"jsonrpc": "2.0", "method": method, "id": request_id}
    if params:
        request["params"] = params
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.connect(path)
        sock.sendall((json.dumps(request) + "\\n").encode())
        response = json.loads(sock.recv(65536))
    finally:
        sock.close()
    if "error" in response:
        error = response["error"]
        raise RpcError(error["code"], error["message"], error.get("data"))
    return response["result"]
"""
_client: dict[str, Any] = {}
exec(CLIENT, _client)
RpcError: type[Exception] = _client["RpcError"]


async def call(path: Path, method: str, params: dict[str, Any] | None = None) -> Any:
    return await asyncio.to_thread(_client["call"], str(path), method, params)


async def rpc_error(path: Path, method: str, params: dict[str, Any] | None = None) -> Any:
    with pytest.raises(RpcError) as raised:
        await call(path, method, params)
    return raised.value


def _exchange(
    path: Path, data: bytes, answers: int, timeout: float, finish: bool
) -> tuple[list[Any], bool]:
    """Send `data` raw (then end the sending side when `finish`), read up to `answers` lines;
    also whether the server then closed the connection within `timeout`."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(path))
    try:
        if data:
            sock.sendall(data)
        if finish:
            sock.shutdown(socket.SHUT_WR)
        buffer = b""
        closed = False
        while buffer.count(b"\n") < answers:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                closed = True
                break
            buffer += chunk
        lines = [json.loads(line) for line in buffer.splitlines() if line.strip()]
        if not closed:
            try:
                closed = sock.recv(1) == b""
            except TimeoutError:
                closed = False
        return lines, closed
    finally:
        sock.close()


async def exchange(
    path: Path, data: bytes, answers: int = 1, timeout: float = 3.0, finish: bool = True
) -> tuple[list[Any], bool]:
    return await asyncio.to_thread(_exchange, path, data, answers, timeout, finish)


def line(message: Any) -> bytes:
    return (json.dumps(message) + "\n").encode()


@pytest.fixture
def folder() -> Iterator[Path]:
    """A short private folder: pytest's tmp_path can be longer than a socket path may be."""
    path = Path(tempfile.mkdtemp(prefix="stv-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Recorder:
    def __init__(self) -> None:
        self.logs: list[dict[str, Any]] = []
        self.triggers: list[tuple[str, dict[str, Any]]] = []

    def on_logs(self, entries: list[dict[str, Any]]) -> None:
        self.logs.extend(entries)

    def on_trigger(self, name: str, payload: dict[str, Any]) -> dict[str, Any]:
        if name == "unknown":
            raise ValueError("no such trigger: unknown")
        if name == "broken":
            raise RuntimeError("database is down")
        self.triggers.append((name, payload))
        return {"accepted": True, "duplicate": False}


@asynccontextmanager
async def running(folder: Path, **limits: Any) -> AsyncIterator[tuple[Path, Recorder, RunSocket]]:
    recorder = Recorder()
    channel = RunChannel(
        instruction_id="ins_1",
        agent_id="agt_1",
        agent_version="1.2.3",
        environment="production",
        config=CONFIG,
        on_logs=recorder.on_logs,
        on_trigger=recorder.on_trigger,
    )
    path = folder / "agent.sock"
    async with RunSocket(path, channel, **limits) as sock:
        yield path, recorder, sock


async def test_every_method_answers_the_published_client(folder: Path) -> None:
    async with running(folder) as (path, recorder, sock):
        assert await call(path, "ping") == {"pong": True}
        assert await call(path, "get_agent_info") == {
            "agent_id": "agt_1",
            "version": "1.2.3",
            "environment": "production",
        }
        assert await call(path, "get_config") == {"config": CONFIG}
        assert await call(path, "get_config", {"section": ""}) == {"config": CONFIG}
        assert await call(path, "get_config", {"section": "alerts"}) == {
            "config": {"email": "ops@example.com"}
        }
        assert await call(path, "get_config", {"section": "threshold"}) == {"config": 80}
        assert await call(path, "get_config", {"section": "nope"}) == {"config": {}}
        logs = [
            {"level": "INFO", "message": "starting", "timestamp": "2026-01-01T00:00:00Z"},
            {"level": "warn", "message": "x" * (MAX_LOG_MESSAGE + 100), "timestamp": 1.5},
            {"level": "debug", "message": "no time"},
        ]
        assert await call(path, "upload_logs", {"logs": logs}) == {"accepted": 3}
        assert await call(path, "upload_logs", {"logs": [], "instruction_id": "ins_1"}) == {
            "accepted": 0
        }
        assert await call(
            path, "report_trigger", {"trigger_name": "cpu_high", "payload": {"usage": 85}}
        ) == {"accepted": True, "duplicate": False}
        assert sock.stats.requests == 10
        assert sock.stats.errors == 0
    assert recorder.triggers == [("cpu_high", {"usage": 85})]
    first, long, timeless = recorder.logs
    assert first == {"level": "info", "message": "starting", "timestamp": "2026-01-01T00:00:00Z"}
    assert long["timestamp"] == 1.5
    assert long["message"].endswith("[truncated]")
    assert len(long["message"].encode()) <= MAX_LOG_MESSAGE
    assert isinstance(timeless["timestamp"], str) and timeless["timestamp"].endswith("Z")


async def test_socket_is_private_and_removed_on_close(folder: Path) -> None:
    async with running(folder) as (path, _, _):
        mode = path.stat().st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
    assert not path.exists()
    # and a later run can use the same path
    async with running(folder) as (path, _, _):
        assert await call(path, "ping") == {"pong": True}


def test_socket_is_0600_before_anyone_can_connect(folder: Path) -> None:
    path = folder / "agent.sock"
    sock = _bound_socket(path)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with pytest.raises(ConnectionRefusedError):
            client.connect(str(path))  # bound, not yet listening
        client.close()
        with pytest.raises(OSError):
            _bound_socket(path)  # never replaces an existing file
    finally:
        sock.close()


async def test_refuses_folders_others_can_write_and_long_paths(folder: Path) -> None:
    shared = folder / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    channel = RunChannel("i", "a", "v", "e", {}, lambda entries: None, lambda n, p: {})
    with pytest.raises(PermissionError):
        await RunSocket(shared / "agent.sock", channel).start()
    with pytest.raises(ValueError, match="too long"):
        await RunSocket(folder / ("x" * 120), channel).start()


async def test_a_separate_process_talks_to_it(folder: Path) -> None:
    script = CLIENT + (
        "import os\n"
        "path = os.environ['STAVILY_AGENT_SOCKET']\n"
        "call(path, 'ping')\n"
        "info = call(path, 'get_agent_info')\n"
        "section = call(path, 'get_config', {'section': 'alerts'})\n"
        "result = call(path, 'report_trigger', {'trigger_name': 'disk', 'payload': {'n': 1}})\n"
        "try:\n"
        "    call(path, 'nope')\n"
        "except RpcError as error:\n"
        "    code = error.code\n"
        "print(json.dumps([info, section, result, code]))\n"
    )
    async with running(folder) as (path, recorder, _):
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            script,
            env={
                **os.environ,
                "STAVILY_AGENT_SOCKET": str(path),
                "STAVILY_INSTRUCTION_ID": "ins_1",
            },
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 10)
    assert process.returncode == 0, err.decode()
    info, section, result, code = json.loads(out)
    assert info["agent_id"] == "agt_1"
    assert section == {"config": {"email": "ops@example.com"}}
    assert result == {"accepted": True, "duplicate": False}
    assert code == -32601
    assert recorder.triggers == [("disk", {"n": 1})]


async def test_parse_errors_and_invalid_requests(folder: Path) -> None:
    bad = [
        (b"{not json\n", -32700, None),
        (b'{"jsonrpc": "2.0", "method": "ping", "id": NaN}\n', -32700, None),
        (line([1, 2]), -32600, None),  # a batch of non-objects: two answers, checked below
        (line("ping"), -32600, None),
        (line({"method": "ping", "id": 1}), -32600, 1),
        (line({"jsonrpc": "1.0", "method": "ping", "id": 2}), -32600, 2),
        (line({"jsonrpc": "2.0", "id": 3}), -32600, 3),
        (line({"jsonrpc": "2.0", "method": 5, "id": 4}), -32600, 4),
        (line({"jsonrpc": "2.0", "method": "ping", "id": True}), -32600, None),
        (line({"jsonrpc": "2.0", "method": "ping", "id": {"a": 1}}), -32600, None),
        (line({"jsonrpc": "2.0", "method": "ping", "params": "x", "id": 5}), -32600, 5),
        (line({"jsonrpc": "2.0", "method": 7}), -32600, None),  # malformed: answered anyway
    ]
    async with running(folder) as (path, _, sock):
        for data, code, request_id in bad:
            answers, closed = await exchange(path, data)
            assert closed
            answer = answers[0]
            if isinstance(answer, list):
                assert [item["error"]["code"] for item in answer] == [code, code]
                continue
            assert answer["jsonrpc"] == "2.0"
            assert answer["error"]["code"] == code, data
            assert answer["id"] == request_id
        answers, _ = await exchange(path, line({"jsonrpc": "2.0", "method": "rm -rf", "id": 9}))
        assert answers[0]["error"] == {"code": -32601, "message": "method not found: 'rm -rf'"}
        assert answers[0]["id"] == 9
        assert await call(path, "ping") == {"pong": True}
        assert sock.stats.errors == len(bad) + 2  # the batch answered twice, plus rm -rf


@pytest.mark.parametrize(
    ("method", "params", "words"),
    [
        ("get_config", {"section": 5}, "section must be a string"),
        ("get_config", ["alerts"], "params must be an object"),
        ("upload_logs", {}, "logs must be an array"),
        ("upload_logs", {"logs": "hello"}, "logs must be an array"),
        ("upload_logs", {"logs": [{"level": "info", "message": "m"}] * 1001}, "limit 1000"),
        ("upload_logs", {"logs": ["hello"]}, "logs[0] must be an object"),
        ("upload_logs", {"logs": [{"message": "m"}]}, "logs[0].level must be a string"),
        ("upload_logs", {"logs": [{"level": "info", "message": 3}]}, "logs[0].message"),
        (
            "upload_logs",
            {"logs": [{"level": "info", "message": "m", "timestamp": True}]},
            "logs[0].timestamp must be a string or a number",
        ),
        (
            "upload_logs",
            {"logs": [], "instruction_id": "ins_2"},
            "instruction_id is not this run's",
        ),
        ("upload_logs", {"logs": [], "instruction_id": 7}, "instruction_id must be a string"),
        ("report_trigger", {"payload": {}}, "trigger_name must be a non-empty string"),
        ("report_trigger", {"trigger_name": " "}, "trigger_name must be a non-empty string"),
        ("report_trigger", {"trigger_name": 3}, "trigger_name must be a non-empty string"),
        ("report_trigger", {"trigger_name": "t" * 201}, "longer than 200"),
        ("report_trigger", {"trigger_name": "cpu", "payload": [1]}, "payload must be an object"),
        ("report_trigger", {"trigger_name": "unknown"}, "no such trigger: unknown"),
    ],
)
async def test_invalid_params(folder: Path, method: str, params: Any, words: str) -> None:
    async with running(folder) as (path, recorder, _):
        request = {"jsonrpc": "2.0", "method": method, "params": params, "id": "r"}
        answers, _ = await exchange(path, line(request))
        error = answers[0]["error"]
        assert error["code"] == -32602
        assert error["message"].startswith("invalid params: ")
        assert words in error["message"]
        assert answers[0]["id"] == "r"
    assert recorder.logs == [] and recorder.triggers == []


async def test_notifications_get_no_answer(folder: Path) -> None:
    async with running(folder) as (path, recorder, _):
        data = (
            line(
                {
                    "jsonrpc": "2.0",
                    "method": "upload_logs",
                    "params": {"logs": [{"level": "i", "message": "n"}]},
                }
            )
            + line({"jsonrpc": "2.0", "method": "nope"})
            + line(
                {"jsonrpc": "2.0", "method": "report_trigger", "params": {"trigger_name": "broken"}}
            )
            + line({"jsonrpc": "2.0", "method": "ping", "id": 42})
        )
        # answers come in order: one to a notification would come before the ping's
        answers, closed = await exchange(path, data, answers=1, timeout=1.0, finish=False)
        assert answers == [{"jsonrpc": "2.0", "result": {"pong": True}, "id": 42}]
        assert not closed  # still open for more, until the read timeout
    assert [entry["message"] for entry in recorder.logs] == ["n"]


async def test_several_requests_on_one_connection(folder: Path) -> None:
    async with running(folder) as (path, _, _):
        data = (
            b"".join(line({"jsonrpc": "2.0", "method": "ping", "id": n}) for n in range(3))
            + b'{"jsonrpc": "2.0", "method": "ping", "id": "last"}'
        )  # unterminated, then EOF
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(2)

        def talk() -> bytes:
            sock.connect(str(path))
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
            sock.close()
            return received

        received = await asyncio.to_thread(talk)
        ids = [json.loads(part)["id"] for part in received.splitlines()]
        assert ids == [0, 1, 2, "last"]


async def test_batches(folder: Path) -> None:
    async with running(folder) as (path, _, _):
        batch = [
            {"jsonrpc": "2.0", "method": "ping", "id": 1},
            {"jsonrpc": "2.0", "method": "ping"},  # a notification: no answer in the array
            {"jsonrpc": "2.0", "method": "get_config", "params": {"section": "threshold"}, "id": 2},
            {"jsonrpc": "2.0", "method": "nope", "id": 3},
            "junk",
        ]
        answers, _ = await exchange(path, line(batch))
        first, second, third, fourth = answers[0]
        assert first == {"jsonrpc": "2.0", "result": {"pong": True}, "id": 1}
        assert second["result"] == {"config": 80} and second["id"] == 2
        assert third["error"]["code"] == -32601 and third["id"] == 3
        assert fourth["error"]["code"] == -32600 and fourth["id"] is None

        answers, _ = await exchange(path, b"[]\n")
        assert answers[0]["error"]["code"] == -32600
        assert "empty batch" in answers[0]["error"]["message"]

        many = [{"jsonrpc": "2.0", "method": "ping", "id": n} for n in range(101)]
        answers, _ = await exchange(path, line(many))
        assert answers[0]["error"]["code"] == -32600
        assert "batch too large" in answers[0]["error"]["message"]

        # notifications only: nothing at all comes back
        answers, closed = await exchange(path, line([{"jsonrpc": "2.0", "method": "ping"}]))
        assert answers == [] and closed


async def test_oversized_message_then_new_connections_work(folder: Path) -> None:
    async with running(folder, max_message=1024) as (path, _, sock):
        big = {"jsonrpc": "2.0", "method": "ping", "id": 1, "params": {"pad": "x" * 5000}}
        answers, closed = await exchange(
            path, line(big) + line({"jsonrpc": "2.0", "method": "ping", "id": 2})
        )
        assert answers[0]["error"] == {
            "code": -32600,
            "message": "request too large (limit 1024 bytes)",
            "data": {"limit": 1024},
        }
        assert closed and len(answers) == 1
        # larger than the socket's buffers: the published client still reads the answer
        error = await rpc_error(path, "upload_logs", {"pad": "y" * 600_000})
        assert error.code == -32600
        # a line without end that grows past the limit
        answers, closed = await exchange(path, b"z" * 3000, finish=False)
        assert answers[0]["error"]["code"] == -32600 and closed
        assert await call(path, "ping") == {"pong": True}
        assert sock.stats.oversized == 3


async def test_connection_flood_beyond_max_connections(folder: Path) -> None:
    async with running(folder, max_connections=2, read_timeout=3) as (path, _, sock):
        held = []
        for n in range(2):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.settimeout(2)
            client.connect(str(path))
            held.append(client)

            def ping(client: socket.socket = client, n: int = n) -> Any:
                client.sendall(line({"jsonrpc": "2.0", "method": "ping", "id": n}))
                return json.loads(client.recv(65536))

            assert (await asyncio.to_thread(ping))["result"] == {"pong": True}
        error = await rpc_error(path, "ping")
        assert error.code == -32000
        assert error.message == "too many connections (limit 2), retry later"
        errors = await asyncio.gather(*(rpc_error(path, "ping") for _ in range(5)))
        assert {error.code for error in errors} == {-32000}
        held[0].close()
        await asyncio.sleep(0.1)
        assert await call(path, "ping") == {"pong": True}
        held[1].close()
        assert sock.stats.refused_connections == 6


async def test_request_flood_is_rate_limited_then_served_again(folder: Path) -> None:
    async with running(folder, rate=2, burst=5) as (path, _, sock):
        data = b"".join(line({"jsonrpc": "2.0", "method": "ping", "id": n}) for n in range(40))
        answers, _ = await exchange(path, data, answers=40)
        assert len(answers) == 40
        served = [answer for answer in answers if "result" in answer]
        limited = [answer for answer in answers if "error" in answer]
        assert [answer["id"] for answer in served[:5]] == [0, 1, 2, 3, 4]
        assert 5 <= len(served) <= 7
        assert len(limited) >= 33
        assert limited[0]["error"]["code"] == -32000
        assert limited[0]["error"]["message"].startswith("rate limited: ")
        assert limited[0]["id"] == 5
        assert limited[0]["error"]["data"]["retry_after"] > 0
        # a batch counts every request in it
        batch = [{"jsonrpc": "2.0", "method": "ping", "id": n} for n in range(3)]
        answers, _ = await exchange(path, line(batch))
        assert all(item["error"]["code"] == -32000 for item in answers[0])
        await asyncio.sleep(0.8)  # a token back, and a half
        assert await call(path, "ping") == {"pong": True}
        assert sock.stats.rate_limited >= 36


async def test_a_failing_callback_is_an_internal_error(folder: Path) -> None:
    async with running(folder) as (path, recorder, sock):
        error = await rpc_error(path, "report_trigger", {"trigger_name": "broken"})
        assert (error.code, error.message) == (-32603, "internal error")
        assert "database" not in error.message
        assert await call(path, "report_trigger", {"trigger_name": "ok"}) == {
            "accepted": True,
            "duplicate": False,
        }

        def bad_logs(entries: list[dict[str, Any]]) -> None:
            raise OSError("disk full")

        sock.channel.on_logs = bad_logs
        logs = {"logs": [{"level": "info", "message": "m"}]}
        assert (await rpc_error(path, "upload_logs", logs)).code == -32603
        sock.channel.on_trigger = lambda name, payload: {"value": float("nan")}
        error = await rpc_error(path, "report_trigger", {"trigger_name": "nan"})
        assert error.code == -32603
        assert await call(path, "ping") == {"pong": True}


async def test_async_callbacks_are_awaited(folder: Path) -> None:
    async with running(folder) as (path, _, sock):

        async def on_trigger(name: str, payload: dict[str, Any]) -> dict[str, Any]:
            await asyncio.sleep(0)
            return {"accepted": True, "name": name}

        sock.channel.on_trigger = on_trigger
        assert await call(path, "report_trigger", {"trigger_name": "t"}) == {
            "accepted": True,
            "name": "t",
        }


async def test_idle_and_slow_connections_are_dropped(folder: Path) -> None:
    async with running(folder, read_timeout=0.3) as (path, _, sock):
        started = time.monotonic()
        answers, closed = await exchange(path, b"", finish=False)
        assert answers == [] and closed
        assert time.monotonic() - started < 2
        # half a request, never finished
        answers, closed = await exchange(path, b'{"jsonrpc": "2.0", ', finish=False)
        assert answers == [] and closed
        assert sock.stats.timeouts == 2
        assert await call(path, "ping") == {"pong": True}


async def test_close_ends_open_connections(folder: Path) -> None:
    async with running(folder, read_timeout=30) as (path, _, _):
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(2)
        client.connect(str(path))
        await asyncio.sleep(0.05)
        started = time.monotonic()
    assert time.monotonic() - started < 2
    assert await asyncio.to_thread(client.recv, 10) == b""
    client.close()


async def test_a_client_that_never_reads_is_dropped(folder: Path) -> None:
    async with running(folder, read_timeout=0.3) as (path, _, sock):

        def flood() -> None:
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.settimeout(3)
            client.connect(str(path))
            request = line({"jsonrpc": "2.0", "method": "ping", "id": 1})
            try:
                for _ in range(100):
                    client.sendall(request * 100)
            except OSError:
                pass  # the server gave up on us
            time.sleep(1)  # holding the connection, reading nothing
            client.close()

        await asyncio.to_thread(flood)
        assert sock.stats.timeouts == 1  # the answers' drain timed out
        assert await call(path, "ping") == {"pong": True}
