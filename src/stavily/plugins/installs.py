"""Plugin versions installed on agents: the installs the server hands out, their results,
rollouts, and what routing knows of who has what (the table agent_plugins).

An official agent cannot fetch from the registry: it runs a shallow `git clone` when
told `plugin_install`/`plugin_update` (AGENT_API.md). Its claims skip a step of a pinned
version it has not installed (queries._PLUGIN_READY); when such a poll finds nothing
else, it is handed the install instead (`next_for`), and takes the step at a later poll
once the install succeeded. An install that fails is remembered for
`plugin_install_retry_seconds`: the agent is not given it again meanwhile, other agents
may take the step, and if no eligible agent is left the step fails with the install's
error (engine.fail_unroutable, through `failed_on`).

Install instructions live in `instructions` like any other (ids `inp_...`, no
execution), so that leases, expiry and the agent API treat them the same; their
progress and results come here (the agent API routes them by id)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from stavily import audit
from stavily.config import Settings
from stavily.errors import Conflict, Forbidden, InvalidInput, NotFound
from stavily.fleet.agents import eligible
from stavily.ids import new_id
from stavily.plugins.instructions import official_can_run
from stavily.plugins.registry import version_row
from stavily.store.db import Database
from stavily.store.models import (
    ACTIVE_INSTRUCTION,
    QUEUED,
    agent_plugins,
    agents,
    instructions,
    plugin_rollouts,
)
from stavily.timeutil import isoformat, utcnow
from stavily.workflows.handout import COMPLETED, FAILED
from stavily.workflows.queries import OFFICIAL_RUNNABLE as _OFFICIAL_RUNNABLE
from stavily.workflows.queries import PINNED as _PINNED

log = structlog.get_logger("stavily.plugins")

PREFIX = "inp"
INSTALL_TYPES = ("plugin_install", "plugin_update")
PINNED_CHECK_SECONDS = 1.0


def _pin_of(row: Any) -> tuple[str, str]:
    """An instruction's plugin and the digest of its pinned version ('' if none)."""
    configuration = row.plugin_configuration
    sha = configuration.get("sha256") if isinstance(configuration, dict) else None
    return (row.plugin_id, str(sha or ""))


def is_install(instruction_id: str) -> bool:
    return instruction_id.startswith(PREFIX + "_")


def payload(row: dict[str, Any]) -> dict[str, Any]:
    """An install as the agent is handed it (AGENT_API.md)."""
    return {
        "id": row["id"],
        "plugin_id": row["plugin_id"],
        "instruction_type": row["instruction_type"],
        "plugin_configuration": row["plugin_configuration"],
        "input_data": {},
        "timeout_seconds": int(row["timeout_seconds"]),
        "max_retries": 0,
        "correlation_id": row["correlation_id"],
        "attempt": 1,
        "context": row["context"],
    }


def git_configuration(version: Any) -> dict[str, Any] | str:
    """Where an official agent clones a version from, or why it cannot."""
    source = version.source or {}
    if source.get("kind") != "git":
        return (
            f"{version.plugin_id} {version.version} was published from "
            f"{'an archive' if source.get('kind') == 'archive' else 'a folder'}, and official "
            "agents install only from git: publish it from its repository, or run the step "
            "on a Stavily reference agent"
        )
    if source.get("sub_directory"):
        return (
            f"{version.plugin_id} {version.version} lives in the repository's folder "
            f"'{source['sub_directory']}', and official agents install a repository's root"
        )
    # The official agent clones the tag or branch the version was published from, then
    # checks out its commit (`plugin_version` would be taken for a branch name); `version`
    # and `sha256`, which it ignores, tell the reference agent which registry version.
    configuration = {
        "repository_url": source["repository_url"],
        "commit_hash": source["commit"],
        "version": version.version,
        "sha256": version.sha256,
    }
    if source.get("ref_kind") in ("tag", "branch"):
        configuration[source["ref_kind"]] = source["ref"]
    return configuration


