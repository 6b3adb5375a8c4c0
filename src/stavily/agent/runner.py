"""The agent loop: heartbeats on one timer, long polls on another, one instruction at a time."""

from __future__ import annotations

import asyncio
import contextlib
import platform
import signal
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import structlog

from stavily import __version__
from stavily.agent.plugins import run_plugin

log = structlog.get_logger("stavily.agent")
# Answers after which a report is final: retrying cannot change them.
_FINAL_STATUSES = {200, 400, 401, 403, 404, 409, 413, 422}


@dataclass
class AgentConfig:
    url: str
    agent_id: str
    token: str
    plugins_dir: Path
    heartbeat_interval: float = 30
    poll_wait: float = 25
    result_retry_seconds: float = 600


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        token = config.token.removeprefix("Bearer ").strip()
        self.client = httpx.AsyncClient(
            base_url=config.url.rstrip("/"),
            headers={
                "Authorization": f"Bearer {token}",
                "Accept": "application/json",
                "Content-Type": "application/json",
                "User-Agent": f"Stavily-Agent/{__version__} (stavily-python)",
            },
            timeout=httpx.Timeout(config.poll_wait + 15, connect=5),
        )
        self.base = f"/agents/v1/{config.agent_id}"
        self.stopping = asyncio.Event()
        self.running: set[str] = set()

    def stop(self) -> None:
        if not self.stopping.is_set():
            log.info("stopping after the running instruction")
            self.stopping.set()

    async def run(self) -> int:
        beats = asyncio.create_task(self._heartbeat_loop())
        try:
            await self._poll_loop()
        finally:
            beats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beats
            await self._heartbeat("offline")
            await self.client.aclose()
        return 0

    async def _heartbeat(self, status: str) -> None:
        body = {
            "timestamp": _now(),
            "status": status,
            "version": __version__,
            "hostname": socket.gethostname(),
            "os": platform.system().lower(),
        }
        try:
            response = await self.client.post(f"{self.base}/heartbeat", json=body, timeout=10)
            if response.status_code not in (200, 204):
                log.warning("heartbeat refused", status=response.status_code)
        except httpx.HTTPError as exc:
            log.warning("heartbeat failed", error=str(exc))

    async def _heartbeat_loop(self) -> None:
        while True:
            await self._heartbeat("online")
            await asyncio.sleep(self.config.heartbeat_interval)

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    async def _poll_loop(self) -> None:
        failures = 0
        while not self.stopping.is_set():
            poll = asyncio.create_task(
                self.client.get(f"{self.base}/instructions", params={"wait": self.config.poll_wait})
            )
            stop = asyncio.create_task(self.stopping.wait())
            done, _ = await asyncio.wait({poll, stop}, return_when=asyncio.FIRST_COMPLETED)
            if poll not in done:
                # Stopping mid-poll: the offline heartbeat hands back anything leased meanwhile.
                poll.cancel()
                with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                    await poll
                return
            stop.cancel()
            try:
                response = poll.result()
            except httpx.HTTPError as exc:
                failures += 1
                log.warning("poll failed", error=str(exc))
                await self._sleep_unless_stopping(min(30, 2 ** min(failures, 5)))
                continue
            if response.status_code != 200:
                failures += 1
                log.warning("poll refused", status=response.status_code, body=response.text[:300])
                await self._sleep_unless_stopping(min(30, 2 ** min(failures, 5)))
                continue
            failures = 0
            instruction = response.json().get("instruction")
            if instruction:
                await self.execute(instruction)

    async def execute(self, instruction: dict[str, Any]) -> None:
        self.running.add(instruction["id"])
        try:
            await self._execute(instruction)
        finally:
            self.running.discard(instruction["id"])

    async def _execute(self, instruction: dict[str, Any]) -> None:
        instruction_id = instruction["id"]
        bound = log.bind(instruction_id=instruction_id, plugin_id=instruction.get("plugin_id"))
        execution_log = [f"[{_now()}] Instruction received", f"[{_now()}] Started plugin execution"]
        with contextlib.suppress(httpx.HTTPError):
            await self.client.put(
                f"{self.base}/instructions/{instruction_id}",
                json={"status": "executing", "execution_log": execution_log},
            )
        kind = instruction.get("instruction_type") or "execute"
        if kind != "execute":
            report: dict[str, Any] = {
                "status": "failed",
                "error_message": f"unsupported instruction type '{kind}'",
                "execution_log": execution_log,
            }
        else:
            outcome = await run_plugin(self.config.plugins_dir, instruction)
            execution_log.append(
                f"[{_now()}] Plugin finished in {outcome.duration:.3f}s: "
                + ("success" if outcome.success else str(outcome.error_message))
            )
            if outcome.stderr:
                execution_log.extend(outcome.stderr.rstrip().splitlines()[-200:])
            report = {
                "status": "completed" if outcome.success else "failed",
                "result": outcome.output,
                "execution_log": execution_log,
            }
            if not outcome.success:
                report["error_message"] = outcome.error_message
                report["error_details"] = {
                    "error_type": "plugin_error",
                    "exit_code": outcome.exit_code,
                    "timestamp": _now(),
                }
        bound.info("instruction finished", status=report["status"])
        await self._report(instruction_id, report)

    async def _report(self, instruction_id: str, report: dict[str, Any]) -> None:
        """Retry until the server gives a final answer: a result must not be lost."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.result_retry_seconds
        delay = 0.5
        while True:
            try:
                response = await self.client.post(
                    f"{self.base}/instructions/{instruction_id}/result", json=report, timeout=30
                )
                if response.status_code in _FINAL_STATUSES:
                    if response.status_code != 200:
                        log.warning(
                            "result refused",
                            instruction_id=instruction_id,
                            status=response.status_code,
                            body=response.text[:300],
                        )
                    return
                log.warning("result not accepted yet", status=response.status_code)
            except httpx.HTTPError as exc:
                log.warning("result not delivered yet", error=str(exc))
            if loop.time() > deadline:
                log.error("giving up on a result", instruction_id=instruction_id)
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10)


async def run_agent(config: AgentConfig) -> int:
    agent = Agent(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stop)
    log.info("agent started", agent_id=config.agent_id, url=config.url)
    return await agent.run()
