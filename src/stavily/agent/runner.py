"""The agent loop: heartbeats on one timer; long polls and up to `capacity` instructions at
once; results that bring the next instruction; drain on the server's word."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import platform
import signal
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import structlog

from stavily import __version__
from stavily.agent.plugins import (
    Outcome,
    RunOptions,
    Watching,
    kill_running_plugins,
    refusal,
    run_plugin,
)
from stavily.agent.protocols import RunLog
from stavily.agent.registry import (
    InstallFailed,
    PluginInstaller,
    pinned_keys,
    registry_ref,
)
from stavily.agent.system import SystemFigures
from stavily.agent.venvs import Environments
from stavily.agent.watches import Watches

log = structlog.get_logger("stavily.agent")
# Answers after which a report is final: retrying cannot change them.
_FINAL_STATUSES = {200, 400, 401, 403, 404, 409, 413, 422}
_INSTALLS = ("plugin_install", "plugin_update")


@dataclass
class AgentConfig:
    url: str
    agent_id: str
    token: str
    plugins_dir: Path
    heartbeat_interval: float = 30
    poll_wait: float = 25
    result_retry_seconds: float = 600
    capacity: int = 1
    # Step environment variables any plugin may receive (names or globs, `--allow-env`).
    allow_env: tuple[str, ...] = ()
    # The only keys registry plugins may be signed with (base64, `--plugin-key`); none: the
    # server's own (trust on first use, see stavily.agent.registry).
    plugin_keys: tuple[str, ...] = ()
    # what plugins are told on the socket (get_agent_info) and in STAVILY_DEMO_MODE
    environment: str = "production"
    demo_mode: bool = False
    # seconds a plugin's requirements may take to install (stavily.agent.venvs)
    install_timeout: float = 600
    # how often a running step's log is sent on (PUT .../instructions/{id})
    log_interval: float = 0.5
    # the CA the server's certificate must chain to (`--ca-cert`); none: the public CAs
    ca_cert: Path | None = None
    # plain http:// to a host off this machine (`--allow-insecure-http`)
    allow_insecure_http: bool = False


class TransportRefused(ValueError):
    """An orchestrator URL or CA file the agent will not use; the CLI exits 2."""

    exit_code = 2


def loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1: a connection that never leaves the machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_url(url: str, allow_insecure_http: bool = False) -> None:
    """TransportRefused unless `url` is https://, or http:// to this machine (or to any
    host when allowed): over plain HTTP the agent's key crosses the network in clear."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TransportRefused(f"the orchestrator URL {url!r} is not an https:// URL")
    if parts.scheme == "http" and not allow_insecure_http and not loopback(parts.hostname):
        raise TransportRefused(
            f"refusing plain HTTP to {parts.hostname}: the agent's credential would cross "
            "the network in clear; use https:// (or --allow-insecure-http)"
        )


def tls_verify(ca_cert: Path | None) -> ssl.SSLContext | bool:
    """How the server's certificate is verified: against the public CAs (httpx's), or
    against `ca_cert`'s alone (a private CA). TransportRefused for a file that is none."""
    if ca_cert is None:
        return True
    try:
        return ssl.create_default_context(cafile=ca_cert)
    except ssl.SSLError:
        raise TransportRefused(f"the CA file {ca_cert} holds no PEM certificate") from None
    except OSError as exc:
        raise TransportRefused(f"cannot read the CA file {ca_cert}: {exc.strerror}") from None


def allow_env_patterns(options: Iterable[str] | None, variable: str | None) -> tuple[str, ...]:
    """The agent's allow list: each `--allow-env` and STAVILY_AGENT_ALLOW_ENV's entries,
    both comma-separated, in order, without blanks or repeats."""
    patterns: list[str] = []
    for value in [*(options or ()), variable or ""]:
        for part in value.split(","):
            pattern = part.strip()
            if pattern and pattern not in patterns:
                patterns.append(pattern)
    return tuple(patterns)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _install_failure(failed: InstallFailed, execution_log: list[str]) -> dict[str, Any]:
    """The failed result of an instruction whose plugin could not be installed."""
    execution_log.append(f"[{_now()}] {failed.message}")
    return {
        "status": "failed",
        "error_message": failed.message,
        "error_details": {"error_type": failed.error_type, "timestamp": _now()},
        "execution_log": execution_log,
    }


