"""The one settings class: environment variables `STAVILY_*`, overridable by CLI flags."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STAVILY_", env_file=None, extra="ignore")

    data_dir: Path = Field(default=Path(".stavily"), description="Where embedded data lives.")
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy async URL; SQLite under data_dir when unset.",
    )
    database_pool_size: int = Field(
        default=20,
        ge=1,
        le=1000,
        description="PostgreSQL connections each server process keeps open. A request "
        "waits for a free one rather than opening more: opening and closing a connection "
        "per request costs far more than the wait. Half of them serve write transactions "
        "and single statements, the rest reads.",
    )
    bootstrap_token: str | None = Field(
        default=None,
        repr=False,
        description="Admin API token created on start (at least 32 characters, 10 distinct); "
        "changing it revokes the one an earlier start created.",
    )
    agent_jwt_key: str | None = Field(
        default=None,
        repr=False,
        description="The key agent JWTs are signed with (at least 32 characters), the same "
        "on every replica; unset: the file agent-jwt.key in data_dir, made on first start.",
    )
    secrets_key: str | None = Field(
        default=None,
        repr=False,
        description="The key what the server reads back from the database is sealed with "
        "(AES-GCM; at least 32 characters): webhook secrets, the secret store's data keys; "
        "the same on every replica; unset: the "
        "file secrets.key in data_dir, made on first start. Losing it loses those secrets.",
    )
    secrets_key_previous: str | None = Field(
        default=None,
        repr=False,
        description="During a rotation of secrets_key, the key(s) it replaces, separated "
        "by commas: what they sealed still opens until `stavily db rekey` re-seals it.",
    )
    public_url: str | None = Field(
        default=None,
        description="This server's URL as webhook senders reach it (behind a proxy, say); "
        "unset: the URL each API request came to.",
    )
    webhook_tolerance_seconds: int = Field(
        default=300,
        ge=10,
        le=86400,
        description="A new webhook's window for X-Stavily-Signature timestamps, either way.",
    )
    webhook_max_body_bytes: int = Field(
        default=1024 * 1024, ge=1024, description="The largest webhook body accepted."
    )
    # -- transport ------------------------------------------------------------------------
    tls_cert: Path | None = Field(
        default=None, description="PEM certificate (chain) to serve HTTPS with; needs tls_key."
    )
    tls_key: Path | None = Field(default=None, description="The PEM private key of tls_cert.")
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins browsers may call the private API from (CORS); none: CORS off.",
    )
    # -- rate limits (limits notation; shared through Redis when redis_url is set) ----------
    redis_url: str | None = Field(
        default=None,
        repr=False,
        description="Redis for rate-limit counters shared by every process and replica "
        "(redis://host:6379/0); unset: counters in memory, per process.",
    )
    api_rate_limit: str = Field(
        default="50/second", description="Private API requests one token may send."
    )
    source_rate_limit: str = Field(
        default="500/second",
        description="Requests one source address may send to the private API, and webhooks.",
    )
    agent_source_rate_limit: str = Field(
        default="5000/second",
        description="Agent API requests one source address may send (a fleet behind one "
        "NAT address shares it: 10,000 agents make some 1,300 a second).",
    )
    login_rate_limit: str = Field(
        default="10/minute", description="Login attempts one source address may make."
    )
    metrics_cache_seconds: float = Field(
        default=5.0,
        ge=0,
        description="How long GET /metrics answers an organization's last scrape again "
        "(scrapes of one organization meanwhile share one read of the database).",
    )
    webhook_rate_limit: str = Field(
        default="100/second", description="Deliveries one webhook may take."
    )
    failed_credential_limit: str = Field(
        default="20/minute",
        description="Refused credentials one source address may present before every "
        "request from it is refused for the rest of the window.",
    )
    # -- users and sessions ---------------------------------------------------------------
    session_idle_seconds: int = Field(
        default=8 * 3600, ge=60, description="A login session ends after this long unused."
    )
    session_max_seconds: int = Field(
        default=7 * 86400, ge=60, description="A login session ends this long after login."
    )
    login_lockout_after: int = Field(
        default=5, ge=1, description="Failed logins in a row that lock a user out."
    )
    login_lockout_seconds: int = Field(
        default=30,
        ge=1,
        description="The first lockout's length; it doubles with each further failure "
        "(up to an hour).",
    )
    host: str = "127.0.0.1"
    port: int = 8700
    workers: int = Field(
        default=1, ge=1, le=64, description="Server processes (several need PostgreSQL)."
    )
    max_body_bytes: int = 1024 * 1024
    poll_interval: int = Field(default=10, description="next_poll_interval told to agents.")
    max_poll_wait: int = Field(default=30, description="Longest long poll (?wait=) in seconds.")
    heartbeat_interval: int = Field(
        default=30, description="Heartbeat period assumed for agents that do not say theirs."
    )
    degraded_after_missed: float = Field(
        default=1.2, description="Heartbeat intervals of silence before an agent is degraded."
    )
    offline_after_missed: float = Field(
        default=1.5,
        description="Heartbeat intervals of silence before an agent is offline and its work "
        "goes elsewhere (for agents that heartbeat while busy; others keep their leases).",
    )
    mass_death_fraction: float = Field(
        default=0.5,
        description="When more than this share of live agents falls silent in one sweep, "
        "their work is not taken back (the server or network is suspect).",
    )
    mass_death_hold: float = Field(
        default=30.0,
        description="How long the mass-death guard holds back; agents silent longer are "
        "dead whatever their number.",
    )
    mass_death_settle: float = Field(
        default=1.0,
        description="Seconds past its deadline before a silent agent is acted on, so a mass "
        "silence can show itself first.",
    )
    mass_death_min_agents: int = Field(
        default=10, description="The mass-death guard applies from this many agents."
    )
    degraded_cpu_percent: float = Field(default=95, description="CPU use that degrades an agent.")
    degraded_memory_percent: float = Field(default=95, description="Memory use that degrades.")
    degraded_disk_percent: float = Field(default=95, description="Disk use that degrades.")
    heartbeat_rate_limit: str = Field(
        default="5/second", description="Heartbeats one agent may send (limits notation)."
    )
    agent_rate_limit: str = Field(
        default="1000/second", description="Agent API requests one agent may send."
    )
    heartbeat_rate_budget: float = Field(
        default=2000,
        ge=0,
        description="Heartbeats a second the server plans for: with more live agents than "
        "this many per heartbeat interval, next_heartbeat_interval is stretched (up to 10 "
        "times) so that the fleet beats at this rate (0: never stretched).",
    )
    heartbeat_flush_interval: float = Field(
        default=0.5, description="Heartbeats are coalesced in memory and written this often."
    )
    lease_grace: int = Field(
        default=60, description="Seconds added to a step's timeout to form its lease."
    )
    reaper_interval: float = Field(
        default=1.0, description="How often leases, liveness and deadlines are checked."
    )
    max_agent_lost_attempts: int = Field(
        default=3, description="Attempts before a step whose agents keep vanishing fails."
    )
    routing_prefer_seconds: float = Field(
        default=2.0, description="How long a step waits for the agent its strategy chose."
    )
    routing_sticky_seconds: float = Field(
        default=30.0, description="How long a sticky step waits for its execution's agent."
    )
    unroutable_after: float = Field(
        default=600.0,
        description="Seconds a queued step may wait with no eligible agent before it fails.",
    )
    unreported_grace: float = Field(
        default=15.0,
        description="Seconds after a hand-out before an agent's not reporting it counts.",
    )
    credential_cache_seconds: float = Field(
        default=30.0,
        description="How long a checked credential is trusted without a lookup (longer than "
        "heartbeat intervals, so a heartbeat costs no read). Revocations apply at once on the "
        "replica that made them and, on PostgreSQL, on the others as soon as they hear of it "
        "(LISTEN/NOTIFY); a replica that missed the message, within this time.",
    )
    secret_env_prefix: str = Field(
        default="STAVILY_SECRET_",
        description="Environment variables of the server a workflow's `secrets: {x: {env: "
        "NAME}}` may read: those starting with this prefix (empty: none by prefix).",
    )
    secret_env_names: str = Field(
        default="",
        description="More variables a workflow's secrets may read, comma-separated. Never "
        "the server's own settings (other STAVILY_* variables), whatever this says.",
    )
    template_timeout: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="Seconds a step's templates may take to render (off the event loop); "
        "past it the step fails.",
    )
    template_max_output_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        description="The largest configuration a step's templates may render, in bytes.",
    )
    max_workflow_steps: int = Field(
        default=2000, ge=1, le=100_000, description="Steps one workflow may have."
    )
    max_json_depth: int = Field(
        default=128,
        ge=8,
        le=250,
        description="How deeply a JSON request body may nest; deeper bodies get 422 (and an "
        "agent's result that deep fails its step).",
    )
    scheduler_tick: float = Field(
        default=1.0, gt=0, le=60, description="How often the scheduler looks for due schedules."
    )
    scheduler_lease_ttl: float = Field(
        default=6.0,
        gt=0,
        le=300,
        description="Seconds the scheduler's lease lasts unrenewed (it is renewed each tick): "
        "a dead leader's schedules are taken over by another server process within about "
        "this plus a tick.",
    )
    scheduler_misfire_grace: float = Field(
        default=60.0,
        ge=0,
        description="A fire time at most this late is not missed: `misfire: skip` still "
        "fires it (a takeover or a slow tick is not downtime).",
    )
    log_level: str = "info"
    # -- the plugin registry (stavily.plugins) --
    plugin_store: Literal["folder", "database"] = Field(
        default="folder",
        description="Where plugin artifacts are kept: a folder (plugin_store_dir), or the "
        "database, so that replicas without a shared folder share them.",
    )
    plugin_store_dir: Path | None = Field(
        default=None, description="The artifact folder; unset: data_dir/plugins."
    )
    plugin_keys_dir: Path | None = Field(
        default=None,
        description="The Ed25519 signing keys (never in the database), the same on every "
        "replica; unset: data_dir/plugin-keys, made on first start.",
    )
    plugin_source_roots: list[Path] = Field(
        default_factory=list,
        description="Server folders a plugin may be published from by path (or file:// "
        "git URL); none by default: the CLI uploads a local folder as an archive.",
    )
    plugin_git_timeout: float = Field(
        default=120, gt=0, description="Seconds a git fetch may take."
    )
    plugin_max_archive_bytes: int = Field(
        default=100 * 1024 * 1024, ge=1024, description="Largest plugin artifact or upload."
    )
    plugin_max_file_bytes: int = Field(
        default=50 * 1024 * 1024, ge=1, description="Largest file in a plugin."
    )
    plugin_max_files: int = Field(default=10_000, ge=1, description="Most files in a plugin.")
    plugin_allow_network: bool = Field(
        default=True, description="Whether plugins may ask for permissions.network."
    )
    plugin_denied_write_paths: list[str] = Field(
        default_factory=lambda: [
            "/",
            "/bin",
            "/boot",
            "/dev",
            "/etc",
            "/lib",
            "/lib64",
            "/proc",
            "/root",
            "/sbin",
            "/sys",
            "/usr",
        ],
        description="permissions.filesystem.write refused at publish: these folders and "
        "what is under them ('/' itself only).",
    )
    plugin_denied_capabilities: list[str] = Field(
        default_factory=lambda: [
            "CAP_SYS_ADMIN",
            "CAP_SYS_MODULE",
            "CAP_SYS_RAWIO",
            "CAP_SYS_PTRACE",
            "CAP_SYS_BOOT",
            "CAP_MAC_ADMIN",
            "CAP_MAC_OVERRIDE",
            "CAP_BPF",
        ],
        description="permissions.capabilities refused at publish.",
    )
    plugin_denied_system_calls: list[str] = Field(
        default_factory=lambda: [
            "bpf",
            "delete_module",
            "finit_module",
            "init_module",
            "kexec_load",
            "mount",
            "pivot_root",
            "ptrace",
            "reboot",
            "swapoff",
            "swapon",
            "umount2",
        ],
        description="permissions.system_calls refused at publish.",
    )
    plugin_install_timeout: int = Field(
        default=300, ge=10, description="Seconds an agent has to install a plugin."
    )
    plugin_install_retry_seconds: float = Field(
        default=600,
        ge=0,
        description="After an agent's install of a version failed: how long it is not asked "
        "again (others may take the step; with none left, the step fails).",
    )
    unregistered_plugins: Literal["refuse", "allow"] = Field(
        default="refuse",
        description="A workflow step naming a plugin the registry does not have: refused "
        "at apply, or (allow: fleets whose plugins were copied onto agents by hand) run "
        "unpinned, its config handed to the plugin as before the registry.",
    )

    @classmethod
    def variables(cls) -> list[str]:
        """The environment variables these settings are read from."""
        prefix = cls.model_config.get("env_prefix", "")
        return [f"{prefix}{name}".upper() for name in cls.model_fields]

    @cached_property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'stavily.db').resolve()}"

    @property
    def plugin_store_path(self) -> Path:
        return self.plugin_store_dir or self.data_dir / "plugins"

    @property
    def plugin_keys_path(self) -> Path:
        return self.plugin_keys_dir or self.data_dir / "plugin-keys"

    @property
    def is_sqlite(self) -> bool:
        return self.effective_database_url.startswith("sqlite")
