"""What the API answers, as its OpenAPI document declares it: a model per answer and error.

The routes build their answers as plain dicts and send them as our JSONResponse
(FastAPI documents a route's `response_model` but does not validate a Response a handler
returns), so these models cost nothing per request. They are what clients and the fuzz
test (tests/integration/test_openapi_fuzz.py) hold the server to: fields always sent are
required, fields sent only sometimes are not, and nothing else is sent (`extra="forbid"`)
unless the answer is open (outputs, inputs, definitions: any JSON).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Answer(BaseModel):
    """A closed answer: exactly these fields."""

    model_config = ConfigDict(extra="forbid")


# -- errors ------------------------------------------------------------------------------


class Problem(BaseModel):
    """One thing wrong with a request."""

    path: str = Field(description="Where: `name`, `labels.env`, `query:limit`, `(root)`...")
    message: str


class ErrorBody(Answer):
    code: str = Field(description="Machine-readable: `unauthorized`, `not_found`, ...")
    message: str
    details: list[Problem] | dict[str, Any] | None = Field(
        description="For 422 every problem found; for 429 `retry_after`; for some 409s what "
        "is in the way; else null."
    )


class ErrorResponse(Answer):
    """Every error, whatever its status: `{"error": {"code", "message", "details"}}`."""

    error: ErrorBody


_ERRORS = {
    401: "No credential, or an unknown, revoked or expired one.",
    403: "The credential may not do this (its role, or another agent's path, or a disabled "
    "or revoked agent).",
    404: "Nothing of that id or name in the caller's organization.",
    409: "The state forbids it now (a name taken, an execution finished, an instruction "
    "no longer leased to this agent, an agent revoked...).",
    405: "The route takes another method (`Allow` names it).",
    413: "The body is larger than the server's limit.",
    415: "The body's content type is not one this route takes.",
    416: "The range asked for lies outside the artifact.",
    422: "The request is invalid: `details` lists every problem with its path.",
    429: "Rate limited: retry after `Retry-After` seconds.",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route: these error statuses, all in the one error shape."""
    return {s: {"model": ErrorResponse, "description": _ERRORS[s]} for s in statuses}


# -- health ------------------------------------------------------------------------------


class Health(Answer):
    status: Literal["ok"]
    version: str


class Healthy(Answer):
    """What Stavily's own set-up scripts probe for."""

    status: Literal["healthy"]


# -- agents (private API) ----------------------------------------------------------------

AgentType = Literal["action", "sensor"]
AgentHealth = Literal["online", "busy", "degraded", "offline"]
ShownStatus = Literal["online", "busy", "degraded", "offline", "draining", "disabled", "revoked"]


class AgentView(Answer):
    """An agent as the private API shows it."""

    id: str
    organization_id: str
    name: str
    type: AgentType
    labels: dict[str, str]
    capacity: int
    status: ShownStatus = Field(
        description="The operator's state when not active (draining, disabled, revoked), "
        "else `health`."
    )
    health: AgentHealth
    admin_state: Literal["active", "draining", "disabled"]
    created_at: datetime
    credential_issued_at: datetime | None
    last_heartbeat_at: datetime | None
    revoked_at: datetime | None
    # read from the agent's row: absent from the answer of the request that created it
    version: str | None = None
    hostname: str | None = None
    os: str | None = None
    facts: dict[str, Any] | None = Field(
        default=None, description="The last heartbeat's system figures, labels, running..."
    )
    enrollment_token_id: str | None = None
    heartbeats_while_busy: bool = False


class AgentList(Answer):
    agents: list[AgentView]


class CreatedAgent(AgentView):
    agent_id: str
    api_key: str = Field(description="The agent's credential (`stva_...`), shown only here.")


class AdminAgentView(AgentView):
    state: ShownStatus = Field(description="The same as `status`.")


class AgentWithCredential(AdminAgentView):
    """An agent just enrolled, or whose credential was just replaced."""

    agent_id: str
    api_key: str = Field(description="The agent's credential (`stva_...`), shown only here.")


class AgentToken(Answer):
    token: str = Field(description="A JWT for every agent route of this agent.")
    token_type: Literal["Bearer"]
    expires_in: int = Field(description="Seconds.")


class Capacity(Answer):
    total: int
    in_use: int
    available: int


class Waiting(Answer):
    total: int
    by_selector: dict[str, int] = Field(description="Keyed by the selector's JSON text.")


class FleetSummary(Answer):
    agents: int
    by_state: dict[str, int]
    by_type: dict[str, int]
    by_label: dict[str, int] = Field(description="Keyed by `key=value`.")
    by_version: dict[str, int]
    capacity: Capacity
    waiting: Waiting


