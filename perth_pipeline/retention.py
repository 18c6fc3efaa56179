"""Retention: sessions inactive for too long, old tombstones, and rows whose parent never arrived.

``perth-pipeline cleanup --older-than 30d`` and the scheduled cleanup job
(``workers.maintenance.cleanup``) both run :func:`run_cleanup`; ``perth-pipeline sessions
delete`` runs :func:`delete_sessions`, the same removal of sessions named by id.

Removal is direct SQL (``sql/retention.sql``), not versioned deletes sent through
the queue: it works with no worker running, reports exactly what it removed,
and needs no producer clock. It cannot race a batch: each transaction first
takes the per-session advisory locks that workers take to apply one (the same
keys, in the same ascending order), then checks its condition again. A removed
session leaves a tombstone just above every version stored for it, so a late
re-delivery of any old write stays dead while a live terminal's new write (a
higher version) brings the session back. Work is done a chunk of sessions per
transaction, so that no transaction holds thousands of locks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import dict_row

from .locks import lock_key
from .masking import masked_logger
from .queries import load_queries
from .units import format_bytes, format_duration, plural

__all__ = ["CleanupReport", "delete_sessions", "run_cleanup"]

logger = masked_logger("perth_pipeline.retention")

_CHUNK = 500
_ATTEMPTS = 5
_RETRYABLE = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
_NIL = UUID(int=0)


@dataclass(slots=True)
class CleanupReport:
    """What a cleanup removed (or, with ``dry_run``, would remove)."""

    older_than: float
    tombstone_retention: float
    dry_run: bool
    cutoff: datetime | None = None
    sessions: list[dict[str, Any]] = field(default_factory=list)
    tabs: int = 0
    panes: int = 0
    history_chunks: int = 0
    history_bytes: int = 0
    orphan_tabs: int = 0
    orphan_panes: int = 0
    orphan_history_chunks: int = 0
    tombstones: int = 0
    template_tombstones: int = 0
    tombstones_written: int = 0
    ms: float = 0.0

    @property
    def removed(self) -> int:
        return (
            len(self.sessions)
            + self.tabs
            + self.panes
            + self.history_chunks
            + self.orphan_tabs
            + self.orphan_panes
            + self.orphan_history_chunks
            + self.tombstones
            + self.template_tombstones
        )

    def as_dict(self, *, max_sessions: int | None = None) -> dict[str, Any]:
        shown = self.sessions if max_sessions is None else self.sessions[:max_sessions]
        return {
            "dry_run": self.dry_run,
            "older_than": self.older_than,
            "tombstone_retention": self.tombstone_retention,
            "cutoff": self.cutoff.isoformat() if self.cutoff else None,
            "sessions": len(self.sessions),
            "session_list": shown,
            "tabs": self.tabs,
            "panes": self.panes,
            "history_chunks": self.history_chunks,
            "history_bytes": self.history_bytes,
            "orphan_tabs": self.orphan_tabs,
            "orphan_panes": self.orphan_panes,
            "orphan_history_chunks": self.orphan_history_chunks,
            "tombstones": self.tombstones,
            "template_tombstones": self.template_tombstones,
            "tombstones_written": self.tombstones_written,
            "ms": round(self.ms, 1),
        }

    def lines(self, *, max_sessions: int = 50) -> list[str]:
        verb = "would remove" if self.dry_run else "removed"
        out = [
            f"{verb} {plural(len(self.sessions), 'session')} inactive for more than "
            f"{format_duration(self.older_than)} (nothing written since {self.cutoff:%Y-%m-%d %H:%M:%S %Z})"
            if self.cutoff
            else f"{verb} {plural(len(self.sessions), 'session')}"
        ]
        for s in self.sessions[:max_sessions]:
            # the time it was last active: the later of its last_active and its last write
            out.append(f"  {s['id']}  {str(s.get('active_at') or s['last_active'])[:19]}  {s['name']}")
        if len(self.sessions) > max_sessions:
            out.append(f"  ... and {len(self.sessions) - max_sessions} more")
        if self.sessions:
            out.append(
                f"  with {plural(self.tabs, 'tab')}, {plural(self.panes, 'pane')}, "
                f"{plural(self.history_chunks, 'scrollback chunk')} ({format_bytes(self.history_bytes)})"
            )
        out.append(
            f"{verb} {plural(self.orphan_tabs, 'orphan tab')}, {plural(self.orphan_panes, 'orphan pane')}, "
            f"{plural(self.orphan_history_chunks, 'orphan scrollback chunk')} "
            "(their parent never arrived)"
        )
        out.append(
            f"{verb} {plural(self.tombstones, 'tombstone')} and "
            f"{plural(self.template_tombstones, 'template tombstone')} older than "
            f"{format_duration(self.tombstone_retention)}"
        )
        return out


def _retrying(what: str, step: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            return step()
        except _RETRYABLE as exc:
            if attempt == _ATTEMPTS:
                raise
            logger.info("cleanup %s: %s, retrying (attempt %d)", what, type(exc).__name__, attempt)
            time.sleep(0.05 * attempt)
    raise AssertionError("unreachable")  # pragma: no cover


class _Cleanup:
    def __init__(self, conn: psycopg.Connection[Any], chunk: int) -> None:
        self.conn = conn
        self.chunk = chunk
        queries = load_queries("retention.sql")
        lost = queries["lost_families"]
        self.q = {name: text.replace("{lost}", lost) for name, text in queries.items()}

    def one(self, name: str, **params: Any) -> dict[str, Any]:
        with self.conn.cursor(row_factory=dict_row) as cur:
            cur.execute(self.q[name], params)
            row = cur.fetchone()
        assert row is not None
        return row

    def ids(self, name: str, cutoff: datetime) -> Iterator[list[UUID]]:
        """Chunks of session ids (keyset by id, so each chunk makes progress)."""
        after = _NIL
        while True:
            with self.conn.cursor() as cur:
                cur.execute(self.q[name], {"cutoff": cutoff, "after": after, "limit": self.chunk})
                ids = [row[0] for row in cur.fetchall()]
            if not ids:
                return
            yield ids
            after = ids[-1]

    def locked(self, name: str, ids: list[UUID], cutoff: datetime, floor: int = 0) -> dict[str, Any]:
        """``name`` in one transaction, under the sessions' advisory locks."""

        def step() -> dict[str, Any]:
            keys = sorted({lock_key(i) for i in ids})
            with self.conn.transaction():
                self.conn.execute(self.q["lock_sessions"], {"keys": keys})
                return self.one(name, ids=ids, cutoff=cutoff, floor=floor)

        return _retrying(name, step)


