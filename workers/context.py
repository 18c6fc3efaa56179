"""What a job needs from its worker process: one PostgreSQL connection, the applier, Redis.

A worker process keeps one connection for its whole life (no connection per job)
and reopens it when it breaks. It also reports what it sees of PostgreSQL in its
own field of a health hash in Redis, which producers and ``perth-pipeline status``
read (any worker that reaches PostgreSQL outweighs those that cannot), and removes
that field when it stops.

The context of the process is owned by this module: the worker binds its own
(:func:`bind`, at start; unbound at teardown) and the job functions find it with
:func:`current_context`, which builds one from the environment when jobs run
outside our worker (a plain ``rq worker``). One per process, as the connection.

The connection is set up so that a worker that dies cannot hold the locks of a
session for long: ``client_connection_check_interval`` makes the server notice a
vanished client within a second even in the middle of a statement (PostgreSQL 14+),
and ``statement_timeout`` is kept below the job timeout, so that a stuck statement
is cancelled by the server before RQ abandons the job.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from typing import Any

import psycopg
import redis
from psycopg.pq import TransactionStatus

from perth_pipeline.broker import Keys, clear_db_health, make_redis, prune_db_health, write_db_health
from perth_pipeline.errors import DatabaseUnavailable
from perth_pipeline.masking import first_line, mask_url, masked_logger
from perth_pipeline.settings import Settings
from perth_pipeline.store import connect

from .applier import Applier

__all__ = ["JobContext", "bind", "current_context", "effective_statement_timeout"]

logger = masked_logger("workers.context")

_HEALTH_EVERY = 2.0
#: a successful round trip this recent spares the check before the next dequeue
_CHECK_FRESH = 1.0


def effective_statement_timeout(settings: Settings) -> float:
    """``statement_timeout``, at most half the job timeout: a statement must not outlive its job."""
    return min(settings.statement_timeout, settings.job_timeout / 2)


class JobContext:
    def __init__(self, settings: Settings, redis_client: redis.Redis, *, name: str | None = None) -> None:
        if not settings.database_url:
            raise DatabaseUnavailable("workers need DATABASE_URL")
        self.settings = settings
        self.redis = redis_client
        self.keys = Keys(settings.queue)
        # the field of this process in the health hash: two processes on a host are two reports
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.applier = Applier(history_retention_bytes=settings.history_retention_bytes)
        self.statement_timeout = effective_statement_timeout(settings)
        if self.statement_timeout < settings.statement_timeout:
            logger.warning(
                "statement_timeout %.0f s is not below the job timeout %d s; using %.0f s",
                settings.statement_timeout,
                settings.job_timeout,
                self.statement_timeout,
            )
        self._conn: psycopg.Connection[Any] | None = None
        self._ok_at = -_CHECK_FRESH
        self._health_at = 0.0
        self._health_ok: bool | None = None
        # a report must be renewed well within health_ttl, or readers take it for a dead worker's
        self._health_every = min(_HEALTH_EVERY, settings.health_ttl / 3)
        self._pruned_at = -float(settings.health_ttl)
        self.db_down_since: float | None = None
        self.last_error: str | None = None

    def connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = None
            conn = connect(
                self.settings.database_url or "",
                connect_timeout=self.settings.db_connect_timeout,
                statement_timeout=self.statement_timeout,
            )
            try:
                self._configure(conn)
            except psycopg.Error as exc:
                with contextlib.suppress(Exception):  # it is discarded anyway
                    conn.close()
                raise DatabaseUnavailable(
                    f"PostgreSQL unavailable at {mask_url(self.settings.database_url)}: {first_line(exc)}"
                ) from None
            self._conn = conn
        return self._conn

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        # pg_stat_activity names the worker process that holds each backend
        conn.execute("SELECT set_config('application_name', %s, false)", (f"perth-worker pid={os.getpid()}",))
        if conn.info.server_version >= 140000:
            conn.execute("SELECT set_config('client_connection_check_interval', '1s', false)")

    def discard_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # closing a broken connection may fail; it is gone
                self._conn.close()
            self._conn = None

    def connection_lost(self) -> bool:
        """Whether the connection is gone (the server closed it, the network failed)."""
        return self._conn is None or self._conn.closed or self._conn.broken

    def after_failure(self) -> None:
        """A job failed: keep the connection only if it is idle (not mid-statement, not in a transaction)."""
        conn = self._conn
        if conn is None:
            return
        if conn.closed or conn.broken or conn.info.transaction_status != TransactionStatus.IDLE:
            self.discard_connection()

    def check_database(self) -> bool:
        """Whether PostgreSQL takes writes: a cheap round trip (skipped right after a success), reported."""
        if self._conn is not None and not self._conn.broken and time.monotonic() - self._ok_at < _CHECK_FRESH:
            return True
        try:
            row = self.connection().execute("SELECT pg_is_in_recovery()").fetchone()
        except (psycopg.Error, DatabaseUnavailable) as exc:
            self.discard_connection()
            self.database_failed(exc)
            return False
        if row is not None and row[0]:
            self.discard_connection()
            self.database_failed(DatabaseUnavailable("PostgreSQL is a read-only standby (in recovery)"))
            return False
        self.database_ok()
        return True

    def database_ok(self) -> None:
        self._ok_at = time.monotonic()
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
        self._ok_at = -_CHECK_FRESH
        self.last_error = first_line(exc)
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
        if ok == self._health_ok and now - self._health_at < self._health_every:
            return
        ttl = self.settings.health_ttl
        try:
            write_db_health(self.redis, self.keys, ok=ok, source=self.name, ttl=ttl, error=self.last_error)
            self._health_ok, self._health_at = ok, now
            if now - self._pruned_at >= ttl:
                # the reports of workers that died without removing theirs (a field has no TTL)
                self._pruned_at = now
                prune_db_health(self.redis, self.keys, ttl=ttl)
        except redis.RedisError:
            pass  # the worker's main loop notices a dead Redis on its own

    def withdraw_report(self) -> None:
        """This worker stops: its report goes, so that it no longer counts as a worker that is up."""
        self._health_ok = None
        # if Redis is gone, the report goes stale within health_ttl and is pruned later
        with contextlib.suppress(redis.RedisError):
            clear_db_health(self.redis, self.keys, self.name)

    def close(self) -> None:
        self.withdraw_report()
        self.discard_connection()


class _Process:
    """The context of this worker process (see the module's docstring): a process-wide global."""

    context: JobContext | None = None


def bind(context: JobContext | None) -> None:
    """Set the worker process's context (its PostgreSQL connection and Redis client), or unset it."""
    _Process.context = context


def current_context() -> JobContext:
    """The worker process's context; built from the environment if no worker bound one."""
    if _Process.context is None:
        # run outside our worker (a plain `rq worker`): build the context from the environment
        settings = Settings.from_env()
        if not settings.redis_url:
            raise DatabaseUnavailable("no worker context and no REDIS_URL")
        _Process.context = JobContext(settings, make_redis(settings.redis_url, socket_timeout=10.0))
    return _Process.context
