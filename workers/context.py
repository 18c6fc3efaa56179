"""What a job needs from its worker process: one PostgreSQL connection, the applier, Redis.

A worker process keeps one connection for its whole life (no connection per job)
and reopens it when it breaks. It also reports what it sees of PostgreSQL in a
health key in Redis, which producers and ``perth-pipeline status`` read.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from typing import Any

import psycopg
import redis

from perth_pipeline.broker import Keys, write_db_health
from perth_pipeline.errors import DatabaseUnavailable
from perth_pipeline.settings import Settings, mask_url
from perth_pipeline.store import connect

from .applier import Applier

__all__ = ["JobContext"]

logger = logging.getLogger("workers.context")

_HEALTH_EVERY = 2.0


class JobContext:
    def __init__(self, settings: Settings, redis_client: redis.Redis, *, name: str | None = None) -> None:
        if not settings.database_url:
            raise DatabaseUnavailable("workers need DATABASE_URL")
        self.settings = settings
        self.redis = redis_client
        self.keys = Keys(settings.queue)
        self.name = name or socket.gethostname()
        self.applier = Applier(history_retention_bytes=settings.history_retention_bytes)
        self._conn: psycopg.Connection[Any] | None = None
        self._health_at = 0.0
        self._health_ok: bool | None = None
        self.db_down_since: float | None = None
        self.last_error: str | None = None

    def connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = connect(
                self.settings.database_url or "",
                connect_timeout=self.settings.db_connect_timeout,
                statement_timeout=self.settings.statement_timeout,
            )
        return self._conn

    def discard_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # closing a broken connection may fail; it is gone
                self._conn.close()
            self._conn = None

    def check_database(self) -> bool:
        """A cheap round trip; reconnects if needed. Reports the result (throttled)."""
        try:
            self.connection().execute("SELECT 1")
        except (psycopg.Error, DatabaseUnavailable) as exc:
            self.discard_connection()
            self.database_failed(exc)
            return False
        self.database_ok()
        return True

    def database_ok(self) -> None:
        if self.db_down_since is not None:
            logger.info(
                "PostgreSQL reachable again after %.1f s",
                time.monotonic() - self.db_down_since,
                extra={"database": mask_url(self.settings.database_url)},
            )
        self.db_down_since = None
        self.last_error = None
        self._report(True)

    def database_failed(self, exc: BaseException) -> None:
        self.last_error = _first_line(exc)
        if self.db_down_since is None:
            self.db_down_since = time.monotonic()
            logger.warning(
                "PostgreSQL unreachable (%s); this worker takes no jobs until it is back",
                self.last_error,
                extra={"database": mask_url(self.settings.database_url)},
            )
        self._report(False)

    def _report(self, ok: bool) -> None:
        now = time.monotonic()
        if ok == self._health_ok and now - self._health_at < _HEALTH_EVERY:
            return
        try:
            write_db_health(
                self.redis,
                self.keys,
                ok=ok,
                source=self.name,
                ttl=self.settings.health_ttl,
                error=self.last_error,
            )
            self._health_ok, self._health_at = ok, now
        except redis.RedisError:
            pass  # the worker's main loop notices a dead Redis on its own

    def close(self) -> None:
        self.discard_connection()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