class EnrollmentToken(Answer):
    id: str
    name: str
    agent_type: AgentType
    labels: dict[str, str]
    capacity: int
    max_uses: int | None = Field(description="null: unlimited until it expires.")
    uses: int
    remaining_uses: int | None
    state: Literal["active", "revoked", "expired", "used_up"]
    expires_at: datetime | None
    created_by: str
    created_at: datetime
    revoked_at: datetime | None


class CreatedEnrollmentToken(EnrollmentToken):
    token: str = Field(description="The token's secret (`stve_...`), shown only here.")


class EnrollmentTokenList(Answer):
    enrollment_tokens: list[EnrollmentToken]


# -- workflows ---------------------------------------------------------------------------


class Workflow(Answer):
    """A workflow at its latest version."""

    id: str
    name: str
    version: int
    version_id: str
    description: str | None
    definition: dict[str, Any]
    plugins: dict[str, Any] = Field(
        description="Each step's plugin version, pinned when the version was applied."
    )
    created_at: datetime
    updated_at: datetime


class AppliedWorkflow(Workflow):
    """What an apply made: a new version, or the latest one again."""

    unchanged: bool = Field(
        description="True: the definition was the latest version's, and no version was made."
    )


class WorkflowList(Answer):
    workflows: list[Workflow]


class VersionSummary(Answer):
    version: int
    created_at: datetime
    created_by: str


class VersionList(Answer):
    versions: list[VersionSummary]


class WorkflowVersion(Answer):
    id: str
    name: str
    version: int
    version_id: str
    definition: dict[str, Any]
    plugins: dict[str, Any] = Field(
        description="Each step's plugin version, pinned when the version was applied."
    )
    source: str = Field(description="The text applied, as sent.")
    created_by: str
    created_at: datetime


Stage = Literal["actions", "outputs"]


class PlannedStep(Answer):
    name: str
    stage: Stage
    depends_on: list[str]


class Validation(Answer):
    valid: Literal[True]
    name: str
    steps: list[PlannedStep]


# -- executions --------------------------------------------------------------------------

ExecutionStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class ExecutionSummary(Answer):
    id: str
    workflow: str
    workflow_version: int
    status: ExecutionStatus
    inputs: dict[str, Any]
    trigger: dict[str, Any]
    error: str | None
    created_by: str
    created_at: datetime
    finished_at: datetime | None
    deadline_at: datetime | None
    reruns: int


class StepRun(Answer):
    name: str
    stage: Stage
    plugin: str
    depends_on: list[str]
    status: Literal["pending", "queued", "running", "succeeded", "failed", "skipped", "cancelled"]
    attempts: int
    agent_id: str | None
    instruction_id: str | None
    result: Any = Field(description="The step's output: any JSON, null until it succeeds.")
    error: str | None
    started_at: datetime | None
    finished_at: datetime | None
    next_attempt_at: datetime | None
    parent: str | None = Field(description="For an item of a for_each: its step's name.")
    item_index: int | None


class Execution(ExecutionSummary):
    steps: list[StepRun]


class ExecutionList(Answer):
    executions: list[ExecutionSummary]


InstructionStatus = Literal[
    "queued", "leased", "executing", "completed", "failed", "cancelled", "expired"
]


class AttemptLog(Answer):
    step: str
    instruction_id: str
    attempt: int
    status: InstructionStatus
    agent_id: str | None
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    log: list[str]


class ExecutionLogs(Answer):
    logs: list[AttemptLog]


# -- audit -------------------------------------------------------------------------------


class AuditRecord(Answer):
    id: int
    organization_id: str
    created_at: datetime
    actor: str
    action: str
    subject_type: str
    subject_id: str
    details: dict[str, Any]


class AuditList(Answer):
    records: list[AuditRecord]


# -- the agent API (AGENT_API.md) ----------------------------------------------------------


class Instruction(Answer):
    id: str
    plugin_id: str
    instruction_type: str = Field(description="`execute`, `plugin_install`, `plugin_update`.")
    plugin_configuration: dict[str, Any]
    input_data: dict[str, Any]
    timeout_seconds: int
    max_retries: int
    correlation_id: str = Field(description="`<execution id>/<step name>`.")
    # our extensions
    attempt: int
    context: dict[str, Any]


class PollAnswer(Answer):
    instruction: Instruction | None
    status: Literal["no_pending_instructions", "instruction_available"]
    next_poll_interval: int
    instructions: list[Instruction] = Field(
        default=[], description="Every instruction handed out: only with `?slots=N`."
    )


class ProgressAnswer(Answer):
    success: Literal[True]
    instruction_id: str
    updated_fields: list[Literal["status", "execution_log", "max_retries"]]


