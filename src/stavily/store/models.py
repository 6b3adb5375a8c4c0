"""The tables. SQLAlchemy Core, so the hot path can use plain statements."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

# The instructions an agent holds. Counted on every claim, heartbeat and routing choice,
# so indexed apart from the agent's history of finished ones, which only grows.
ACTIVE_INSTRUCTION = ("leased", "executing")


def one_of(column: sa.ColumnElement[Any], values: Iterable[str]) -> sa.ColumnElement[bool]:
    """`column IN ('a', 'b')` with the values written into the SQL, not bound: they are
    fixed states, and written out they let the planner match a partial index (and
    estimate how many rows match) in prepared statements too."""
    literals = []
    for value in values:
        if not value.isidentifier():
            raise ValueError(f"not a state name: {value!r}")
        literals.append(sa.literal_column(f"'{value}'", column.type))
    return column.in_(literals)


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Aware UTC datetimes on both databases (SQLite stores them naive)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def _id() -> sa.Column[str]:
    return sa.Column("id", sa.String(40), primary_key=True)


def _org(key: bool = True) -> sa.Column[str]:
    """The owning organization. Rows a step writes (`key` off) carry no foreign key:
    their execution's row has one, and the engine copies its organization into them.
    Checking the key at each of them locked the organization's row FOR KEY SHARE from
    every agent's transaction at once."""
    if not key:
        return sa.Column("organization_id", sa.String(40), nullable=False)
    return sa.Column(
        "organization_id", sa.String(40), sa.ForeignKey("organizations.id"), nullable=False
    )


def _created() -> sa.Column[datetime]:
    return sa.Column("created_at", UTCDateTime(), nullable=False)


metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

organizations = sa.Table(
    "organizations",
    metadata,
    _id(),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    _created(),
)

api_tokens = sa.Table(
    "api_tokens",
    metadata,
    _id(),
    _org(),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("role", sa.String(40), nullable=False),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    _created(),
    sa.Column("revoked_at", UTCDateTime()),
    # "api": an API token; "session": a user's login, ended by logout or disuse.
    sa.Column("kind", sa.String(10), nullable=False, server_default="api"),
    sa.Column("user_id", sa.String(40), sa.ForeignKey("users.id")),
    sa.Column("created_by", sa.String(100)),
    sa.Column("expires_at", UTCDateTime()),
    sa.Column("last_used_at", UTCDateTime()),
    sa.Index("ix_api_tokens_org", "organization_id", "kind"),
    sa.Index("ix_api_tokens_user", "user_id"),
)

users = sa.Table(
    "users",
    metadata,
    _id(),
    sa.Column("username", sa.String(100), nullable=False, unique=True),
    sa.Column("password_hash", sa.String(200), nullable=False),
    sa.Column("failed_logins", sa.Integer, nullable=False, server_default="0"),
    sa.Column("locked_until", UTCDateTime()),
    sa.Column("last_login_at", UTCDateTime()),
    sa.Column("disabled_at", UTCDateTime()),
    _created(),
)

memberships = sa.Table(
    "memberships",
    metadata,
    sa.Column("user_id", sa.String(40), sa.ForeignKey("users.id"), primary_key=True),
    sa.Column(
        "organization_id", sa.String(40), sa.ForeignKey("organizations.id"), primary_key=True
    ),
    sa.Column("role", sa.String(40), nullable=False),
    _created(),
    sa.Index("ix_memberships_org", "organization_id"),
)

# Custom roles: an organization's own sets of permissions (security.roles).
roles = sa.Table(
    "roles",
    metadata,
    sa.Column(
        "organization_id", sa.String(40), sa.ForeignKey("organizations.id"), primary_key=True
    ),
    sa.Column("name", sa.String(40), primary_key=True),
    sa.Column("description", sa.String(500)),
    sa.Column("permissions", sa.JSON, nullable=False),
    _created(),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
)

