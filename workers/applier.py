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
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql

from perth_pipeline.batch import json_text
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
#: Rows staged (and deleted) in a staging table after which it is truncated before the next batch:
#: until then its dead rows stay on its pages (temporary tables are never vacuumed).
_RESTAGE_ROWS = 20_000

_dumps = json_text  # compact JSON for the JSONB columns, through one C encoder

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
    session_ids: set[int] = field(default_factory=set)  # UUID.int of every session touched


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
    sessions = r.session_ids
    for op in ops:
        if isinstance(op, PaneUpsert):
            _keep(r.panes, op.record.id, op)
            sessions.add(op.session_id.int)
        elif isinstance(op, HistoryAppend):
            _keep(r.history, (op.pane_id, op.chunk_index), op)
            sessions.add(op.session_id.int)
        elif isinstance(op, TabUpsert):
            _keep(r.tabs, op.record.id, op)
            sessions.add(op.record.session_id.int)
        elif isinstance(op, SessionUpsert):
            _keep(r.sessions, op.record.id, op)
            sessions.add(op.record.id.int)
        elif isinstance(op, SessionTouch):
            _keep(r.touches, op.id, op)
            sessions.add(op.id.int)
        elif isinstance(op, SessionDelete):
            _keep_delete(r.deletes, op.id, "session", op.version)
            sessions.add(op.id.int)
        elif isinstance(op, TabDelete):
            _keep_delete(r.deletes, op.id, "tab", op.version)
            sessions.add(op.session_id.int)
        elif isinstance(op, PaneDelete):
            _keep_delete(r.deletes, op.id, "pane", op.version)
            sessions.add(op.session_id.int)
        elif isinstance(op, TemplateUpsert):
            _keep(r.templates, op.record.name, op)
            r.lock_keys.add(lock_key(op.record.name))
        elif isinstance(op, TemplateDelete):
            current = r.template_deletes.get(op.name)
            if current is None or current < op.version:
                r.template_deletes[op.name] = op.version
            r.lock_keys.add(lock_key(op.name))
    # a session's lock key is the first 8 bytes of its id: computed once per session, not per op
    r.lock_keys.update(_signed64(value >> 64) for value in sessions)
    return r


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


class Applier:
    """Applies batches on one connection (the worker process's)."""

    def __init__(self, *, history_retention_bytes: int = 0) -> None:
        self.history_retention_bytes = history_retention_bytes
        self._q = load_queries("apply.sql")
        # the connection the staging tables were created on; held (not its id(), which a new
        # connection may reuse after the old one is freed) so a reconnect always creates them again
        self._staged: psycopg.Connection[Any] | None = None
        self._stage_rows: dict[str, int] = {}  # staging table -> rows copied since its last truncation
        self._filled: set[str] = set()  # staging tables the current transaction copied into

    def apply(
        self, conn: psycopg.Connection[Any], batch: Batch, ops: Sequence[Any] | None = None
    ) -> ApplyResult:
        """Apply ``ops`` (default: all of ``batch.ops``) in one transaction; retried on deadlock."""
        started = time.perf_counter()
        operations = batch.ops if ops is None else ops
        reduced = reduce_batch(operations)
        # the batch's sessions, as counted in the reduction (the operations are the batch's, or the
        # valid ones of a batch rebuilt from them)
        sessions = len(reduced.session_ids) if len(operations) == len(batch.ops) else len(batch.session_ids())
        result = ApplyResult(ops=len(operations), sessions=sessions)
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
        if conn is not self._staged or conn.closed:
            with conn.transaction():
                conn.execute(self._q["create_stage"].encode())
            self._staged = conn
            self._stage_rows = {}
        full = sorted(table for table, n in self._stage_rows.items() if n >= _RESTAGE_ROWS)
        if full:
            with conn.transaction():
                for table in full:
                    conn.execute(self._stage_statement("truncate_stage", table))
            for table in full:
                del self._stage_rows[table]

    def _stage_statement(self, name: str, table: str) -> sql.Composed:
        return sql.SQL(self._q[name]).format(table=sql.Identifier(table))

    def _apply_once(self, conn: psycopg.Connection[Any], r: _Reduced, origin: str) -> dict[str, int]:
        self._ensure_stage(conn)
        rows: dict[str, int] = {}
        self._filled = set()
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(self._q["lock_keys"], {"keys": sorted(r.lock_keys)})
            # deletes first: a re-creation in the same batch must not escape its own cascade
            if r.deletes:
                self._apply_deletes(cur, rows, r, origin)
            self._apply_upserts(cur, rows, r, origin)
            if r.template_deletes or r.templates:
                self._apply_templates(cur, rows, r, origin)
            # the staging tables leave the transaction as empty as they entered it
            for table in sorted(self._filled):
                cur.execute(self._stage_statement("clear_stage", table))
        return rows

    def _apply_deletes(
        self, cur: psycopg.Cursor[Any], rows: dict[str, int], r: _Reduced, origin: str
    ) -> None:
        self._copy(
            cur,
            "copy_deletes",
            ((kind, key, v, origin) for key, (kind, v) in sorted(r.deletes.items(), key=_first_uuid)),
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
            touches = sorted(r.touches.items(), key=_first_uuid)
            self._copy(cur, "copy_touches", ((k, t.last_active) for k, t in touches))
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
        table = "stage_" + name.removeprefix("copy_")
        self._filled.add(table)
        count = 0
        with cur.copy(self._q[name]) as copy:
            for row in rows:
                copy.write_row(row)
                count += 1
        self._stage_rows[table] = self._stage_rows.get(table, 0) + count

    def _run(self, cur: psycopg.Cursor[Any], rows: dict[str, int], label: str, name: str) -> None:
        cur.execute(self._q[name].encode())
        rows[label] = rows.get(label, 0) + max(cur.rowcount, 0)


def _uuid_order(key: UUID) -> int:
    # UUID.__lt__ compares .int in Python; sorting by .int gives the same order, compared in C
    return key.int


def _first_uuid(item: tuple[UUID, Any]) -> int:
    return item[0].int


def _session_rows(ops: dict[UUID, SessionUpsert], origin: str) -> Iterable[Sequence[Any]]:
    for key in sorted(ops, key=_uuid_order):
        r = ops[key].record
        yield (r.id, r.name, r.template_name, r.created_at, r.last_active, ops[key].version, origin)


def _tab_rows(ops: dict[UUID, TabUpsert], origin: str) -> Iterable[Sequence[Any]]:
    for key in sorted(ops, key=_uuid_order):
        r = ops[key].record
        yield (r.id, r.session_id, r.position, r.name, _dumps(r.layout_blob), ops[key].version, origin)


def _pane_rows(ops: dict[UUID, PaneUpsert], origin: str) -> Iterable[Sequence[Any]]:
    for key in sorted(ops, key=_uuid_order):
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
    for key in sorted(ops, key=lambda k: (k[0].int, k[1])):
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