class Agent:
    """Runs up to `capacity` instructions at once, each in its own task.

    It polls (`?wait=&slots=<free slots>`) only while a slot is free, asks for the next
    instruction with each result (`?next=1`) while it takes work, and heartbeats on its own
    timer throughout: the ids it runs, its capacity and interval, its machine's figures.
    A heartbeat answer carrying the "drain" command stops it taking work (it finishes what
    runs and stays up, idle, heartbeating); an answer without it lets it take work again.
    """

    def __init__(self, config: AgentConfig) -> None:
        """ValueError for a `plugin_keys` entry that is no Ed25519 public key, and
        TransportRefused for a URL or CA file the agent will not use."""
        self.config = config
        pinned = pinned_keys(config.plugin_keys)  # before the client: nothing to close
        check_url(config.url, config.allow_insecure_http)
        self.capacity = max(1, config.capacity)
        token = config.token.removeprefix("Bearer ").strip()
        self.client = httpx.AsyncClient(
            base_url=config.url.rstrip("/"),
            verify=tls_verify(config.ca_cert),
            headers={
                "Authorization": f"Bearer {token}",
                "Accept": "application/json",
                "Content-Type": "application/json",
                "User-Agent": f"Stavily-Agent/{__version__} (stavily-python)",
            },
            timeout=httpx.Timeout(config.poll_wait + 15, connect=5),
            # Polls, results and heartbeats may all be in flight at once.
            limits=httpx.Limits(max_connections=max(100, self.capacity * 2 + 8)),
        )
        self.base = f"/agents/v1/{config.agent_id}"
        self.installer = PluginInstaller(self.client, self.base, config.plugins_dir, pinned)
        self.system = SystemFigures(config.plugins_dir)
        self.run_options = RunOptions(
            allow_env=config.allow_env,
            agent_id=config.agent_id,
            environment=config.environment,
            demo_mode=config.demo_mode,
            environments=Environments(config.plugins_dir / ".venvs", config.install_timeout),
        )
        # seconds between heartbeats: ours, or longer when the server's answer says so
        self.beat_every = float(config.heartbeat_interval)
        self.stopping = asyncio.Event()
        self.draining = False
        # Set on stop and while draining: a held poll is abandoned, no new one starts.
        self._hold = asyncio.Event()
        # Set whenever a slot frees up or the agent's state changes.
        self._changed = asyncio.Event()
        # a sensor agent's watches (the heartbeat answers' `watch`)
        self.watches = Watches(self.client, self.base, self._run_watch)
        # Instructions received and not yet reported, as the heartbeat lists them.
        self.running: set[str] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def free_slots(self) -> int:
        return self.capacity - len(self.tasks)

    @property
    def taking_work(self) -> bool:
        return not self.stopping.is_set() and not self.draining

    def stop(self) -> None:
        """The first SIGTERM/SIGINT: finish what runs, take nothing new. A second one: the
        operator will not wait, so every running plugin is killed (children included) and
        its step reported failed before the agent goes offline."""
        if self.stopping.is_set():
            log.warning("stopping now: killing the running plugins", killed=kill_running_plugins())
            return
        log.info("stopping after the running instructions", running=len(self.running))
        self.stopping.set()
        self._hold.set()
        self._changed.set()

    def _set_draining(self, draining: bool) -> None:
        if draining == self.draining or self.stopping.is_set():
            return
        self.draining = draining
        if draining:
            log.info(
                "draining: finishing the running instructions and taking no new work",
                running=len(self.running),
            )
            self._hold.set()
        else:
            log.info("drain lifted: taking work again")
            self._hold.clear()
        self._changed.set()

    async def run(self) -> int:
        beats = asyncio.create_task(self._heartbeat_loop())
        try:
            await self._work_loop()
        finally:
            # Every running instruction is finished and reported before going offline.
            while self.tasks:
                await asyncio.wait(set(self.tasks))
            beats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beats
            await self.watches.close()
            await self._heartbeat("offline")
            await self.client.aclose()
        return 0

    # -- heartbeats -----------------------------------------------------------------------

    def _heartbeat_body(self, status: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "timestamp": _now(),
            "status": status,
            "version": __version__,
            "hostname": socket.gethostname(),
            "os": platform.system().lower(),
            "capacity": min(self.capacity, 1000),
            "running": sorted(self.running)[:1000],
            # the registry versions it has: routing prefers it for their steps
            "plugins": [
                {"id": plugin_id, "version": version, "sha256": sha256}
                for (plugin_id, version), sha256 in sorted(self.installer.have.items())
            ][:1000],
        }
        interval = self.config.heartbeat_interval
        if interval <= 3600:  # the server's range is 1..3600; beating faster is no harm
            body["heartbeat_interval"] = max(1.0, float(interval))
        return body

    async def _heartbeat(self, status: str) -> None:
        body = self._heartbeat_body(status)
        try:
            # On the loop's thread: psutil measures cpu_percent between calls per thread.
            figures = self.system.collect()
        except Exception as exc:  # noqa: BLE001 - the figures are optional
            log.warning("system figures failed", error=str(exc))
            figures = {}
        if figures:
            body["system"] = figures
        try:
            response = await self.client.post(f"{self.base}/heartbeat", json=body, timeout=10)
        except httpx.HTTPError as exc:
            log.warning("heartbeat failed", error=str(exc))
            return
        if response.status_code not in (200, 204):
            log.warning("heartbeat refused", status=response.status_code, body=response.text[:300])
            return
        if status == "offline" or response.status_code == 204:
            return
        try:
            answer = response.json()
        except ValueError:
            return
        told = answer.get("next_heartbeat_interval") if isinstance(answer, dict) else None
        if isinstance(told, int | float) and 1 <= told <= 3600:
            # Longer than ours: the server is stretching its fleet's beats (overload).
            self.beat_every = max(self.config.heartbeat_interval, float(told))
        commands = answer.get("commands") if isinstance(answer, dict) else None
        # Only an accepted answer changes the drain: a failed heartbeat says nothing.
        self._set_draining(isinstance(commands, list) and "drain" in commands)
        if isinstance(answer, dict) and "watch" in answer and not self.stopping.is_set():
            await self.watches.update(answer["watch"])

    async def _heartbeat_loop(self) -> None:
        while True:
            await self._heartbeat("online")
            await asyncio.sleep(self.beat_every)

    # -- taking work ----------------------------------------------------------------------

    async def _wait_changed(self) -> None:
        await self._changed.wait()
        self._changed.clear()

    async def _sleep_unless_held(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._hold.wait(), seconds)

    async def _work_loop(self) -> None:
        failures = 0
        while not self.stopping.is_set():
            if not self.taking_work or self.free_slots <= 0:
                self._changed.clear()
                if not self.taking_work or self.free_slots <= 0:
                    await self._wait_changed()
                continue
            poll = asyncio.create_task(
                self.client.get(
                    f"{self.base}/instructions",
                    params={"wait": self.config.poll_wait, "slots": min(self.free_slots, 100)},
                )
            )
            held = asyncio.create_task(self._hold.wait())
            asked_at = asyncio.get_running_loop().time()
            done, _ = await asyncio.wait({poll, held}, return_when=asyncio.FIRST_COMPLETED)
            if poll not in done:
                # Stopping or draining mid-poll: hanging up tells the server not to lease
                # anything on it; the offline heartbeat hands back anything leased meanwhile.
                poll.cancel()
                with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                    await poll
                continue
            held.cancel()
            try:
                response = poll.result()
            except httpx.HTTPError as exc:
                failures += 1
                log.warning("poll failed", error=str(exc))
                await self._sleep_unless_held(min(30, 2 ** min(failures, 5)))
                continue
            if response.status_code != 200:
                failures += 1
                log.warning("poll refused", status=response.status_code, body=response.text[:300])
                await self._sleep_unless_held(min(30, 2 ** min(failures, 5)))
                continue
            failures = 0
            try:
                answer = response.json()
            except ValueError:
                log.warning("poll answer is not JSON", body=response.text[:300])
                continue
            batch = answer.get("instructions")
            if not isinstance(batch, list):
                single = answer.get("instruction")
                batch = [single] if single else []
            for instruction in batch:
                # Leased to this agent: it runs them even if stopping meanwhile.
                self._start(instruction)
            elapsed = asyncio.get_running_loop().time() - asked_at
            quick = elapsed < max(self.config.poll_wait / 2, 0.5)
            if not batch and quick:
                # A server that does not hold polls open: poll at the pace it asks for.
                pace = answer.get("next_poll_interval")
                pace = pace if isinstance(pace, int | float) and pace > 0 else 1
                await self._sleep_unless_held(min(float(pace), 5))

    def _start(self, instruction: Any) -> None:
        if not self._accept(instruction):
            return
        task = asyncio.create_task(self._run_chain(instruction))
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _accept(self, instruction: Any) -> bool:
        """Note a handed-out instruction as running; refuse a malformed or repeated one."""
        if not isinstance(instruction, dict) or not isinstance(instruction.get("id"), str):
            log.warning("ignoring a malformed instruction", instruction=str(instruction)[:300])
            return False
        if instruction["id"] in self.running:
            log.warning("ignoring an instruction already running", instruction_id=instruction["id"])
            return False
        self.running.add(instruction["id"])
        return True

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self._changed.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("instruction task failed", error=repr(task.exception()))

    async def _run_chain(self, instruction: dict[str, Any]) -> None:
        """One slot: the instruction, then each one piggybacked on a result."""
        current: dict[str, Any] | None = instruction
        while current is not None:
            current = await self.execute(current)

    async def execute(self, instruction: dict[str, Any]) -> dict[str, Any] | None:
        """Run and report one instruction; return the next one piggybacked on its result."""
        self.running.add(instruction["id"])
        try:
            return await self._execute(instruction)
        finally:
            self.running.discard(instruction["id"])

    async def _execute(self, instruction: dict[str, Any]) -> dict[str, Any] | None:
        instruction_id = instruction["id"]
        bound = log.bind(instruction_id=instruction_id, plugin_id=instruction.get("plugin_id"))
        kind = instruction.get("instruction_type") or "execute"
        started = "installation" if kind in _INSTALLS else "execution"
        execution_log = [f"[{_now()}] Instruction received", f"[{_now()}] Started plugin {started}"]
        with contextlib.suppress(httpx.HTTPError):
            await self.client.put(
                f"{self.base}/instructions/{instruction_id}",
                json={"status": "executing", "execution_log": execution_log},
            )
        if kind in ("execute", *_INSTALLS):
            try:
                run = self._run if kind == "execute" else self._install
                report = await run(instruction, execution_log)
            except Exception as exc:  # noqa: BLE001 - a bug of ours must not lose the step
                bound.exception("instruction failed in the agent")
                report = {
                    "status": "failed",
                    "error_message": f"the agent failed: {type(exc).__name__}: {exc}",
                    "execution_log": execution_log,
                }
        else:
            report = {
                "status": "failed",
                "error_message": f"unsupported instruction type '{kind}'",
                "execution_log": execution_log,
            }
        bound.info("instruction finished", status=report["status"])
        return await self._report(instruction_id, report)

    async def _run(self, instruction: dict[str, Any], execution_log: list[str]) -> dict[str, Any]:
        """An `execute`: a registry version is installed first if it is not yet, and runs
        from its own folder; any other plugin from the hand-installed one."""
        folder = None
        try:
            ref = registry_ref(instruction)
            if ref is not None:
                installed = await self.installer.install(ref)
                execution_log.extend(f"[{_now()}] {line}" for line in installed.logs)
                folder = installed.path
        except InstallFailed as failed:
            return _install_failure(failed, execution_log)
        live = LiveLog(self, instruction["id"], execution_log)
        try:
            outcome = await run_plugin(
                self.config.plugins_dir,
                instruction,
                folder=folder,
                options=self.run_options,
                log=RunLog(execution_log, live.changed),
            )
        finally:
            await live.close()
        for reported in outcome.events:  # events on the orchestrator, recorded (no watch)
            self.watches.deliver(None, reported["trigger_name"], reported["payload"])
        execution_log.append(
            f"[{_now()}] Plugin finished in {outcome.duration:.3f}s: "
            + ("success" if outcome.success else str(outcome.error_message))
        )
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
        return report

    async def _run_watch(self, spec: dict[str, Any], watching: Watching, log: RunLog) -> Outcome:
        """One run of a watch's plugin: installed from the registry first if pinned."""
        folder = None
        ref = registry_ref(spec)
        if ref is not None:
            try:
                folder = (await self.installer.install(ref)).path
            except InstallFailed as failed:
                return Outcome(False, error_message=failed.message)
        return await run_plugin(
            self.config.plugins_dir,
            spec,
            folder=folder,
            options=self.run_options,
            log=log,
            watch=watching,
        )

    async def send_log(self, instruction_id: str, lines: list[str]) -> None:
        """A running step's log so far, whole (the server keeps the last one sent)."""
        with contextlib.suppress(httpx.HTTPError):
            response = await self.client.put(
                f"{self.base}/instructions/{instruction_id}",
                json={"execution_log": lines},
                timeout=10,
            )
            if response.status_code != 200:
                log.warning("log update refused", status=response.status_code)

    async def _install(
        self, instruction: dict[str, Any], execution_log: list[str]
    ) -> dict[str, Any]:
        """A `plugin_install`/`plugin_update` (a rollout): only from the registry, verified;
        a git source alone is for the official agents, which install without verifying."""
        try:
            ref = registry_ref(instruction)
            if ref is None:
                raise InstallFailed(
                    "plugin_configuration must name the registry version (sha256 and "
                    "plugin_version): this agent installs only verified registry versions, "
                    "not from git"
                )
            installed = await self.installer.install(ref)
        except InstallFailed as failed:
            return _install_failure(failed, execution_log)
        execution_log.extend(f"[{_now()}] {line}" for line in installed.logs)
        return {
            "status": "completed",
            "result": {
                "install_result": {
                    "installed_path": str(installed.path),
                    "logs": installed.logs,
                    "duration": round(installed.duration, 3),
                }
            },
            "execution_log": execution_log,
        }

    async def _report(self, instruction_id: str, report: dict[str, Any]) -> dict[str, Any] | None:
        """Retry until the server gives a final answer: a result must not be lost.

        While the agent takes work, the result asks for the next instruction (`?next=1`):
        this slot is free again once the result is in. The one that comes back is returned,
        already counted as running."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.result_retry_seconds
        delay = 0.5
        while True:
            ask_next = self.taking_work
            try:
                response = await self.client.post(
                    f"{self.base}/instructions/{instruction_id}/result",
                    json=report,
                    params={"next": 1} if ask_next else None,
                    timeout=30,
                )
                if response.status_code in _FINAL_STATUSES:
                    if response.status_code != 200:
                        log.warning(
                            "result refused",
                            instruction_id=instruction_id,
                            status=response.status_code,
                            body=response.text[:300],
                        )
                        return None
                    return self._piggybacked(response) if ask_next else None
                log.warning("result not accepted yet", status=response.status_code)
            except httpx.HTTPError as exc:
                log.warning("result not delivered yet", error=str(exc))
            if loop.time() > deadline:
                log.error("giving up on a result", instruction_id=instruction_id)
                return None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10)

    def _piggybacked(self, response: httpx.Response) -> dict[str, Any] | None:
        try:
            answer = response.json()
        except ValueError:
            return None
        following = answer.get("next_instruction") if isinstance(answer, dict) else None
        if not following or not self._accept(following):
            return None
        log.info(
            "piggybacked",
            instruction_id=following["id"],
            plugin_id=following.get("plugin_id"),
        )
        return following  # type: ignore[no-any-return]


class LiveLog:
    """Sends a running step's log on while its plugin writes it (stderr, uploaded logs): at
    most one update in flight and one every `log_interval` seconds, none after the run."""

    def __init__(self, agent: Agent, instruction_id: str, lines: list[str]) -> None:
        self.agent = agent
        self.instruction_id = instruction_id
        self.lines = lines
        self.task: asyncio.Task[None] | None = None
        self.sending = asyncio.Lock()  # in order: a later log never overtaken by an older

    def changed(self) -> None:
        if self.task is None:
            self.task = asyncio.create_task(self._send())

    async def _send(self) -> None:
        await asyncio.sleep(self.agent.config.log_interval)
        self.task = None  # a change from now on schedules the next update
        lines = list(self.lines)
        async with self.sending:
            await self.agent.send_log(self.instruction_id, lines)

    async def close(self) -> None:
        """Before the result: an update still waiting is dropped, one in flight finished
        (the result carries the whole log)."""
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        async with self.sending:  # one already sending: its PUT lands before the result
            pass


# -- credentials: given, kept in a file, or obtained by enrolling ---------------------------


@dataclass(frozen=True)
class Credentials:
    url: str
    agent_id: str
    api_key: str

    def __repr__(self) -> str:  # never print the key
        return f"Credentials(url={self.url!r}, agent_id={self.agent_id!r})"


class EnrollmentFailed(Exception):
    """No usable credentials; `exit_code` follows the CLI's (2 input, 4 conflict, 5 auth)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def default_credentials_file(plugins_dir: Path | None) -> Path:
    """Beside the plugins folder when one is given, else in the user's home."""
    if plugins_dir is not None:
        return plugins_dir.resolve().parent / "agent-credentials.json"
    return Path.home() / ".stavily" / "agent.json"