_NEVER = datetime(9999, 12, 31, tzinfo=UTC)  # a cutoff every session is idle before


def delete_sessions(conn: psycopg.Connection[Any], ids: list[UUID]) -> dict[str, Any]:
    """Remove these sessions now, with their tabs, panes and scrollback; ``conn`` in autocommit mode.

    The cleanup's removal (the workers' advisory locks, then a tombstone for each session), for
    sessions named by id whatever their age. The tombstone's version is at least this host's
    clock (``time.time_ns()``, as the producers' versions are): what was written before the
    delete, even if it is still queued, stays dead; what a terminal writes afterwards brings
    the session back, as it would after the terminal's own ``delete_session``. Returns what was
    removed: ``sessions`` (``id``, ``name``, ``last_active``), ``tabs``, ``panes``,
    ``history_chunks`` and ``history_bytes``.
    """
    if not ids:
        return {"sessions": [], "tabs": 0, "panes": 0, "history_chunks": 0, "history_bytes": 0}
    done = _Cleanup(conn, _CHUNK).locked("purge_sessions", sorted(ids), _NEVER, floor=time.time_ns())
    done["history_bytes"] = int(done["history_bytes"])
    if done["sessions"]:
        logger.info(
            "deleted %d sessions by request", len(done["sessions"]), extra={"sessions": len(done["sessions"])}
        )
    return done


#: The shortest retention a queued cleanup job may ask for. Anyone who can write to Redis can
#: enqueue a job the workers run: without a floor, ``older_than=0.001`` would remove every
#: session. An operator who means less runs ``perth-pipeline cleanup`` directly (not a job).
MIN_JOB_RETENTION = 3600.0


def run_cleanup(
    conn: psycopg.Connection[Any],
    *,
    older_than: float,
    tombstone_retention: float,
    dry_run: bool = False,
    chunk: int = _CHUNK,
) -> CleanupReport:
    """Remove (or, with ``dry_run``, count) what retention allows; ``conn`` is in autocommit mode."""
    if older_than <= 0 or tombstone_retention <= 0:
        raise ValueError("retention durations must be positive")
    started = time.perf_counter()
    c = _Cleanup(conn, chunk)
    report = CleanupReport(older_than=older_than, tombstone_retention=tombstone_retention, dry_run=dry_run)
    cutoff = c.one("cutoff", seconds=older_than)["cutoff"]
    tomb_cutoff = c.one("cutoff", seconds=tombstone_retention)["cutoff"]
    report.cutoff = cutoff
    if dry_run:
        plan = c.one("plan_sessions", cutoff=cutoff)
        report.sessions = list(plan["sessions"])
        report.tabs, report.panes = plan["tabs"], plan["panes"]
        report.history_chunks, report.history_bytes = plan["history_chunks"], int(plan["history_bytes"])
        orphans = {"tabs": 0, "panes": 0, "history_chunks": 0}
        for ids in c.ids("orphan_session_ids", cutoff):
            planned = c.one("plan_orphans", ids=ids, cutoff=cutoff)
            for key in orphans:
                orphans[key] += planned[key]
        tombs = c.one("plan_tombstones", cutoff=tomb_cutoff)
    else:
        for ids in c.ids("expired_session_ids", cutoff):
            done = c.locked("purge_sessions", ids, cutoff)
            report.sessions += done["sessions"]
            report.tabs += done["tabs"]
            report.panes += done["panes"]
            report.history_chunks += done["history_chunks"]
            report.history_bytes += int(done["history_bytes"])
            report.tombstones_written += done["tombstones_written"]
        orphans = {"tabs": 0, "panes": 0, "history_chunks": 0}
        for ids in c.ids("orphan_session_ids", cutoff):
            done = c.locked("purge_orphans", ids, cutoff)
            for key in orphans:
                orphans[key] += done[key]
        tombs = _retrying("purge_tombstones", lambda: c.one("purge_tombstones", cutoff=tomb_cutoff))
    report.orphan_tabs, report.orphan_panes = orphans["tabs"], orphans["panes"]
    report.orphan_history_chunks = orphans["history_chunks"]
    report.tombstones, report.template_tombstones = tombs["tombstones"], tombs["template_tombstones"]
    report.ms = (time.perf_counter() - started) * 1000
    if not dry_run:
        logger.info(
            "cleanup removed %d sessions, %d orphan rows, %d tombstones in %.0f ms",
            len(report.sessions),
            report.orphan_tabs + report.orphan_panes + report.orphan_history_chunks,
            report.tombstones + report.template_tombstones,
            report.ms,
            extra=report.as_dict(max_sessions=0),
        )
    return report
