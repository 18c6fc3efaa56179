"""Applying one batch to PostgreSQL: one transaction, set-based, idempotent.

The batch is reduced (per key, the highest upsert and the highest delete),
copied into temporary staging tables with ``COPY``, and merged with one
statement per entity kind (``perth_pipeline/sql/apply.sql``). Before anything
is written the transaction takes an advisory lock per session (and per
template name) it touches, in sorted order: batches of one session are applied
one at a time, so cascades and ancestor checks see a stable tree, and batches
of different sessions never wait for each other. Deadlocks and serialization
failures are retried.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import psycopg

from perth_pipeline.queries import load_queries
from perth_pipeline.records import (
    Batch,
    HistoryAppend,
    PaneDelete,
    PaneUpsert,
    SessionDelete,
    SessionTouch,
    SessionUpsert,
    TabDelete,
    TabUpsert,
    TemplateDelete,
    TemplateUpsert,
)

__all__ = ["Applier", "ApplyResult", "lock_key"]

logger = logging.getLogger("workers.applier")

_RETRYABLE = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
_ATTEMPTS = 5

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

#: What a delete of each kind removes, besides its tombstone (descendants written below it).
_CASCADES = (
    (
        "session",
        (
            "delete_sessions",
            "delete_tabs_of_sessions",
            "delete_panes_of_sessions",
            "delete_history_of_sessions",
        ),
    ),
    ("tab", ("delete_tabs", "delete_panes_of_tabs", "delete_history_of_tabs")),
    ("pane", ("delete_panes", "delete_history_of_panes")),
)


def lock_key(value: UUID | str) -> int:
    """The advisory-lock key of a session id (or a template name): a signed 64-bit integer."""
    if isinstance(value, UUID):
        raw = value.bytes[:8]
    else:
        raw = hashlib.blake2b(b"template:" + value.encode(), digest_size=8).digest()
    return int.from_bytes(raw, "big", signed=True)


@dataclass(slots=True)
class ApplyResult:
    ops: int = 0
    sessions: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    attempts: int = 1
    ms: float = 0.0

    @property
    def rows_written(self) -> int:
        return sum(self.rows.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "ops": self.ops,
            "sessions": self.sessions,
            "rows": self.rows,
            "rows_written": self.rows_written,
            "attempts": self.attempts,
            "ms": round(self.ms, 2),
        }


@dataclass(slots=True)
class _Reduced:
    """The batch, one entry per key and operation kind (the highest version wins)."""

    sessions: dict[UUID, SessionUpsert] = field(default_factory=dict)
    touches: dict[UUID, SessionTouch] = field(default_factory=dict)
    tabs: dict[UUID, TabUpsert] = field(default_factory=dict)
    panes: dict[UUID, PaneUpsert] = field(default_factory=dict)
    history: dict[tuple[UUID, int], HistoryAppend] = field(default_factory=dict)
    deletes: dict[UUID, tuple[str, int]] = field(default_factory=dict)
    templates: dict[str, TemplateUpsert] = field(default_factory=dict)
    template_deletes: dict[str, int] = field(default_factory=dict)
    lock_keys: set[int] = field(default_factory=set)


def _keep(target: dict[Any, Any], key: Any, op: Any) -> None:
    current = target.get(key)
    if current is None or current.version < op.version:
        target[key] = op


def _keep_delete(target: dict[UUID, tuple[str, int]], key: UUID, kind: str, version: int) -> None:
    current = target.get(key)
    if current is None or current[1] < version:
        target[key] = (kind, version)


def reduce_batch(ops: Iterable[Any]) -> _Reduced:  # noqa: C901  (one branch per operation kind)
    r = _Reduced()
    for op in ops:
        if isinstance(op, PaneUpsert):
            _keep(r.panes, op.record.id, op)
            r.lock_keys.add(lock_key(op.session_id))
        elif isinstance(op, HistoryAppend):
            _keep(r.history, (op.pane_id, op.chunk_index), op)
            r.lock_keys.add(lock_key(op.session_id))
        elif isinstance(op, TabUpsert):
            _keep(r.tabs, op.record.id, op)
            r.lock_keys.add(lock_key(op.record.session_id))
        elif isinstance(op, SessionUpsert):
            _keep(r.sessions, op.record.id, op)
            r.lock_keys.add(lock_key(op.record.id))
        elif isinstance(op, SessionTouch):
            _keep(r.touches, op.id, op)
            r.lock_keys.add(lock_key(op.id))
        elif isinstance(op, SessionDelete):
            _keep_delete(r.deletes, op.id, "session", op.version)
            r.lock_keys.add(lock_key(op.id))
        elif isinstance(op, TabDelete):
            _keep_delete(r.deletes, op.id, "tab", op.version)
            r.lock_keys.add(lock_key(op.session_id))
        elif isinstance(op, PaneDelete):
            _keep_delete(r.deletes, op.id, "pane", op.version)
            r.lock_keys.add(lock_key(op.session_id))
        elif isinstance(op, TemplateUpsert):
            _keep(r.templates, op.record.name, op)
            r.lock_keys.add(lock_key(op.record.name))
        elif isinstance(op, TemplateDelete):
            current = r.template_deletes.get(op.name)
            if current is None or current < op.version:
                r.template_deletes[op.name] = op.version
            r.lock_keys.add(lock_key(op.name))
    return r


class Applier:
    """Applies batches on one connection (the worker process's)."""

    def __init__(self, *, history_retention_bytes: int = 0) -> None:
        self.history_retention_bytes = history_retention_bytes
        self._q = load_queries("apply.sql")
        self._staged: set[int] = set()

    def apply(
        self, conn: psycopg.Connection[Any], batch: Batch, ops: Sequence[Any] | None = None
    ) -> ApplyResult:
        """Apply ``ops`` (default: all of ``batch.ops``) in one transaction; retried on deadlock."""
        started = time.perf_counter()
        operations = batch.ops if ops is None else ops
        reduced = reduce_batch(operations)
        result = ApplyResult(ops=len(operations), sessions=len(batch.session_ids()))
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                result.rows = self._apply_once(conn, reduced, batch.origin)
                result.attempts = attempt
                break
            except _RETRYABLE as exc:
                if attempt == _ATTEMPTS:
                    raise
                logger.info("batch %s: %s, retrying (attempt %d)", batch.id, type(exc).__name__, attempt)
                time.sleep(0.01 * attempt)
        result.ms = (time.perf_counter() - started) * 1000
        return result

    def _ensure_stage(self, conn: psycopg.Connection[Any]) -> None:
        # temporary tables live as long as the connection: create them once per connection
        if id(conn) not in self._staged or conn.closed:
            with conn.transaction():
                conn.execute(self._q["create_stage"].encode())
            self._staged = {id(conn)}

    def _apply_once(self, conn: psycopg.Connection[Any], r: _Reduced, origin: str) -> dict[str, int]:
        self._ensure_stage(conn)
        rows: dict[str, int] = {}
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(self._q["lock_keys"], {"keys": sorted(r.lock_keys)})
            # deletes first: a re-creation in the same batch must not escape its own cascade
            if r.deletes:
                self._apply_deletes(cur, rows, r, origin)
            self._apply_upserts(cur, rows, r, origin)
            if r.template_deletes or r.templates:
                self._apply_templates(cur, rows, r, origin)
        return rows

    def _apply_deletes(
        self, cur: psycopg.Cursor[Any], rows: dict[str, int], r: _Reduced, origin: str
    ) -> None:
        self._copy(
            cur, "copy_deletes", ((kind, key, v, origin) for key, (kind, v) in sorted(r.deletes.items()))
        )
        self._run(cur, rows, "tombstones", "upsert_tombstones")
        kinds = {kind for kind, _ in r.deletes.values()}
        for kind, statements in _CASCADES:
            if kind in kinds:
                for name in statements:
                    self._run(cur, rows, "deleted", name)

    def _apply_upserts(
        self, cur: psycopg.Cursor[Any], rows: dict[str, int], r: _Reduced, origin: str
    ) -> None:
        if r.sessions:
            self._copy(cur, "copy_sessions", _session_rows(r.sessions, origin))
            self._run(cur, rows, "sessions", "upsert_sessions")
        if r.touches:
            self._copy(cur, "copy_touches", ((k, t.last_active) for k, t in sorted(r.touches.items())))
            self._run(cur, rows, "sessions", "apply_touches")
        if r.tabs:
            self._copy(cur, "copy_tabs", _tab_rows(r.tabs, origin))
            self._run(cur, rows, "tabs", "upsert_tabs")
        if r.panes:
            self._copy(cur, "copy_panes", _pane_rows(r.panes, origin))
            self._run(cur, rows, "panes", "upsert_panes")
        if r.history:
            self._copy(cur, "copy_history", _history_rows(r.history, origin))
            self._run(cur, rows, "history", "upsert_history")
            if self.history_retention_bytes > 0:
                cur.execute(self._q["retain_history"], {"keep": self.history_retention_bytes})
                rows["history_retained_out"] = max(cur.rowcount, 0)

    def _apply_templates(
        self, cur: psycopg.Cursor[Any], rows: dict[str, int], r: _Reduced, origin: str
    ) -> None:
        if r.template_deletes:
            deletes = ((name, v, origin) for name, v in sorted(r.template_deletes.items()))
            self._copy(cur, "copy_template_deletes", deletes)
            self._run(cur, rows, "tombstones", "upsert_template_tombstones")
            self._run(cur, rows, "deleted", "delete_templates")
        if r.templates:
            self._copy(cur, "copy_templates", _template_rows(r.templates, origin))
            self._run(cur, rows, "templates", "upsert_templates")

    def _copy(self, cur: psycopg.Cursor[Any], name: str, rows: Iterable[Sequence[Any]]) -> None:
        with cur.copy(self._q[name]) as copy:
            for row in rows:
                copy.write_row(row)

    def _run(self, cur: psycopg.Cursor[Any], rows: dict[str, int], label: str, name: str) -> None:
        cur.execute(self._q[name].encode())
        rows[label] = rows.get(label, 0) + max(cur.rowcount, 0)


def _session_rows(ops: dict[UUID, SessionUpsert], origin: str) -> Iterable[Sequence[Any]]:
    for key in sorted(ops):
        r = ops[key].record
        yield (r.id, r.name, r.template_name, r.created_at, r.last_active, ops[key].version, origin)


def _tab_rows(ops: dict[UUID, TabUpsert], origin: str) -> Iterable[Sequence[Any]]:
    for key in sorted(ops):
        r = ops[key].record
        yield (r.id, r.session_id, r.position, r.name, _dumps(r.layout_blob), ops[key].version, origin)


def _pane_rows(ops: dict[UUID, PaneUpsert], origin: str) -> Iterable[Sequence[Any]]:
    for key in sorted(ops):
        op = ops[key]
        r = op.record
        yield (
            r.id,
            r.tab_id,
            r.pane_id,
            r.pane_type,
            _dumps(r.component_state),
            r.title,
            r.cwd,
            r.command,
            op.session_id,
            op.version,
            origin,
        )


def _history_rows(ops: dict[tuple[UUID, int], HistoryAppend], origin: str) -> Iterable[Sequence[Any]]:
    for key in sorted(ops):
        op = ops[key]
        yield (
            op.pane_id,
            op.chunk_index,
            op.content,
            op.encoding,
            op.raw_size,
            op.tab_id,
            op.session_id,
            op.version,
            origin,
        )


def _template_rows(ops: dict[str, TemplateUpsert], origin: str) -> Iterable[Sequence[Any]]:
    for key in sorted(ops):
        r = ops[key].record
        yield (r.name, r.id, _dumps(r.definition), ops[key].version, origin)