def read_credentials(path: Path) -> Credentials | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise EnrollmentFailed(f"cannot read the credentials file {path}: {exc}") from None
    if not isinstance(data, dict) or not all(
        isinstance(data.get(k), str) and data[k] for k in ("agent_id", "api_key", "url")
    ):
        raise EnrollmentFailed(
            f"the credentials file {path} must hold agent_id, api_key and url", exit_code=2
        )
    if path.stat().st_mode & 0o077:
        log.warning("the credentials file is readable by others", path=str(path))
    return Credentials(data["url"], data["agent_id"], data["api_key"])


def _open_private(path: Path) -> int:
    """A new file only its owner may read (0600 from the start, never wider)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a leftover of an interrupted attempt
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)


async def enroll_agent(
    url: str,
    enrollment_token: str,
    name: str,
    labels: dict[str, str],
    path: Path,
    verify: ssl.SSLContext | bool = True,
) -> Credentials:
    """Exchange the token at POST /agents/v1/register and keep the answer in `path`.

    The file is opened before the exchange, so an agent that could not keep its key is
    never created; network failures and 5xx are retried for a minute."""
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = _open_private(scratch)
    except OSError as exc:
        raise EnrollmentFailed(f"cannot write the credentials file {path}: {exc}") from None
    body = {
        "enrollment_token": enrollment_token.removeprefix("Bearer ").strip(),
        "name": name,
        "labels": labels,
        "hostname": socket.gethostname(),
        "version": __version__,
        "os": platform.system().lower(),
    }
    try:
        answer = await _register(url, body, verify)
        credentials = Credentials(url, answer["agent_id"], answer["api_key"])
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            fd = -1
            json.dump(
                {"agent_id": credentials.agent_id, "api_key": credentials.api_key, "url": url},
                handle,
                indent=2,
            )
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(scratch, path)
    finally:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            scratch.unlink()
    log.info("enrolled", agent_id=credentials.agent_id, name=name, credentials_file=str(path))
    return credentials


async def _register(
    url: str, body: dict[str, Any], verify: ssl.SSLContext | bool
) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + 60
    delay = 0.5
    headers = {"User-Agent": f"Stavily-Agent/{__version__} (stavily-python)"}
    async with httpx.AsyncClient(
        base_url=url.rstrip("/"), headers=headers, timeout=30, verify=verify
    ) as client:
        while True:
            try:
                response = await client.post("/agents/v1/register", json=body)
                if response.status_code == 201:
                    return response.json()  # type: ignore[no-any-return]
                if response.status_code < 500 and response.status_code != 429:
                    raise EnrollmentFailed(
                        f"enrollment refused (HTTP {response.status_code}): "
                        + _error_message(response),
                        {401: 5, 403: 5, 409: 4, 422: 2}.get(response.status_code, 1),
                    )
                problem = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                untrusted = _untrusted(exc)
                if untrusted is not None:  # no retry will change it
                    raise EnrollmentFailed(
                        f"cannot enroll at {url}: its certificate does not verify "
                        f"({untrusted}); for a private CA, give --ca-cert"
                    ) from None
                problem = str(exc) or type(exc).__name__
            if asyncio.get_running_loop().time() > deadline:
                raise EnrollmentFailed(f"cannot enroll at {url}: {problem}")
            log.warning("enrollment not done yet", error=problem)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10)


def _untrusted(exc: BaseException | None) -> str | None:
    """Why the server's certificate did not verify, when that is what `exc` comes of."""
    while exc is not None:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return exc.verify_message or str(exc)
        exc = exc.__cause__ or exc.__context__
    return None


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


