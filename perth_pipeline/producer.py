"""``PersistenceManager``: what the terminal calls.

Write calls validate, record the change in the write-behind buffer and return;
they perform no I/O and never raise for an outage. One flusher thread per
manager sends dirty state as RQ jobs, watches the jobs it sent (a job that
failed or vanished makes its entities dirty again), keeps a circuit breaker per
backend and learns PostgreSQL's health from the workers. Reads are synchronous.

The manager only assembles the parts and is the API; each part keeps its own rules:

* :mod:`perth_pipeline.buffer`: what the terminal wrote and is not yet sent (coalesced);
* :mod:`perth_pipeline.flusher` and :mod:`perth_pipeline.tasks`: the thread that sends it, and
  its periodic work (the poll, PostgreSQL's health, route look-ups, stats);
* :mod:`perth_pipeline.inflight`: the batches sent and not yet known committed, and what
  ``flush()`` waits for;
* :mod:`perth_pipeline.health`: the backends' health and circuit breakers;
* :mod:`perth_pipeline.reader`: the restores.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import time
import uuid
import weakref
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any
from uuid import UUID

import redis

from .batch import PackedJob
from .broker import Keys, make_queue, make_redis
from .buffer import PANE, SESSION, TAB, TEMPLATE, Buffer
from .errors import InvalidRecord, PersistenceError
from .flusher import Flusher
from .health import BackendHealth
from .inflight import InFlightTracker
from .masking import masked_logger
from .reader import Reader, as_uuid
from .records import PaneHistoryChunk, PaneRecord, SessionRecord, SessionTree, TabRecord, TemplateRecord
from .settings import Settings
from .store import Store
from .validation import verify_template_name

__all__ = ["PersistenceManager", "close_all"]

logger = masked_logger("perth_pipeline.producer")

_managers: weakref.WeakSet[PersistenceManager] = weakref.WeakSet()


def close_all(timeout: float = 5.0) -> None:
    """Close every manager of this process that is not closed yet, within ``timeout`` in all.

    What ``atexit`` runs (and :func:`perth_pipeline.install_signal_handlers` on a signal): each
    sends what it holds to the queue, as :meth:`PersistenceManager.close` does.
    """
    deadline = time.monotonic() + timeout
    for manager in list(_managers):
        manager.close(timeout=max(0.1, deadline - time.monotonic()))


def _close_all_at_exit() -> None:
    close_all(timeout=2.0 * max(1, len(_managers)))


atexit.register(_close_all_at_exit)


class PersistenceManager:
    """The persistence of one terminal process. Thread-safe; one flusher thread.

    ``PersistenceManager(redis_url, database_url)`` never raises for a dead
    backend: it starts in memory and delivers when the backends answer.
    Pass ``redis=`` to supply a client (fakeredis in unit tests).
    """

    def __init__(
        self,
        redis_url: str | None = None,
        database_url: str | None = None,
        *,
        settings: Settings | None = None,
        redis_client: redis.Redis | None = None,
        start: bool = True,
    ) -> None:
        base = settings or Settings()
        self.settings = base.with_urls(redis_url or base.redis_url, database_url or base.database_url)
        s = self.settings
        if redis_client is None and not s.redis_url:
            raise PersistenceError("PersistenceManager needs a redis_url (or REDIS_URL) or a redis client")
        self.origin = f"p{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.keys = Keys(s.queue)
        self.buffer = Buffer(
            max_entities=s.max_entities,
            max_pending_history_bytes=s.max_pending_history_bytes,
            max_json_bytes=s.max_json_bytes,
            max_chunk_bytes=s.max_chunk_bytes,
        )
        self._owns_redis = redis_client is None
        self._redis = redis_client or make_redis(
            s.redis_url or "",
            connect_timeout=s.redis_connect_timeout,
            socket_timeout=s.redis_socket_timeout,
            client_name=f"perth-producer-{self.origin}",
        )
        self._store = (
            Store(s.database_url, connect_timeout=s.db_connect_timeout, statement_timeout=s.statement_timeout)
            if s.database_url
            else None
        )
        self.counters: dict[str, int] = {
            "enqueued_jobs": 0,
            "enqueued_ops": 0,
            "dropped_jobs": 0,
            "committed_jobs": 0,
            "failed_jobs": 0,
            "vanished_jobs": 0,
            "abandoned_jobs": 0,
            "refused_jobs": 0,
            "held_back": 0,  # flushes skipped because the queue was past queue_hard_depth
            "unencodable": 0,  # operations the encoder could not take (a bug): dropped, not retried
        }
        self._health = BackendHealth(s)
        self._tracker = InFlightTracker(self.buffer, self.counters, job_lease=s.job_lease)
        self._flusher = Flusher(
            settings=s,
            origin=self.origin,
            keys=self.keys,
            buffer=self.buffer,
            counters=self.counters,
            tracker=self._tracker,
            health=self._health,
            redis_client=self._redis,
            queue=make_queue(s.queue, self._redis, job_class=PackedJob),
            store=self._store,
            stats=self.stats,
        )
        self._reader = Reader(s, redis_client=self._redis, store=self._store, buffer=self.buffer)
        self._closed = False
        _managers.add(self)
        if start:
            self.start()

    @classmethod
    def from_env(cls, **overrides: Any) -> PersistenceManager:
        """Build from ``REDIS_URL``, ``DATABASE_URL`` and ``PERTH_*``; keyword arguments override settings."""
        return cls(settings=Settings.from_env(**overrides))

    @classmethod
    def embedded(
        cls, data_dir: Path | str | None = None, **overrides: Any
    ) -> AbstractContextManager[PersistenceManager]:
        """For scripts and notebooks: ``with PersistenceManager.embedded() as manager: ...``.

        Starts the embedded Redis and PostgreSQL in ``data_dir`` (default ``PERTH_DATA_DIR``),
        or reuses the ones running there, applies the schema and runs a worker in a thread of
        this process, so that writes land with nothing else running. Leaving the block waits
        (bounded) until the writes are committed, stops the worker, closes the manager and stops
        the servers it started. Keyword arguments override settings. See
        :mod:`perth_pipeline.localstack`; ``examples/quickstart.py`` uses it.
        """
        from .localstack import embedded_manager

        return embedded_manager(data_dir, **overrides)

    def start(self) -> None:
        if not self._closed:
            self._flusher.start()

    def __enter__(self) -> PersistenceManager:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- writes: validate, buffer, return. Never I/O, never raise for an outage. ------------

    def create_session(self, session: SessionRecord) -> None:
        self.buffer.put_session(session)

    def update_session(self, session: SessionRecord) -> None:
        self.buffer.put_session(session)

    def _id(self, value: Any, field_name: str) -> UUID:
        try:
            return as_uuid(value, field_name)
        except InvalidRecord:
            self.buffer.count_invalid()
            raise

    def touch_session(self, session_id: UUID | str) -> None:
        self.buffer.touch_session(self._id(session_id, "session_id"), datetime.now(UTC))

    def delete_session(self, session_id: UUID | str) -> None:
        self.buffer.delete(SESSION, self._id(session_id, "session_id"))

    def create_tab(self, tab: TabRecord) -> None:
        self.buffer.put_tab(tab)

    def update_tab(self, tab: TabRecord) -> None:
        self.buffer.put_tab(tab)

    def delete_tab(self, tab_id: UUID | str) -> None:
        self.buffer.delete(TAB, self._id(tab_id, "tab_id"))

    def create_pane(self, pane: PaneRecord) -> None:
        self.buffer.put_pane(pane)

    def update_pane(self, pane: PaneRecord) -> None:
        self.buffer.put_pane(pane)

    def delete_pane(self, pane_id: UUID | str) -> None:
        self.buffer.delete(PANE, self._id(pane_id, "pane_id"))

    def append_pane_history(self, chunk: PaneHistoryChunk) -> None:
        self.buffer.append_history(chunk)

    def save_template(self, template: TemplateRecord) -> None:
        self.buffer.put_template(template)

    def delete_template(self, name: str) -> None:
        try:
            verify_template_name(name)
        except InvalidRecord:
            self.buffer.count_invalid()
            raise
        self.buffer.delete(TEMPLATE, name)

    # --- durability and lifecycle ------------------------------------------------------------

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every batch holding the writes made so far has been committed.

        Returns False if that did not happen within ``timeout`` (a backend is down,
        the workers are behind); the writes stay buffered and are delivered later.
        """
        target = self.buffer.seq
        return self._flusher.wait(lambda: self._tracker.settled(target), timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is buffered to the queue (not waiting for workers) and stop the flusher."""
        if self._closed:
            return
        self._closed = True
        _managers.discard(self)
        if not self._flusher.stop(timeout):
            # still running (blocked on a backend, or not yet woken when the timeout is 0): it is a
            # daemon thread and the process may exit; the clients it uses are left to it (closing
            # them here could wait on its lock). Only unsent writes are worth a warning.
            unsent = self.buffer.gauges()
            if unsent["dirty"] or unsent["pending_history_chunks"] or self._tracker.gauges()[1]:
                logger.warning("flusher did not finish within %.1f s; unsent state is dropped", timeout)
            return
        if self._store is not None:
            self._store.close()
        if self._owns_redis:
            with contextlib.suppress(Exception):  # closing a broken connection may fail; it is gone
                self._redis.close()

    def is_available(self) -> bool:
        """Both backends answered recently (Redis within a few seconds, PostgreSQL not known down)."""
        return self._health.is_available()

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.buffer.counters)
        out.update(self.counters)
        out.update(self.buffer.gauges())
        inflight, sending, oldest_sent_at = self._tracker.gauges()
        out["inflight_jobs"] = inflight
        out["sending"] = sending  # drained, not yet on the queue
        out["queue_depth"] = self._health.queue_depth
        # how far the workers are behind this producer: the age of its oldest batch not yet committed
        out["lag_seconds"] = 0.0 if oldest_sent_at is None else round(time.monotonic() - oldest_sent_at, 3)
        out["redis_down"] = self._health.redis.is_down
        out["database_down"] = self._health.db_ok is False
        out["origin"] = self.origin
        return out

    # --- reads (synchronous, from PostgreSQL): see perth_pipeline.reader -----------------------------

    def restore_session(self, session_id: UUID | str, *, wait: float | None = None) -> SessionRecord:
        return self._reader.restore_session(session_id, wait=wait)

    def restore_session_tree(
        self, session_id: UUID | str, *, wait: float | None = None, with_history: bool = True
    ) -> SessionTree:
        """The session, its tabs, their panes and (unless told not to) their scrollback, at once.

        What :meth:`restore_session`, :meth:`restore_tabs`, :meth:`restore_panes` of each tab and
        :meth:`restore_pane_history` of each pane give, waiting once (bounded, as they do) for the
        session's queued batches, then read in one snapshot of the database and a few round trips
        instead of two or three per pane. ``NotFound`` if the session is absent or deleted.
        """
        return self._reader.restore_session_tree(session_id, wait=wait, with_history=with_history)

    def restore_tabs(self, session_id: UUID | str, *, wait: float | None = None) -> list[TabRecord]:
        return self._reader.restore_tabs(session_id, wait=wait)

    def restore_panes(self, tab_id: UUID | str, *, wait: float | None = None) -> list[PaneRecord]:
        return self._reader.restore_panes(tab_id, wait=wait)

    def restore_pane_history(self, pane_id: UUID | str, *, wait: float | None = None) -> bytes:
        return self._reader.restore_pane_history(pane_id, wait=wait)

    def list_sessions(self) -> list[SessionRecord]:
        return self._reader.list_sessions()

    def get_template(self, name: str) -> TemplateRecord:
        return self._reader.get_template(name)

    def list_templates(self) -> list[TemplateRecord]:
        return self._reader.list_templates()