class ResultAnswer(Answer):
    acknowledged: Literal[True]
    next_instruction: Instruction | None = Field(
        description="null unless the result was posted with `?next=1`."
    )


class HeartbeatAnswer(Answer):
    acknowledged: Literal[True]
    next_heartbeat_interval: int
    commands: list[Literal["drain"]] = Field(
        default=[], description="Only for a draining agent: stop polling."
    )
    watch: list[dict[str, Any]] | None = Field(
        default=None,
        description="Only for a sensor agent: every watch it keeps running (workflows' "
        "trigger steps that select it), the whole set each time; a watch not listed stops.",
    )


# -- plugins -------------------------------------------------------------------------------


class VersionState(Answer):
    version: str
    status: Literal["active", "deprecated", "yanked"]


class Plugin(Answer):
    id: str
    name: str | None
    description: str | None
    type: str
    latest: str | None = Field(description="The highest active version, if any.")
    versions: list[VersionState]
    created_at: datetime
    updated_at: datetime


class PluginList(Answer):
    plugins: list[Plugin]


class SignedManifest(Answer):
    """What is signed (canonical JSON: sorted keys, no spaces)."""

    id: str
    version: str
    sha256: str
    size: int
    created: str


class PluginVersion(Answer):
    plugin_id: str
    version: str
    sha256: str = Field(description="The artifact's digest: the same content, the same digest.")
    size: int
    status: Literal["active", "deprecated", "yanked"]
    status_reason: str | None
    protocol: Literal["input", "stdin", "flags"]
    socket: bool = Field(
        description="It talks to its agent's socket (STAVILY_AGENT_SOCKET): reference agents only."
    )
    source: dict[str, Any] = Field(description="git (url, ref, commit), path or archive.")
    signed: SignedManifest
    signature: str = Field(description="Ed25519 over `signed`, base64.")
    key_id: str
    created_at: datetime
    published_by: str
    manifest: dict[str, Any] = Field(description="plugin.yaml as validated.")


class PublishedVersion(PluginVersion):
    created: bool = Field(description="False: the same content was published already.")


class SigningKey(Answer):
    key_id: str
    algorithm: Literal["ed25519"]
    public_key: str = Field(description="The raw 32-byte key, base64.")
    created_at: datetime
    signing: bool = Field(description="True for the key new versions are signed with.")


class SigningKeyList(Answer):
    keys: list[SigningKey]


class RolloutAgent(Answer):
    agent_id: str
    name: str
    status: Literal["pending", "installed", "failed"]
    error: str | None


class Rollout(Answer):
    id: str
    plugin_id: str
    version: str
    selector: dict[str, Any]
    created_at: datetime
    created_by: str
    total: int
    installed: int
    failed: int
    pending: int
    done: bool
    agents: list[RolloutAgent]


class AgentPluginManifest(Answer):
    """What an agent checks an artifact against before it installs it."""

    manifest: SignedManifest
    signature: str
    key_id: str
    algorithm: Literal["ed25519"]
    protocol: Literal["input", "stdin", "flags"]
    plugin: dict[str, Any] = Field(description="plugin.yaml as validated.")
    status: Literal["active", "deprecated", "yanked"]


class AgentPlugin(Answer):
    plugin_id: str
    version: str
    sha256: str | None
    status: Literal["installing", "installed", "failed"]
    error: str | None
    updated_at: datetime


class AgentPluginList(Answer):
    plugins: list[AgentPlugin]


class Event(Answer):
    """Something that may start workflows, and what it started (or why not)."""

    id: str
    source: Literal["agent", "api", "manual", "webhook", "schedule"]
    type: str
    payload: dict[str, Any]
    idempotency_key: str | None
    agent_id: str | None
    sent_by: str
    watch_id: str | None = Field(description="The watch (a workflow's trigger step) it came from")
    workflow: str | None
    step: str | None
    outcome: Literal["accepted", "started", "unmatched", "refused"] = Field(
        description="accepted: a webhook's, stored and answered, its runs not begun yet"
    )
    reason: str | None
    started: list[str] = Field(description="The executions it started")
    created_at: datetime


class EventList(Answer):
    events: list[Event]


class AgentEventAnswer(Answer):
    success: Literal[True] | None = Field(
        default=None, description="Only on POST /api/v1/triggers, as documented."
    )
    event_id: str
    duplicate: bool = Field(description="The same idempotency key came before: nothing new")
    outcome: Literal["started", "unmatched", "refused"]
    started: list[str]


# -- webhooks ----------------------------------------------------------------------------