class Installs:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        # what each of our agents said it has, as last written by this process
        self._reported: dict[str, frozenset[tuple[str, str, str]]] = {}
        # and who has each (plugin id, sha256), from the same heartbeats (routing)
        self._holders: dict[tuple[str, str], set[str]] = {}
        # (organization, agent type) -> (when asked, whether a pinned step was queued)
        self._pinned_seen: dict[tuple[str, str], tuple[datetime, bool]] = {}
        # agents whose last poll here was an official agent's (no query string)
        self.official: set[str] = set()

    def polled(self, agent_id: str, official: bool) -> None:
        (self.official.add if official else self.official.discard)(agent_id)

    async def _pinned_queued(self, agent: Any, now: datetime) -> bool:
        """Whether any step of a pinned version is queued for agents of this kind: asked
        of the database at most once a second, so that the idle polls of a large fleet
        of official agents cost nothing more while there is none."""
        key = (agent.organization_id, agent.type)
        checked = self._pinned_seen.get(key)
        if checked is not None and (now - checked[0]).total_seconds() < PINNED_CHECK_SECONDS:
            return checked[1]
        any_pinned = (
            sa.select(instructions.c.id)
            .where(
                QUEUED,
                instructions.c.organization_id == agent.organization_id,
                instructions.c.agent_type == agent.type,
                instructions.c.instruction_type == "execute",
                _PINNED.is_not(None),
            )
            .limit(1)
        )
        async with self.db.read() as conn:
            found = (await conn.execute(any_pinned)).first() is not None
        self._pinned_seen[key] = (now, found)
        return found

    def _retry_cutoff(self, now: datetime) -> datetime:
        return now - timedelta(seconds=self.settings.plugin_install_retry_seconds)

    # -- official agents: the install before the step ------------------------------------

    async def next_for(self, agent: Any) -> dict[str, Any] | None:
        """For an idle official agent: the install of the oldest queued step of a pinned
        version it may take but has not installed (none if one is under way or failed
        lately), leased to it now; None if there is none."""
        now = utcnow()
        known = sa.exists().where(
            agent_plugins.c.agent_id == agent.id,
            agent_plugins.c.plugin_id == instructions.c.plugin_id,
            agent_plugins.c.sha256 == _PINNED,
            sa.or_(
                agent_plugins.c.status == "installed",
                agent_plugins.c.updated_at > self._retry_cutoff(now),
            ),
        )
        query = (
            sa.select(
                instructions.c.id,
                instructions.c.plugin_id,
                instructions.c.plugin_configuration,
                instructions.c.selector,
            )
            .where(
                QUEUED,
                instructions.c.organization_id == agent.organization_id,
                instructions.c.agent_type == agent.type,
                instructions.c.instruction_type == "execute",
                _PINNED.is_not(None),
                _OFFICIAL_RUNNABLE,
                sa.or_(
                    instructions.c.target_agent_name.is_(None),
                    instructions.c.target_agent_name == agent.name,
                ),
                sa.or_(instructions.c.available_at.is_(None), instructions.c.available_at <= now),
                ~known,
            )
            .order_by(instructions.c.execution_id, instructions.c.id)
            .limit(32)
        )
        if not await self._pinned_queued(agent, now):
            return None
        async with self.db.read() as conn:
            waiting = (await conn.execute(query)).all()
        step = next((w for w in waiting if eligible(agent, w.selector)), None)
        if step is None:
            return None
        async with self.db.write() as conn:
            configuration = step.plugin_configuration
            version = await version_row(
                conn, agent.organization_id, step.plugin_id, configuration.get("plugin_version")
            )
            if version is None or version.sha256 != configuration.get("sha256"):
                return None  # not ours to install (deleted, or another registry's digest)
            git = git_configuration(version)
            if isinstance(git, str):
                await self._known(conn, agent.id, version, "failed", git, None, now)
                log.warning("plugin cannot install", agent_id=agent.id, reason=git)
                return None
            others = await conn.execute(
                sa.select(agent_plugins.c.version).where(
                    agent_plugins.c.agent_id == agent.id,
                    agent_plugins.c.plugin_id == version.plugin_id,
                    agent_plugins.c.version != version.version,
                    agent_plugins.c.status == "installed",
                )
            )
            kind = "plugin_update" if others.first() is not None else "plugin_install"
            row = self._install_row(agent, version, kind, git, now, step.id, official=True)
            row.update(status="leased", agent_id=agent.id, leased_at=now)
            await conn.execute(instructions.insert().values(**row))
            await self._known(conn, agent.id, version, "installing", None, row["id"], now)
            await audit.append(
                conn,
                [
                    audit.entry(
                        agent.organization_id,
                        "system",
                        "plugin.install_started",
                        "agent",
                        agent.id,
                        {
                            "plugin_id": version.plugin_id,
                            "version": version.version,
                            "instruction_id": row["id"],
                            "for": step.id,
                        },
                        at=now,
                    )
                ],
            )
        log.info(
            "plugin install handed out",
            agent_id=agent.id,
            plugin_id=version.plugin_id,
            version=version.version,
        )
        return payload(row)

    def _install_row(
        self,
        agent: Any,
        version: Any,
        kind: str,
        configuration: dict[str, Any],
        now: datetime,
        for_step: str | None = None,
        rollout_id: str | None = None,
        official: bool = False,
    ) -> dict[str, Any]:
        """`official`: handed to an official agent (it keeps one version per plugin)."""
        timeout = self.settings.plugin_install_timeout
        context: dict[str, Any] = {
            "install": {
                "plugin_id": version.plugin_id,
                "version": version.version,
                "sha256": version.sha256,
                **({"for": for_step} if for_step else {}),
                **({"official": True} if official else {}),
            }
        }
        if rollout_id:
            context["rollout_id"] = rollout_id
        return {
            "id": new_id(PREFIX),
            "organization_id": agent.organization_id,
            "execution_id": None,
            "step_run_id": None,
            "attempt": 1,
            "status": "queued",
            "agent_type": agent.type,
            "target_agent_name": agent.name,
            "selector": {},
            "agent_id": None,
            "plugin_id": version.plugin_id,
            "instruction_type": kind,
            "plugin_configuration": configuration,
            "input_data": {},
            "context": context,
            "timeout_seconds": timeout,
            "max_retries": 0,
            "correlation_id": f"rollout/{rollout_id}" if rollout_id else "install",
            "created_at": now,
            "lease_expires_at": now + timedelta(seconds=timeout + self.settings.lease_grace),
        }

    async def _known(
        self,
        conn: AsyncConnection,
        agent_id: str,
        version: Any,
        status: str,
        error: str | None,
        instruction_id: str | None,
        now: datetime,
    ) -> None:
        """What the agent has of the version, now."""
        key = (
            agent_plugins.c.agent_id == agent_id,
            agent_plugins.c.plugin_id == version.plugin_id,
            agent_plugins.c.version == version.version,
        )
        await conn.execute(agent_plugins.delete().where(*key))
        await conn.execute(
            agent_plugins.insert().values(
                agent_id=agent_id,
                plugin_id=version.plugin_id,
                version=version.version,
                sha256=version.sha256,
                status=status,
                error=error,
                instruction_id=instruction_id,
                updated_at=now,
            )
        )

    # -- what agents report on an install ------------------------------------------------

    async def _owned(self, conn: AsyncConnection, agent: Any, instruction_id: str) -> Any:
        row = (
            await conn.execute(
                self.db.for_update(
                    sa.select(instructions).where(
                        instructions.c.id == instruction_id,
                        instructions.c.organization_id == agent.organization_id,
                    )
                )
            )
        ).first()
        if row is None:
            raise NotFound(f"no instruction '{instruction_id}' for this agent")
        if row.agent_id != agent.id:
            raise Forbidden("that instruction is not leased to this agent")
        return row

    async def progress(self, agent: Any, instruction_id: str, fields: dict[str, Any]) -> list[str]:
        now = utcnow()
        async with self.db.write() as conn:
            row = await self._owned(conn, agent, instruction_id)
            if row.status not in ACTIVE_INSTRUCTION:
                raise Conflict(f"instruction '{instruction_id}' is {row.status}")
            values: dict[str, Any] = {
                "lease_expires_at": now
                + timedelta(seconds=row.timeout_seconds + self.settings.lease_grace)
            }
            if "execution_log" in fields:
                values["execution_log"] = fields["execution_log"]
            if fields.get("status") and row.status == "leased":
                values.update(status="executing", started_at=now)
            await conn.execute(
                instructions.update().where(instructions.c.id == instruction_id).values(**values)
            )
        return [k for k in ("status", "execution_log", "max_retries") if k in fields]

    async def result(
        self, agent: Any, instruction_id: str, report: dict[str, Any], digest: str
    ) -> None:
        """The install's result: the instruction ends, and what the agent has is known."""
        status = report["status"]
        final = "completed" if status in COMPLETED else "failed" if status in FAILED else None
        if final is None:
            raise InvalidInput(
                f"'{status}' is not a result status",
                [{"path": "status", "message": "expected 'completed' or 'failed'"}],
            )
        now = utcnow()
        async with self.db.write() as conn:
            row = await self._owned(conn, agent, instruction_id)
            if row.status in ("completed", "failed") and row.result_digest == digest:
                return  # the same report again
            if row.status not in ACTIVE_INSTRUCTION:
                raise Conflict(f"instruction '{instruction_id}' is {row.status}")
            error = None
            if final == "failed":
                error = str(report.get("error_message") or "the install failed").replace(
                    "\x00", "\ufffd"
                )
            await conn.execute(
                instructions.update()
                .where(instructions.c.id == instruction_id)
                .values(
                    status=final,
                    finished_at=now,
                    started_at=row.started_at or now,
                    result=report.get("result"),
                    result_digest=digest,
                    error_message=error,
                    error_details=report.get("error_details"),
                    execution_log=report.get("execution_log") or row.execution_log,
                )
            )
            install = (row.context or {}).get("install") or {}
            version = await version_row(
                conn, agent.organization_id, install.get("plugin_id"), install.get("version")
            )
            if version is not None:
                if final == "completed" and row.instruction_type in INSTALL_TYPES:
                    if install.get("official"):  # one folder per plugin: the others are gone
                        await conn.execute(
                            agent_plugins.delete().where(
                                agent_plugins.c.agent_id == agent.id,
                                agent_plugins.c.plugin_id == version.plugin_id,
                            )
                        )
                status = "installed" if final == "completed" else "failed"
                await self._known(conn, agent.id, version, status, error, row.id, now)
            await audit.append(
                conn,
                [
                    audit.entry(
                        agent.organization_id,
                        agent.actor,
                        "plugin.installed" if final == "completed" else "plugin.install_failed",
                        "agent",
                        agent.id,
                        {**install, "instruction_id": row.id, "error": error},
                        at=now,
                    )
                ],
            )
        log.info("plugin install ended", agent_id=agent.id, status=final, error=error, **install)

    async def reported(self, agent: Any, plugins: list[dict[str, str]]) -> None:
        """Our agent's heartbeat lists the registry versions it has: written when the list
        changed (most heartbeats write nothing)."""
        # one digest per version (the last said, if an agent said two)
        latest = {(p["id"], p["version"]): p["sha256"] for p in plugins}
        now_has = frozenset((i, v, sha) for (i, v), sha in latest.items())
        if self._reported.get(agent.id) == now_has:
            return
        now = utcnow()
        async with self.db.write() as conn:
            await conn.execute(
                agent_plugins.delete().where(
                    agent_plugins.c.agent_id == agent.id, agent_plugins.c.status == "installed"
                )
            )
            kept = (
                await conn.execute(
                    sa.select(agent_plugins.c.plugin_id, agent_plugins.c.version).where(
                        agent_plugins.c.agent_id == agent.id
                    )
                )
            ).all()
            other = {(r.plugin_id, r.version) for r in kept}  # installing, or failed
            rows = [
                {
                    "agent_id": agent.id,
                    "plugin_id": plugin_id,
                    "version": version,
                    "sha256": sha256,
                    "status": "installed",
                    "error": None,
                    "instruction_id": None,
                    "updated_at": now,
                }
                for plugin_id, version, sha256 in sorted(now_has)
                if (plugin_id, version) not in other
            ]
            if rows:
                await conn.execute(agent_plugins.insert(), rows)
        for plugin_id, _, sha256 in self._reported.get(agent.id, ()):
            self._holders.get((plugin_id, sha256), set()).discard(agent.id)
        for plugin_id, _, sha256 in now_has:
            self._holders.setdefault((plugin_id, sha256), set()).add(agent.id)
        self._reported[agent.id] = now_has

    def holders(self, plugin_id: str, sha256: str) -> set[str]:
        """Our agents that said in their last heartbeat to this process they have it."""
        return self._holders.get((plugin_id, sha256), set())

    async def of_agent(self, agent_id: str) -> list[dict[str, Any]]:
        async with self.db.read() as conn:
            rows = await conn.execute(
                sa.select(agent_plugins)
                .where(agent_plugins.c.agent_id == agent_id)
                .order_by(agent_plugins.c.plugin_id, agent_plugins.c.version)
            )
            return [
                {
                    "plugin_id": r.plugin_id,
                    "version": r.version,
                    "sha256": r.sha256,
                    "status": r.status,
                    "error": r.error,
                    "updated_at": isoformat(r.updated_at),
                }
                for r in rows
            ]

    # -- routing: agents whose install of a step's version failed ------------------------

    async def stranded(
        self,
        conn: AsyncConnection,
        waiting: list[Any],
        fleet: list[Any],
        now: datetime,
        no_agent: str,
    ) -> dict[str, list[str]]:
        """Of queued instructions `waiting` (engine.fail_unroutable), those no agent of
        `fleet` can take, by why: `no_agent` when none is eligible, or the installs of the
        step's pinned version that failed on every eligible one."""
        failed = await self.failed_on(conn, [_pin_of(w) for w in waiting], now)
        reasons: dict[str, list[str]] = {}
        for w in waiting:
            could = [
                a
                for a in fleet
                if a.organization_id == w.organization_id
                and a.type == w.agent_type
                and eligible(a, w.selector)
            ]
            if _pin_of(w)[1] and not official_can_run(w.plugin_configuration):
                official = [a for a in could if a.id in self.official]
                could = [a for a in could if a.id not in self.official]
                if official and not could:
                    speaks = w.plugin_configuration.get("protocol")
                    if w.plugin_configuration.get("socket"):
                        speaks += " and the agent's socket"
                    reason = (
                        f"plugin {w.plugin_id} speaks {speaks}, which the official agents "
                        f"cannot ({official[0].name}): no eligible reference agent"
                    )
                    reasons.setdefault(reason, []).append(w.id)
                    continue
            refused = failed.get(_pin_of(w), {})
            if any(a.id not in refused for a in could):
                continue
            if could:
                errors = "; ".join(f"{a.name}: {refused[a.id]}" for a in could[:5])
                version = w.plugin_configuration.get("plugin_version")
                reason = (
                    f"plugin {w.plugin_id} {version} could not be installed on any eligible "
                    f"agent ({errors})"
                )
            else:
                reason = no_agent + _other_type(w, fleet)
            reasons.setdefault(reason, []).append(w.id)
        return reasons

    async def failed_on(
        self, conn: AsyncConnection, pinned: list[tuple[str, str]], now: datetime
    ) -> dict[tuple[str, str], dict[str, str]]:
        """For (plugin id, sha256) pairs: the agents whose install failed lately, with
        the error each reported."""
        pinned = sorted({p for p in pinned if p[1]})
        if not pinned:
            return {}
        rows = await conn.execute(
            sa.select(
                agent_plugins.c.agent_id,
                agent_plugins.c.plugin_id,
                agent_plugins.c.sha256,
                agent_plugins.c.error,
            ).where(
                agent_plugins.c.status == "failed",
                agent_plugins.c.updated_at > self._retry_cutoff(now),
                sa.tuple_(agent_plugins.c.plugin_id, agent_plugins.c.sha256).in_(pinned),
            )
        )
        found: dict[tuple[str, str], dict[str, str]] = {}
        for r in rows:
            found.setdefault((r.plugin_id, r.sha256), {})[r.agent_id] = r.error or "failed"
        return found

    # -- rollouts ------------------------------------------------------------------------

    async def rollout(
        self,
        organization_id: str,
        actor: str,
        plugin_id: str,
        version_text: str,
        selector: dict[str, Any],
    ) -> dict[str, Any]:
        """Install a version on every agent the selector picks (official agents from git,
        ours from the registry), as instructions each agent takes when it polls."""
        now = utcnow()
        rollout_id = new_id("rol")
        async with self.db.write() as conn:
            version = await version_row(conn, organization_id, plugin_id, version_text)
            if version is None:
                raise NotFound(f"no version {version_text} of plugin '{plugin_id}'")
            if version.status == "yanked":
                raise Conflict(f"{plugin_id} {version_text} is yanked: it is installed nowhere")
            fleet = (
                await conn.execute(
                    sa.select(agents).where(
                        agents.c.organization_id == organization_id,
                        agents.c.revoked_at.is_(None),
                        agents.c.admin_state == "active",
                    )
                )
            ).all()
            chosen = [a for a in fleet if eligible(a, selector)]
            git = git_configuration(version)
            for agent in chosen:
                configuration: dict[str, Any] = (
                    git
                    if isinstance(git, dict)
                    else {"version": version.version, "sha256": version.sha256}
                )
                row = self._install_row(
                    agent, version, "plugin_install", configuration, now, rollout_id=rollout_id
                )
                row["lease_expires_at"] = None
                await conn.execute(instructions.insert().values(**row))
            await conn.execute(
                plugin_rollouts.insert().values(
                    id=rollout_id,
                    organization_id=organization_id,
                    plugin_id=plugin_id,
                    version=version.version,
                    selector=selector,
                    agents=[a.id for a in chosen],
                    created_at=now,
                    created_by=actor,
                )
            )
            await audit.append(
                conn,
                [
                    audit.entry(
                        organization_id,
                        actor,
                        "plugin.rollout_started",
                        "plugin",
                        plugin_id,
                        {
                            "version": version.version,
                            "rollout_id": rollout_id,
                            "agents": len(chosen),
                            "selector": selector,
                        },
                        at=now,
                    )
                ],
            )
        return await self.rollout_view(organization_id, plugin_id, rollout_id)

    async def rollout_view(
        self, organization_id: str, plugin_id: str, rollout_id: str
    ) -> dict[str, Any]:
        async with self.db.read() as conn:
            rollout = (
                await conn.execute(
                    sa.select(plugin_rollouts).where(
                        plugin_rollouts.c.id == rollout_id,
                        plugin_rollouts.c.organization_id == organization_id,
                        plugin_rollouts.c.plugin_id == plugin_id,
                    )
                )
            ).first()
            if rollout is None:
                raise NotFound(f"no rollout '{rollout_id}' of plugin '{plugin_id}'")
            rows = (
                await conn.execute(
                    sa.select(
                        instructions.c.target_agent_name,
                        instructions.c.status,
                        instructions.c.error_message,
                        agents.c.id.label("agent_id"),
                    )
                    .join(
                        agents,
                        sa.and_(
                            agents.c.organization_id == instructions.c.organization_id,
                            agents.c.name == instructions.c.target_agent_name,
                        ),
                    )
                    .where(
                        instructions.c.organization_id == organization_id,
                        instructions.c.correlation_id == f"rollout/{rollout_id}",
                    )
                    .order_by(instructions.c.target_agent_name)
                )
            ).all()
        status_of = {
            "completed": "installed",
            "failed": "failed",
            "expired": "failed",
            "cancelled": "failed",
        }
        listed = [
            {
                "agent_id": r.agent_id,
                "name": r.target_agent_name,
                "status": status_of.get(r.status, "pending"),
                "error": r.error_message,
            }
            for r in rows
        ]
        counts = {
            k: sum(1 for a in listed if a["status"] == k)
            for k in ("installed", "failed", "pending")
        }
        return {
            "id": rollout.id,
            "plugin_id": rollout.plugin_id,
            "version": rollout.version,
            "selector": rollout.selector,
            "created_at": isoformat(rollout.created_at),
            "created_by": rollout.created_by,
            "total": len(listed),
            **counts,
            "done": counts["pending"] == 0,
            "agents": listed,
        }


def _other_type(waiting: Any, fleet: list[Any]) -> str:
    """What a step whose selection picks only agents of the other type is told: an
    action step pinned to a sensor agent waits for an action agent that is not there."""
    names = [
        a.name
        for a in fleet
        if a.organization_id == waiting.organization_id
        and a.type != waiting.agent_type
        and eligible(a, waiting.selector)
    ]
    if not names:
        return ""
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return (
        f": the agents it selects ({shown}) are not {waiting.agent_type} agents, and its "
        f"stage's steps run on {waiting.agent_type} agents only"
    )