agents = sa.Table(
    "agents",
    metadata,
    _id(),
    _org(),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("type", sa.String(20), nullable=False),
    sa.Column("labels", sa.JSON, nullable=False),
    sa.Column("capacity", sa.Integer, nullable=False),
    # health: online | busy | degraded | offline (fleet.liveness); the operator's
    # decisions are in admin_state
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("credential_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("version", sa.String(100)),
    sa.Column("hostname", sa.String(255)),
    sa.Column("last_heartbeat_at", UTCDateTime()),
    _created(),
    # what operators decide: active | draining (finish, take nothing new) | disabled
    sa.Column("admin_state", sa.String(20), nullable=False, server_default="active"),
    sa.Column("os", sa.String(100)),
    # the last heartbeat's system figures: cpu, memory, disk, load, running
    sa.Column("facts", sa.JSON),
    sa.Column("revoked_at", UTCDateTime()),
    sa.Column("credential_issued_at", UTCDateTime()),
    sa.Column("enrollment_token_id", sa.String(40)),
    # liveness deadlines, set at each heartbeat from the agent's own interval
    sa.Column("late_at", UTCDateTime()),
    sa.Column("dead_at", UTCDateTime()),
    # an agent that heartbeats while it runs work can be declared dead before its leases end
    sa.Column("heartbeats_while_busy", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.UniqueConstraint("organization_id", "name", name="uq_agents_org_name"),
    # the liveness sweep reads only agents past a deadline
    sa.Index("ix_agents_liveness", "status", "dead_at"),
    sa.Index("ix_agents_late", "status", "late_at"),
)

# Keys the orchestrator itself holds, shared by every replica (the agent JWT signing key).
server_keys = sa.Table(
    "server_keys",
    metadata,
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("value", sa.String(200), nullable=False),
    _created(),
)

enrollment_tokens = sa.Table(
    "enrollment_tokens",
    metadata,
    _id(),
    _org(),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("agent_type", sa.String(20), nullable=False),
    sa.Column("labels", sa.JSON, nullable=False),
    sa.Column("capacity", sa.Integer, nullable=False),
    sa.Column("max_uses", sa.Integer),  # None: unlimited until it expires
    sa.Column("uses", sa.Integer, nullable=False, server_default="0"),
    sa.Column("expires_at", UTCDateTime()),
    sa.Column("created_by", sa.String(100), nullable=False),
    _created(),
    sa.Column("revoked_at", UTCDateTime()),
)

workflows = sa.Table(
    "workflows",
    metadata,
    _id(),
    _org(),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("latest_version", sa.Integer, nullable=False),
    _created(),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.UniqueConstraint("organization_id", "name", name="uq_workflows_org_name"),
)

workflow_versions = sa.Table(
    "workflow_versions",
    metadata,
    _id(),
    _org(),
    sa.Column("workflow_id", sa.String(40), sa.ForeignKey("workflows.id"), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("definition", sa.JSON, nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("created_by", sa.String(100), nullable=False),
    _created(),
    # each step's plugin version, pinned at apply (plugins.pins); null: none registered
    sa.Column("plugins", sa.JSON),
    sa.UniqueConstraint("workflow_id", "version", name="uq_workflow_versions_wf_version"),
)

executions = sa.Table(
    "executions",
    metadata,
    _id(),
    _org(),
    sa.Column("workflow_id", sa.String(40), sa.ForeignKey("workflows.id"), nullable=False),
    sa.Column(
        "workflow_version_id",
        sa.String(40),
        sa.ForeignKey("workflow_versions.id"),
        nullable=False,
    ),
    sa.Column("workflow_name", sa.String(200), nullable=False),
    sa.Column("workflow_version", sa.Integer, nullable=False),
    # running | succeeded | failed | cancelled
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("inputs", sa.JSON, nullable=False),
    sa.Column("trigger", sa.JSON, nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("created_by", sa.String(100), nullable=False),
    _created(),
    sa.Column("finished_at", UTCDateTime()),
    sa.Column("variables", sa.JSON),
    sa.Column("deadline_at", UTCDateTime()),
    sa.Column("concurrency_limit", sa.Integer),
    sa.Column("reruns", sa.Integer, nullable=False, server_default="0"),
    sa.Column("open_steps", sa.Integer, nullable=False, server_default="0"),
    sa.Column("failed_step", sa.String(200)),
    sa.Index("ix_executions_org_created", "organization_id", "created_at"),
    sa.Index("ix_executions_workflow_status", "workflow_id", "status"),
    sa.Index("ix_executions_status_deadline", "status", "deadline_at"),
    postgresql_with={"fillfactor": 80},
)

step_runs = sa.Table(
    "step_runs",
    metadata,
    _id(),
    _org(key=False),
    sa.Column("execution_id", sa.String(40), sa.ForeignKey("executions.id"), nullable=False),
    sa.Column("stage", sa.String(20), nullable=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("depends_on", sa.JSON, nullable=False),
    # the resolved step: plugin, config, selector, timeout, retries
    sa.Column("spec", sa.JSON, nullable=False),
    # pending | queued | running | succeeded | failed | skipped | cancelled
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("agent_id", sa.String(40)),
    sa.Column("instruction_id", sa.String(40)),
    sa.Column("output", sa.JSON),
    sa.Column("error", sa.Text),
    sa.Column("started_at", UTCDateTime()),
    sa.Column("finished_at", UTCDateTime()),
    # for_each: the items are step runs of their own under the step
    sa.Column("parent_id", sa.String(40)),
    sa.Column("item_index", sa.Integer),
    sa.Column("next_attempt_at", UTCDateTime()),
    # how many dependencies (or, for a running fan-out, items) are still open
    sa.Column("waiting", sa.Integer, nullable=False, server_default="0"),
    sa.Column("dependents", sa.JSON),
    sa.UniqueConstraint("execution_id", "name", name="uq_step_runs_execution_name"),
    # room on each page for a changed row to stay there, with no new index entry (HOT)
    postgresql_with={"fillfactor": 80},
)
_item = step_runs.c.parent_id.is_not(None)
sa.Index("ix_step_runs_parent", step_runs.c.parent_id, sqlite_where=_item, postgresql_where=_item)

instructions = sa.Table(
    "instructions",
    metadata,
    _id(),
    _org(key=False),
    sa.Column("execution_id", sa.String(40), sa.ForeignKey("executions.id")),
    sa.Column("step_run_id", sa.String(40), sa.ForeignKey("step_runs.id")),
    sa.Column("attempt", sa.Integer, nullable=False),
    # queued | leased | executing | completed | failed | cancelled | expired
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("agent_type", sa.String(20), nullable=False),
    sa.Column("target_agent_name", sa.String(200)),
    sa.Column("selector", sa.JSON, nullable=False),
    sa.Column("agent_id", sa.String(40)),
    sa.Column("plugin_id", sa.String(200), nullable=False),
    sa.Column("instruction_type", sa.String(30), nullable=False),
    sa.Column("plugin_configuration", sa.JSON, nullable=False),
    sa.Column("input_data", sa.JSON, nullable=False),
    sa.Column("context", sa.JSON, nullable=False),
    sa.Column("timeout_seconds", sa.Integer, nullable=False),
    sa.Column("max_retries", sa.Integer, nullable=False),
    sa.Column("correlation_id", sa.String(300), nullable=False),
    _created(),
    sa.Column("leased_at", UTCDateTime()),
    sa.Column("lease_expires_at", UTCDateTime()),
    sa.Column("started_at", UTCDateTime()),
    sa.Column("finished_at", UTCDateTime()),
    sa.Column("execution_log", sa.JSON),
    sa.Column("result", sa.JSON),
    sa.Column("result_digest", sa.String(64)),
    sa.Column("error_message", sa.Text),
    sa.Column("error_details", sa.JSON),
    # a retry waits until then before any agent may take it
    sa.Column("available_at", UTCDateTime()),
    # routing: the agent the strategy chose; others may take it once prefer_until passes
    sa.Column("preferred_agent_id", sa.String(40)),
    sa.Column("prefer_until", UTCDateTime()),
    sa.Index("ix_instructions_execution", "execution_id", "status"),
)
# Partial indexes, of the rows each serves: a status change out of them adds no entry.
# Queries meant to use one write the same condition as literals (one_of), so that the
# planner can match it in a prepared statement too. (Not one of its own for lease expiry:
# with the same condition as the active one, the planner took it to count an agent's
# instructions. Every index here is written at each status change: they are kept few.)
QUEUED = one_of(instructions.c.status, ("queued",))
_active = one_of(instructions.c.status, ACTIVE_INSTRUCTION)
sa.Index(  # claims, oldest execution first
    "ix_instructions_queued",
    *(instructions.c[c] for c in ("organization_id", "agent_type", "execution_id", "id")),
    sqlite_where=QUEUED,
    postgresql_where=QUEUED,
)
sa.Index(  # what an agent holds, and (all of it read) which leases ran out
    "ix_instructions_agent_active",
    instructions.c.agent_id,
    instructions.c.lease_expires_at,
    sqlite_where=_active,
    postgresql_where=_active,
)

audit_records = sa.Table(
    "audit_records",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    # no foreign key: a log outlives what it records, and a step writes five records
    sa.Column("organization_id", sa.String(40), nullable=False),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("actor", sa.String(100), nullable=False),
    sa.Column("action", sa.String(100), nullable=False),
    sa.Column("subject_type", sa.String(40), nullable=False),
    sa.Column("subject_id", sa.String(40), nullable=False),
    sa.Column("details", sa.JSON, nullable=False),
    sa.Index("ix_audit_records_org_id", "organization_id", "id"),
    sa.Index("ix_audit_records_subject", "subject_id"),
)

# -- the plugin registry (stavily.plugins) ---------------------------------------------------

plugins = sa.Table(
    "plugins",
    metadata,
    sa.Column(
        "organization_id", sa.String(40), sa.ForeignKey("organizations.id"), primary_key=True
    ),
    sa.Column("id", sa.String(200), primary_key=True),
    sa.Column("name", sa.String(200)),
    sa.Column("description", sa.Text),
    sa.Column("type", sa.String(20), nullable=False),
    _created(),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
)

plugin_versions = sa.Table(
    "plugin_versions",
    metadata,
    sa.Column("organization_id", sa.String(40), primary_key=True),
    sa.Column("plugin_id", sa.String(200), primary_key=True),
    sa.Column("version", sa.String(100), primary_key=True),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    # the manifest as validated, and how the plugin takes its input (plugins.manifest)
    sa.Column("manifest", sa.JSON, nullable=False),
    sa.Column("protocol", sa.String(20), nullable=False),
    # whether it talks to its agent's socket (official agents serve none)
    sa.Column("socket", sa.Boolean, nullable=False, server_default=sa.false()),
    # what was signed ({id, version, sha256, size, created}), the signature and its key
    sa.Column("signed", sa.JSON, nullable=False),
    sa.Column("signature", sa.String(200), nullable=False),
    sa.Column("key_id", sa.String(40), nullable=False),
    # where it came from: {kind: git|path|archive, url, ref, commit, sub_directory}
    sa.Column("source", sa.JSON, nullable=False),
    # active | deprecated | yanked
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("status_reason", sa.Text),
    _created(),
    sa.Column("published_by", sa.String(100), nullable=False),
    sa.ForeignKeyConstraint(
        ["organization_id", "plugin_id"], ["plugins.organization_id", "plugins.id"]
    ),
)

plugin_blob_chunks = sa.Table(
    "plugin_blob_chunks",
    metadata,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

# Which agent has which plugin version: install results, and our agents' runs of it.
agent_plugins = sa.Table(
    "agent_plugins",
    metadata,
    sa.Column("agent_id", sa.String(40), sa.ForeignKey("agents.id"), primary_key=True),
    sa.Column("plugin_id", sa.String(200), primary_key=True),
    sa.Column("version", sa.String(100), primary_key=True),
    sa.Column("sha256", sa.String(64)),
    # installing | installed | failed
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("instruction_id", sa.String(40)),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
)

plugin_rollouts = sa.Table(
    "plugin_rollouts",
    metadata,
    _id(),
    _org(),
    sa.Column("plugin_id", sa.String(200), nullable=False),
    sa.Column("version", sa.String(100), nullable=False),
    sa.Column("selector", sa.JSON, nullable=False),
    sa.Column("agents", sa.JSON, nullable=False),  # the agent ids it installs on
    _created(),
    sa.Column("created_by", sa.String(100), nullable=False),
)

# Every event that may start workflows, whatever its source (agent, api, manual, webhook,
# schedule): what came, from whom, and what it started or why it started nothing.
events = sa.Table(
    "events",
    metadata,
    _id(),
    _org(),
    sa.Column("source", sa.String(20), nullable=False),
    sa.Column("type", sa.String(200), nullable=False),
    sa.Column("payload", sa.JSON, nullable=False),
    # a repeated event (the same key from the same source) starts nothing new
    sa.Column("idempotency_key", sa.String(400)),
    # a webhook's: the signature it came with (a replay with another delivery id is one)
    sa.Column("signature", sa.String(120)),
    sa.Column("agent_id", sa.String(40)),
    sa.Column("sent_by", sa.String(100), nullable=False),
    # the watch (a workflow's trigger step) it came from
    sa.Column("watch_id", sa.String(40)),
    sa.Column("workflow_name", sa.String(200)),
    sa.Column("step", sa.String(200)),
    # accepted (a webhook's, not yet processed) | started | unmatched | refused
    sa.Column("outcome", sa.String(20), nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("started", sa.JSON, nullable=False),  # execution ids
    _created(),
    sa.UniqueConstraint("organization_id", "source", "idempotency_key"),
    sa.Index(
        "ux_events_signature",
        "organization_id",
        "source",
        "signature",
        unique=True,
        sqlite_where=sa.text("signature IS NOT NULL"),
        postgresql_where=sa.text("signature IS NOT NULL"),
    ),
    sa.Index("ix_events_org_created", "organization_id", "created_at"),
    sa.Index(
        "ix_events_accepted",
        "created_at",
        sqlite_where=sa.text("outcome = 'accepted'"),
        postgresql_where=sa.text("outcome = 'accepted'"),
    ),
)

webhooks = sa.Table(
    "webhooks",
    metadata,
    _id(),
    _org(),
    sa.Column("workflow_name", sa.String(200), nullable=False),
    sa.Column("description", sa.String(500)),
    # sealed (AES-GCM, security.sealing): the database alone cannot sign a request
    sa.Column("secret", sa.Text, nullable=False),
    # the secret before the last rotation, accepted until previous_expires_at
    sa.Column("previous_secret", sa.Text),
    sa.Column("previous_expires_at", UTCDateTime()),
    # a dotted path in the JSON body whose value is the idempotency key
    sa.Column("idempotency_field", sa.String(200)),
    # the run's inputs: templates over `trigger` (the event)
    sa.Column("inputs", sa.JSON, nullable=False),
    sa.Column("tolerance_seconds", sa.Integer, nullable=False),
    sa.Column("created_by", sa.String(100), nullable=False),
    _created(),
    sa.Column("rotated_at", UTCDateTime()),
    sa.Index("ix_webhooks_org", "organization_id", "workflow_name"),
)

# Cron and interval schedules that start a workflow (workflows.schedules): declared in the
# workflow (`schedules:`, origin `workflow`, kept across applies by `key`, the hash of its
# spec) or created by the API (origin `api`). The scheduler fires those due, on the leader.
schedules = sa.Table(
    "schedules",
    metadata,
    _id(),
    _org(),
    sa.Column("workflow_name", sa.String(200), nullable=False),
    sa.Column("origin", sa.String(20), nullable=False),  # workflow | api
    sa.Column("key", sa.String(64)),  # a declared one's spec hash; null for the API's
    sa.Column("name", sa.String(200)),
    sa.Column("cron", sa.String(200)),
    sa.Column("timezone", sa.String(100), nullable=False),
    sa.Column("every_seconds", sa.Integer),
    sa.Column("inputs", sa.JSON, nullable=False),
    sa.Column("misfire", sa.String(10), nullable=False),  # skip | once | all
    sa.Column("paused", sa.Boolean, nullable=False),
    sa.Column("next_fire_at", UTCDateTime(), nullable=False),
    sa.Column("last_fired_at", UTCDateTime()),
    sa.Column("created_by", sa.String(100), nullable=False),
    _created(),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.UniqueConstraint("organization_id", "workflow_name", "key"),
    sa.Index("ix_schedules_due", "next_fire_at"),
)

# Singleton duties' leases (services.leader): one row per duty, held by one server
# process until it expires unrenewed.
leases = sa.Table(
    "leases",
    metadata,
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("holder", sa.String(200), nullable=False),
    sa.Column("expires_at", UTCDateTime(), nullable=False),
)

# The secret store (security.store). An organization's data keys, each wrapped (sealed)
# by the server's secrets key; the newest unretired one encrypts new values, the others
# stay until no secret uses them.
secret_keys = sa.Table(
    "secret_keys",
    metadata,
    _id(),
    _org(),
    sa.Column("wrapped", sa.Text, nullable=False),
    _created(),
    sa.Column("retired_at", UTCDateTime()),
    sa.Index("ix_secret_keys_org", "organization_id", "created_at"),
)

# Its secrets: AES-GCM under the data key `key_id`, bound to (organization, name).
secrets = sa.Table(
    "secrets",
    metadata,
    _id(),
    _org(),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("key_id", sa.String(40), sa.ForeignKey("secret_keys.id"), nullable=False),
    sa.Column("ciphertext", sa.Text, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("created_by", sa.String(100), nullable=False),
    _created(),
    sa.Column("updated_by", sa.String(100), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.UniqueConstraint("organization_id", "name"),
    sa.Index("ix_secrets_key_id", "key_id"),
)
