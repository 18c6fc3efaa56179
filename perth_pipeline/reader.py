"""Restores: synchronous reads from PostgreSQL, after the session's queued batches.

A read of a session first waits, bounded by ``read_wait``, until every batch already enqueued
for that session (by any producer: each notes its batches in the session's ``outstanding`` set)
has been applied, so that a terminal that wrote and restarted reads what it wrote, not what the
workers had reached. Past the bound it reads what is there and says so in a warning: a slow
queue must not hang a restore. Without Redis it reads at once.

Within a producer (``PersistenceManager``'s read methods delegate here) a read also tells the
buffer two things, so that later writes are not lost behind what was read:

* the versions read (``observe``): the hybrid clock never issues a version at or below a stored
  one, even if this host's wall clock stepped back since that row was written;
* the routes read (each tab's session, each pane's tab and session): writes under a restored tab
  or pane are sent at once instead of waiting for a route look-up.

The command line reads with a ``Reader`` of its own, without a buffer: no flusher thread, no
producer.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

import redis
from rq.job import Job

from .broker import LIVE_STATUSES, Keys, make_redis
from .errors import Ambiguous, DatabaseUnavailable, InvalidRecord, NotFound
from .masking import masked_logger
from .records import PaneRecord, SessionRecord, SessionTree, TabRecord, TemplateRecord
from .settings import Settings
from .store import SessionSummary, Store

if TYPE_CHECKING:
    from .buffer import Buffer

__all__ = ["Reader", "as_uuid"]

logger = masked_logger("perth_pipeline.producer")

R = TypeVar("R")

_ID_PREFIX = re.compile(r"^[0-9a-f][0-9a-f-]{0,35}$")


def as_uuid(value: Any, field_name: str) -> UUID:
    if isinstance(value, UUID):
        return value
    try:
        return UUID(str(value))
    except (TypeError, ValueError):
        raise InvalidRecord(field_name, f"{value!r} is not a UUID") from None


class Reader:
    """The eight restore reads. Clients passed in are the caller's; those it makes, it closes.

    ``Reader(settings)`` connects to ``settings.redis_url`` (for the wait) and ``database_url``;
    ``buffer``: the producer's, told the versions and routes read (see the module docstring).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        redis_client: redis.Redis | None = None,
        store: Store | None = None,
        buffer: Buffer | None = None,
    ) -> None:
        s = self.settings = settings
        self.keys = Keys(s.queue)
        self.buffer = buffer
        self._owns_redis = redis_client is None and bool(s.redis_url)
        self._redis = redis_client
        if self._owns_redis:
            self._redis = make_redis(
                s.redis_url or "",
                connect_timeout=s.redis_connect_timeout,
                socket_timeout=s.redis_socket_timeout,
                client_name=f"perth-reader-p{os.getpid()}",
            )
        self._owns_store = store is None and bool(s.database_url)
        self._store = store
        if self._owns_store:
            self._store = Store(
                s.database_url or "",
                connect_timeout=s.db_connect_timeout,
                statement_timeout=s.statement_timeout,
            )

    def close(self) -> None:
        if self._owns_store and self._store is not None:
            self._store.close()
        if self._owns_redis and self._redis is not None:
            with contextlib.suppress(Exception):  # closing a broken connection may fail; it is gone
                self._redis.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- what every read shares ------------------------------------------------------------------

    def _reads(self) -> Store:
        if self._store is None:
            raise DatabaseUnavailable("no database_url (or DATABASE_URL) is configured for reads")
        return self._store

    def _observed(self, rows: Iterable[tuple[R, int]]) -> list[R]:
        """The records of ``rows``, each ``(record, version)``, their versions told to the clock."""
        records = []
        for record, version in rows:
            if self.buffer is not None:
                self.buffer.observe_version(version)
            records.append(record)
        return records

    def _found(self, found: tuple[R, int] | None, what: str) -> R:
        if found is None:
            raise NotFound(f"{what} is not stored (or was deleted)")
        return self._observed([found])[0]

    def _learn_routes(
        self, tabs: dict[UUID, UUID] | None = None, panes: dict[UUID, tuple[UUID, UUID]] | None = None
    ) -> None:
        if self.buffer is not None:
            self.buffer.learn_routes(tabs=tabs, panes=panes)

    def wait_for_session(self, session_id: UUID, wait: float | None) -> None:
        """Wait (bounded) until every batch already enqueued for the session has been applied."""
        if self._redis is None:
            return
        bound = self.settings.read_wait if wait is None else wait
        deadline = time.monotonic() + bound
        key = self.keys.outstanding(session_id)
        delay = 0.005
        while True:
            try:
                members = [
                    m.decode() if isinstance(m, bytes) else str(m) for m in self._redis.zrange(key, 0, -1)
                ]
                if not members:
                    return
                with self._redis.pipeline(transaction=False) as pipe:
                    for job_id in members:
                        pipe.hget(Job.key_for(job_id), "status")
                    statuses = pipe.execute()
                pending = [
                    m for m, st in zip(members, statuses, strict=True) if st and st.decode() in LIVE_STATUSES
                ]
                done = [m for m in members if m not in pending]
                if done:
                    self._redis.zrem(key, *done)
            except redis.RedisError as exc:
                logger.warning("cannot see the queue (%s); reading session %s as it is", exc, session_id)
                return
            if not pending:
                return
            if time.monotonic() >= deadline:
                logger.warning(
                    "session %s may be stale: %d of its batches are still queued after %.1f s",
                    session_id,
                    len(pending),
                    bound,
                    extra={"session_id": str(session_id), "pending_batches": len(pending)},
                )
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    # --- the reads ---------------------------------------------------------------------------------

    def restore_session(self, session_id: UUID | str, *, wait: float | None = None) -> SessionRecord:
        sid = as_uuid(session_id, "session_id")
        self.wait_for_session(sid, wait)
        return self._found(self._reads().session(sid), f"session {sid}")

    def restore_session_tree(
        self, session_id: UUID | str, *, wait: float | None = None, with_history: bool = True
    ) -> SessionTree:
        """The session, its tabs, their panes and (unless told not to) their scrollback, at once.

        What :meth:`restore_session`, :meth:`restore_tabs`, :meth:`restore_panes` of each tab and
        :meth:`restore_pane_history` of each pane give, waiting once (bounded, as they do) for the
        session's queued batches, then read in one snapshot of the database and a few round trips
        instead of two or three per pane. ``NotFound`` if the session is absent or deleted.
        """
        sid = as_uuid(session_id, "session_id")
        self.wait_for_session(sid, wait)
        tree = self._found(self._reads().session_tree(sid, with_history=with_history), f"session {sid}")
        self._learn_routes(
            tabs={tab.id: sid for tab in tree.tabs},
            panes={pane.id: (tab_id, sid) for tab_id, panes in tree.panes.items() for pane in panes},
        )
        return tree

    def restore_tabs(self, session_id: UUID | str, *, wait: float | None = None) -> list[TabRecord]:
        sid = as_uuid(session_id, "session_id")
        self.wait_for_session(sid, wait)
        tabs = self._observed(self._reads().tabs(sid))
        self._learn_routes(tabs={tab.id: tab.session_id for tab in tabs})
        return tabs

    def restore_panes(self, tab_id: UUID | str, *, wait: float | None = None) -> list[PaneRecord]:
        tid = as_uuid(tab_id, "tab_id")
        store = self._reads()
        session_id = store.session_of_tab(tid)
        if session_id is not None:
            self.wait_for_session(session_id, wait)
        panes = self._observed(store.panes(tid))
        if session_id is not None:
            self._learn_routes(tabs={tid: session_id}, panes={pane.id: (tid, session_id) for pane in panes})
        return panes

    def restore_pane_history(self, pane_id: UUID | str, *, wait: float | None = None) -> bytes:
        pid = as_uuid(pane_id, "pane_id")
        store = self._reads()
        route = store.route_of_pane(pid)
        if route is not None:
            self.wait_for_session(route[1], wait)
            self._learn_routes(panes={pid: route})
        return store.history(pid)

    def list_sessions(self) -> list[SessionRecord]:
        return self._observed(self._reads().sessions())

    def session_summaries(self) -> list[SessionSummary]:
        """Every stored session, most recently active first, with its tabs and panes counted."""
        return self._observed(self._reads().session_summaries())

    def find_session(self, ref: str) -> SessionRecord:
        """The one session ``ref`` names: its id, its name, or a prefix of its id.

        ``NotFound`` if none matches; :class:`~perth_pipeline.errors.Ambiguous` (with the
        candidates, most recently active first) if several do: two sessions of that name, an id
        prefix shared, or a name that is also the start of another session's id.
        """
        text = ref.strip()
        try:
            whole = UUID(text)
        except ValueError:
            pass
        else:  # a whole id: that session or none
            return self._found(self._reads().session(whole), f"session {whole}")
        lowered = text.lower()
        prefix = lowered if _ID_PREFIX.match(lowered) else None
        found = self._observed(self._reads().find_sessions(text, prefix))
        if not found:
            raise NotFound(f"no stored session is named {ref!r} or has an id starting with it")
        if len(found) > 1:
            raise Ambiguous(f"{ref!r} matches more than one session", found)
        return found[0]

    def get_template(self, name: str) -> TemplateRecord:
        return self._found(self._reads().template(name), f"template {name!r}")

    def list_templates(self) -> list[TemplateRecord]:
        return self._observed(self._reads().templates())
