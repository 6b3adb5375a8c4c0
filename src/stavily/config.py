"""The one settings class: environment variables `STAVILY_*`, overridable by CLI flags."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STAVILY_", env_file=None, extra="ignore")

    data_dir: Path = Field(default=Path(".stavily"), description="Where embedded data lives.")
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy async URL; SQLite under data_dir when unset.",
    )
    bootstrap_token: str | None = Field(
        default=None, description="Admin API token created on first start."
    )
    host: str = "127.0.0.1"
    port: int = 8700
    max_body_bytes: int = 1024 * 1024
    poll_interval: int = Field(default=10, description="next_poll_interval told to agents.")
    max_poll_wait: int = Field(default=30, description="Longest long poll (?wait=) in seconds.")
    heartbeat_interval: int = Field(default=30, description="Expected agent heartbeat period.")
    offline_after_missed: int = Field(default=3, description="Missed heartbeats before offline.")
    heartbeat_flush_interval: float = Field(
        default=0.5, description="Heartbeats are coalesced in memory and written this often."
    )
    lease_grace: int = Field(
        default=60, description="Seconds added to a step's timeout to form its lease."
    )
    reaper_interval: float = Field(default=2.0, description="How often leases are checked.")
    max_agent_lost_attempts: int = Field(
        default=3, description="Attempts before a step whose agents keep vanishing fails."
    )
    credential_cache_seconds: float = Field(
        default=5.0, description="How long a checked credential is trusted without a lookup."
    )
    log_level: str = "info"

    @cached_property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'stavily.db').resolve()}"

    @property
    def is_sqlite(self) -> bool:
        return self.effective_database_url.startswith("sqlite")