async def resolve_credentials(
    *,
    url: str | None,
    agent_id: str | None,
    token: str | None,
    enroll: str | None,
    name: str | None,
    labels: dict[str, str],
    path: Path,
    verify: ssl.SSLContext | bool = True,
    allow_insecure_http: bool = False,
) -> Credentials:
    """--agent-id/--token when given; else the credentials file; else enroll with --enroll.

    A file already there wins over --enroll, so a service started with the same command
    every time enrolls once and then reuses its credentials. The URL is checked before any
    request (TransportRefused); enrolling verifies the server's certificate with `verify`
    (see tls_verify)."""
    if agent_id or token:
        if not (agent_id and token):
            raise EnrollmentFailed("--agent-id and --token go together", exit_code=2)
        if not url:
            raise EnrollmentFailed("--url is required", exit_code=2)
        check_url(url, allow_insecure_http)
        return Credentials(url, agent_id, token)
    stored = read_credentials(path)
    if stored is not None:
        if enroll:
            log.info("already enrolled: using the credentials file", path=str(path))
        check_url(url or stored.url, allow_insecure_http)
        return Credentials(url or stored.url, stored.agent_id, stored.api_key)
    if enroll:
        if not url:
            raise EnrollmentFailed("--url is required to enroll", exit_code=2)
        check_url(url, allow_insecure_http)
        return await enroll_agent(url, enroll, name or socket.gethostname(), labels, path, verify)
    raise EnrollmentFailed(
        f"no credentials: give --agent-id and --token, or --enroll TOKEN (no credentials "
        f"file at {path})",
        exit_code=2,
    )


async def run_agent(config: AgentConfig) -> int:
    try:
        agent = Agent(config)
    except ValueError as exc:  # a --plugin-key that is no key, a URL or CA refused
        log.error("cannot start the agent", error=str(exc))
        return 2
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stop)
    for pattern in config.allow_env:
        if refusal(pattern) is not None:  # a name (or prefix) on the deny list
            log.warning(
                "--allow-env names variables that are never passed to plugins",
                pattern=pattern,
                reason=refusal(pattern),
            )
    log.info(
        "agent started",
        agent_id=config.agent_id,
        url=config.url,
        allow_env=config.allow_env,
        plugin_keys=sorted(agent.installer.pinned) or "the server's",
    )
    return await agent.run()
