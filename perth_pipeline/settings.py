"""One settings object, built from the environment at the edge.

Nothing reads the environment at import time: the command line and
:meth:`PersistenceManager.from_env` call :meth:`Settings.from_env`; library
users may build :class:`Settings` directly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .limits import MAX_CHUNK_BYTES, MAX_JSON_BYTES, MAX_OPS_PER_BATCH
from .masking import mask_url
from .units import parse_duration

__all__ = ["Settings", "mask_url", "parse_duration"]


def _default_data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "perth-pipeline"


class Settings(BaseSettings):
    """Everything configurable, with safe defaults. Environment names are in the README."""

    model_config = SettingsConfigDict(env_prefix="PERTH_", extra="ignore", frozen=True, populate_by_name=True)

    # --- where things are ---------------------------------------------------------------
    redis_url: str | None = Field(default=None, validation_alias=AliasChoices("REDIS_URL", "PERTH_REDIS_URL"))
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("DATABASE_URL", "PERTH_DATABASE_URL")
    )
    queue: str = Field(default="perth", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    data_dir: Path = Field(default_factory=_default_data_dir)

    # --- the producer ---------------------------------------------------------------------
    #: how often the flusher sends what is dirty; freshness is about this plus one apply.
    flush_interval: float = Field(default=0.05, gt=0, le=60)
    batch_max_ops: int = Field(default=1000, ge=1, le=MAX_OPS_PER_BATCH)
    batch_max_bytes: int = Field(default=1 << 20, ge=4096, le=16 << 20)
    #: live entities (sessions, tabs, panes, templates) the buffer holds; past it new ones are dropped.
    max_entities: int = Field(default=250_000, ge=10)
    #: scrollback bytes waiting to be sent; past it the oldest chunks are dropped.
    max_pending_history_bytes: int = Field(default=32 << 20, ge=1024)
    #: a producer's limits of one JSON field and one scrollback chunk: at most the wire's (the
    #: workers'), so that what a write call accepts is never refused by a worker.
    max_json_bytes: int = Field(default=256 << 10, ge=64, le=MAX_JSON_BYTES)
    max_chunk_bytes: int = Field(default=256 << 10, ge=64, le=MAX_CHUNK_BYTES)
    #: jobs of one producer on the queue and not yet finished; past it, state stays dirty.
    max_inflight_jobs: int = Field(default=2000, ge=1)
    #: queue depth past which the producer flushes less often (more coalescing) ...
    queue_soft_depth: int = Field(default=200, ge=1)
    #: ... and past which it stops enqueueing until the queue drains.
    queue_hard_depth: int = Field(default=5000, ge=1)
    redis_connect_timeout: float = Field(default=0.5, gt=0, le=30)
    redis_socket_timeout: float = Field(default=1.0, gt=0, le=60)
    breaker_base: float = Field(default=0.5, gt=0)
    breaker_max: float = Field(default=30.0, gt=0)
    #: how long a read of a session waits for that session's queued batches.
    read_wait: float = Field(default=2.0, ge=0)
    zstd_level: int = Field(default=3, ge=1, le=19)

    # --- PostgreSQL -------------------------------------------------------------------------
    db_connect_timeout: int = Field(default=3, ge=1, le=60)
    statement_timeout: float = Field(default=30.0, gt=0)

    # --- workers and jobs -------------------------------------------------------------------
    job_timeout: int = Field(default=120, ge=5)
    #: seconds a finished job's hash is kept (the producer checks its jobs against it).
    result_ttl: int = Field(default=900, ge=60)
    #: seconds a failed batch is kept in the failed registry (RQ's default is a year).
    failed_ttl: int = Field(default=7 * 86400, ge=60)
    #: back-off between retries of a batch that failed for a database outage (seconds).
    retry_intervals: tuple[int, ...] = (1, 2, 5, 10, 20, 30, 60, 60, 120, 120, 300, 300)
    #: how often a live worker checks for abandoned jobs (a worker that was SIGKILLed).
    maintenance_interval: int = Field(default=10, ge=1)
    #: the started-job lease: a job whose worker stops heart-beating is re-run after this.
    job_lease: int = Field(default=15, ge=3)
    health_ttl: int = Field(default=15, ge=2)

    # --- retention ----------------------------------------------------------------------------
    tombstone_retention: float = Field(default=30 * 86400.0, gt=0)
    #: scrollback kept per pane in the database (the oldest chunks beyond it are deleted).
    history_retention_bytes: int = Field(default=8 << 20, ge=0)

    @field_validator("tombstone_retention", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Read ``REDIS_URL``, ``DATABASE_URL`` and ``PERTH_*``; keyword arguments win."""
        return cls(**overrides)

    def with_urls(self, redis_url: str | None, database_url: str | None) -> Settings:
        return self.model_copy(update={"redis_url": redis_url, "database_url": database_url})

    def masked(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        data["redis_url"] = mask_url(self.redis_url)
        data["database_url"] = mask_url(self.database_url)
        return data