class Webhook(Answer):
    """A webhook: POST signed requests to its `url` to start its workflow."""

    id: str
    workflow: str
    description: str | None
    url: str = Field(description="Where senders POST: <public URL>/hooks/<id>")
    idempotency_field: str | None = Field(
        description="The dotted body field whose value is a request's idempotency key"
    )
    inputs: dict[str, Any] = Field(description="The run's inputs: templates over `trigger`")
    tolerance_seconds: int = Field(
        description="How far an X-Stavily-Signature timestamp may be from now"
    )
    previous_secret_expires_at: datetime | None = Field(
        description="Until when the secret before the last rotation is still accepted"
    )
    created_by: str
    created_at: datetime
    rotated_at: datetime | None


class WebhookWithSecret(Webhook):
    secret: str = Field(description="Shown only in this answer: store it now")


class WebhookList(Answer):
    webhooks: list[Webhook]


class HookAccepted(Answer):
    event_id: str
    status: Literal["accepted", "duplicate"]
    outcome: Literal["accepted", "started", "unmatched", "refused"] | None = Field(
        default=None, description="A duplicate's: what the first request's event did"
    )


# -- users, sessions, tokens -------------------------------------------------------------


class User(Answer):
    """A member of the caller's organization."""

    id: str
    username: str
    role: str
    disabled: bool
    locked_until: datetime | None = Field(description="Locked out after failed logins until")
    last_login_at: datetime | None
    created_at: datetime


class UserList(Answer):
    users: list[User]


class Named(Answer):
    id: str
    name: str


class LoginUser(Answer):
    id: str
    username: str


class Session(Answer):
    """A login: its token is shown this once."""

    token: str = Field(description="The session's bearer token (shown once)")
    session_id: str
    expires_at: datetime = Field(description="The latest it ends, used or not")
    idle_timeout_seconds: int = Field(description="It ends sooner when unused this long")
    user: LoginUser
    organization: Named
    role: str


class Me(Answer):
    """Who the credential acts as."""

    token_id: str
    kind: Literal["api", "session"]
    user: LoginUser | None
    organization: Named
    role: str
    permissions: list[str]
    expires_at: datetime | None


class ApiToken(Answer):
    """An API token or a login session of the organization (never its secret)."""

    id: str
    name: str
    kind: Literal["api", "session"]
    role: str
    user_id: str | None = Field(description="The user it belongs to (none: the organization's)")
    created_by: str | None
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None = Field(description="To the minute")
    revoked_at: datetime | None


class ApiTokenWithSecret(ApiToken):
    token: str = Field(description="The bearer token: shown this once, kept only as a digest")


class ApiTokenList(Answer):
    tokens: list[ApiToken]


class Role(Answer):
    name: str
    builtin: bool = Field(description="admin, operator, viewer, auditor: fixed")
    description: str | None
    permissions: list[str]


class RoleList(Answer):
    roles: list[Role]
    permissions: dict[str, str] = Field(description="Every permission there is, and what it allows")


class Organization(Answer):
    id: str
    name: str
    created_at: datetime
    role: str = Field(description="The caller's role in it")


class OrganizationList(Answer):
    organizations: list[Organization]


class NewOrganization(Organization):
    admin_token: str | None = Field(
        default=None,
        description="For a caller that is a token of no user: an admin token of the new "
        "organization, shown once",
    )


# -- schedules ---------------------------------------------------------------------------


class Schedule(Answer):
    """A cron or interval schedule that starts a workflow."""

    id: str
    workflow: str
    origin: Literal["workflow", "api"] = Field(
        description="`workflow`: declared in its `schedules:` (change it there); `api`: made "
        "by POST /api/v1/schedules"
    )
    name: str | None
    cron: str | None
    timezone: str
    every_seconds: int | None
    inputs: dict[str, Any]
    misfire: Literal["skip", "once", "all"]
    paused: bool
    next_fire_at: datetime
    last_fired_at: datetime | None
    created_by: str
    created_at: datetime
    updated_at: datetime


class ScheduleList(Answer):
    schedules: list[Schedule]


# -- secrets -----------------------------------------------------------------------------


class Secret(Answer):
    """A stored secret: what it is, never its value (write-only: no answer holds one)."""

    name: str
    version: int = Field(description="1 when stored, one more at each replacement")
    key_id: str = Field(description="The organization's data key its value is encrypted under")
    created_by: str
    created_at: datetime
    updated_by: str
    updated_at: datetime


class SecretList(Answer):
    secrets: list[Secret]


class SecretKeyRotated(Answer):
    key_id: str = Field(description="The new data key; new and re-encrypted values use it")
    rewrapped: int = Field(description="How many secrets were re-encrypted under it")
    unreadable: list[str] = Field(
        description="Secrets left as they were: they do not open (altered, or moved from "
        "another name); set them again"
    )
    deleted_keys: int = Field(description="How many old data keys were deleted, now unused")
