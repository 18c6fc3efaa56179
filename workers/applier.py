"""Applying one batch to PostgreSQL: one transaction, set-based, idempotent.

The batch is reduced (per key, the highest upsert and the highest delete),
copied into temporary staging tables with ``COPY``, and merged with one
statement per entity kind (``perth_pipeline/sql/apply.sql``). Before anything
is written the transaction takes an advisory lock per session (and per
template name) it touches, in sorted order: exclusive where the batch deletes
something, so that a cascade and the ancestor checks of a concurrent batch
never miss each other; shared where it only upserts, so that batches of one
session that only write rows apply in parallel (row locks, taken in key order,
order their writes). Batches of different sessions never wait for each other.
Deadlocks and serialization failures are retried. Every session the batch
writes under (or deletes in) counts as active: its ``activity_at``, which the
cleanup reads, is raised in the same transaction, at most once a minute.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from uuid import UUID

import psycopg
from psycopg import sql

from perth_pipeline.limits import compact_json
from perth_pipeline.masking import masked_logger
from perth_pipeline.queries import load_queries

from .reduction import (
    HistoryAppendOp,
    PaneUpsertOp,
    Reduced,
    SessionUpsertOp,
    TabUpsertOp,
    TemplateUpsertOp,
    reduce_batch,
)

__all__ = ["AppliedBatch", "Applier", "ApplyResult"]

logger = masked_logger("workers.applier")

_RETRYABLE = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
_ATTEMPTS = 5
#: Rows staged (and deleted) in a staging table after which it is truncated before the next batch:
#: until then its dead rows stay on its pages (temporary tables are never vacuumed).
_RESTAGE_ROWS = 20_000

_dumps = compact_json  # compact JSON for the JSONB columns, through one C encoder

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


class AppliedBatch(Protocol):
    """What the applier reads of a batch: the models' ``Batch`` or a ``workers.decoder.DecodedBatch``."""

    @property
    def id(self) -> UUID: ...

    @property
    def origin(self) -> str: ...

    @property
    def ops(self) -> Sequence[Any]: ...

    def session_ids(self) -> list[UUID]: ...


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


class Applier:
    """Applies batches on one connection (the worker process's)."""

    def __init__(self, *, history_retention_bytes: int = 0) -> None:
        self.history_retention_bytes = history_retention_bytes
        self._q = load_queries("apply.sql")
        self._sql = {name: text.encode() for name, text in self._q.items()}
        # the connection the staging tables were created on; held (not its id(), which a new
        # connection may reuse after the old one is freed) so a reconnect always creates them again
        self._staged: psycopg.Connection[Any] | None = None
        self._stage_rows: dict[str, int] = {}  # staging table -> rows copied since its last truncation

    def apply(
        self,
        conn: psycopg.Connection[Any],
        batch: AppliedBatch,
        ops: Sequence[Any] | None = None,
        *,
        json_texts: dict[int, tuple[Any, str]] | None = None,
    ) -> ApplyResult:
        """Apply ``ops`` (default: all of ``batch.ops``) in one transaction; retried on deadlock.

        ``json_texts``: the compact JSON of JSON fields already encoded by validation
        (``perth_pipeline.limits.JSON_TEXTS``), copied as they are.
        """
        started = time.perf_counter()
        operations = batch.ops if ops is None else ops
        reduced = reduce_batch(operations)
        # the batch's sessions, as counted in the reduction (the operations are the batch's, or the
        # valid ones of a batch rebuilt from them)
        sessions = len(reduced.session_ids) if len(operations) == len(batch.ops) else len(batch.session_ids())
        result = ApplyResult(ops=len(operations), sessions=sessions)
        # rows are built once, outside the transaction: a retry after a deadlock copies them again
        staged = _stage(reduced, batch.origin, json_texts or {})
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                result.rows = self._apply_once(conn, reduced, staged)
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
                conn.execute(self._sql["create_stage"])
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

    def _apply_once(
        self, conn: psycopg.Connection[Any], r: Reduced, staged: dict[str, list[Sequence[Any]]]
    ) -> dict[str, int]:
        self._ensure_stage(conn)
        rows: dict[str, int] = {}
        keys, exclusive = r.lock_keys()
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(self._sql["lock_keys"], {"keys": keys, "exclusive": exclusive})
            for name, data in staged.items():
                self._copy(cur, name, data)
            # deletes first: a re-creation in the same batch must not escape its own cascade
            if r.deletes:
                self._apply_deletes(cur, rows, r)
            self._apply_upserts(cur, rows, r)
            if r.template_deletes or r.templates:
                self._apply_templates(cur, rows, r)
            # the staging tables leave the transaction as empty as they entered it
            for name in sorted(staged):
                cur.execute(self._stage_statement("clear_stage", _STAGES[name]))
        return rows

    def _apply_deletes(self, cur: psycopg.Cursor[Any], rows: dict[str, int], r: Reduced) -> None:
        self._run(cur, rows, "tombstones", "upsert_tombstones")
        kinds = {delete[0] for delete in r.deletes.values()}
        for kind, statements in _CASCADES:
            if kind in kinds:
                for name in statements:
                    self._run(cur, rows, "deleted", name)

    def _apply_upserts(self, cur: psycopg.Cursor[Any], rows: dict[str, int], r: Reduced) -> None:
        if r.sessions:
            self._run(cur, rows, "sessions", "upsert_sessions")
        if r.touches:
            self._run(cur, rows, "sessions", "apply_touches")
        if r.session_ids:
            # not counted in rows: it records when the batch was applied, not what it wrote
            ids = [UUID(int=value) for value in sorted(r.session_ids)]
            cur.execute(self._sql["raise_activity"], {"ids": ids})
        if r.tabs:
            self._run(cur, rows, "tabs", "upsert_tabs")
        if r.panes:
            self._run(cur, rows, "panes", "upsert_panes")
        if r.history:
            self._run(cur, rows, "history", "upsert_history")
            if self.history_retention_bytes > 0:
                cur.execute(self._sql["retain_history"], {"keep": self.history_retention_bytes})
                rows["history_retained_out"] = max(cur.rowcount, 0)

    def _apply_templates(self, cur: psycopg.Cursor[Any], rows: dict[str, int], r: Reduced) -> None:
        if r.template_deletes:
            self._run(cur, rows, "tombstones", "upsert_template_tombstones")
            self._run(cur, rows, "deleted", "delete_templates")
        if r.templates:
            self._run(cur, rows, "templates", "upsert_templates")

    def _copy(self, cur: psycopg.Cursor[Any], name: str, rows: list[Sequence[Any]]) -> None:
        table = _STAGES[name]
        # counted whether or not the transaction commits: rolled-back rows stay on the table's pages too
        self._stage_rows[table] = self._stage_rows.get(table, 0) + len(rows)
        with cur.copy(self._sql[name]) as copy:
            copy.set_types(_COPY_TYPES[name])
            write = copy.write_row
            for row in rows:
                write(row)

    def _run(self, cur: psycopg.Cursor[Any], rows: dict[str, int], label: str, name: str) -> None:
        cur.execute(self._sql[name])
        rows[label] = rows.get(label, 0) + max(cur.rowcount, 0)


#: The column types of each COPY (binary format: psycopg sends each value as its column's type),
#: in the order of the statement's column list and of the rows built below.
_COPY_TYPES: dict[str, tuple[str, ...]] = {
    "copy_deletes": ("text", "uuid", "int8", "text", "uuid", "uuid"),
    "copy_sessions": ("uuid", "text", "text", "timestamptz", "timestamptz", "int8", "text"),
    "copy_touches": ("uuid", "timestamptz"),
    "copy_tabs": ("uuid", "uuid", "int4", "text", "text", "int8", "text"),
    "copy_panes": ("uuid", "uuid", "text", "text", "text", "text", "text", "text", "uuid", "int8", "text"),
    "copy_history": ("uuid", "int4", "bytea", "text", "int4", "uuid", "uuid", "int8", "text"),
    "copy_template_deletes": ("text", "int8", "text"),
    "copy_templates": ("text", "uuid", "text", "int8", "text"),
}

#: The staging table each COPY fills.
_STAGES = {
    "copy_deletes": "stage_deletes",
    "copy_sessions": "stage_sessions",
    "copy_touches": "stage_touches",
    "copy_tabs": "stage_tabs",
    "copy_panes": "stage_panes",
    "copy_history": "stage_history",
    "copy_template_deletes": "stage_template_deletes",
    "copy_templates": "stage_templates",
}


def _stage(r: Reduced, origin: str, texts: dict[int, tuple[Any, str]]) -> dict[str, list[Sequence[Any]]]:
    """The rows to copy into each staging table, in key order: only the kinds the batch has."""
    staged: dict[str, list[Sequence[Any]]] = {}
    if r.deletes:
        staged["copy_deletes"] = [
            (kind, key, v, origin, tab, session) for kind, v, key, tab, session in _in_order(r.deletes)
        ]
    if r.sessions:
        staged["copy_sessions"] = _session_rows(r.sessions, origin)
    if r.touches:
        staged["copy_touches"] = [(t.id, t.last_active) for t in _in_order(r.touches)]
    if r.tabs:
        staged["copy_tabs"] = _tab_rows(r.tabs, origin, texts)
    if r.panes:
        staged["copy_panes"] = _pane_rows(r.panes, origin, texts)
    if r.history:
        staged["copy_history"] = _history_rows(r.history, origin)
    if r.template_deletes:
        deletes = sorted(r.template_deletes.items())
        staged["copy_template_deletes"] = [(name, v, origin) for name, v in deletes]
    if r.templates:
        staged["copy_templates"] = _template_rows(r.templates, origin, texts)
    return staged


def _in_order(ops: dict[Any, Any]) -> list[Any]:
    return [ops[key] for key in sorted(ops)]


def _json(value: dict[str, Any] | str, texts: dict[int, tuple[Any, str]]) -> str:
    """A JSON field's text: as decoded (text already), as validation encoded it, else encoded here."""
    if type(value) is str:
        return value
    known = texts.get(id(value))
    if known is not None and known[0] is value:
        return known[1]
    return _dumps(value)


def _session_rows(ops: dict[int, SessionUpsertOp], origin: str) -> list[Sequence[Any]]:
    rows: list[Sequence[Any]] = []
    for op in _in_order(ops):
        r = op.record
        rows.append((r.id, r.name, r.template_name, r.created_at, r.last_active, op.version, origin))
    return rows


def _tab_rows(
    ops: dict[int, TabUpsertOp], origin: str, texts: dict[int, tuple[Any, str]]
) -> list[Sequence[Any]]:
    rows: list[Sequence[Any]] = []
    for op in _in_order(ops):
        r = op.record
        rows.append((r.id, r.session_id, r.position, r.name, _json(r.layout_blob, texts), op.version, origin))
    return rows


def _pane_rows(
    ops: dict[int, PaneUpsertOp], origin: str, texts: dict[int, tuple[Any, str]]
) -> list[Sequence[Any]]:
    rows: list[Sequence[Any]] = []
    append = rows.append
    for op in _in_order(ops):
        r = op.record
        append(
            (
                r.id,
                r.tab_id,
                r.pane_id,
                r.pane_type,
                _json(r.component_state, texts),
                r.title,
                r.cwd,
                r.command,
                op.session_id,
                op.version,
                origin,
            )
        )
    return rows


def _history_rows(ops: dict[tuple[int, int], HistoryAppendOp], origin: str) -> list[Sequence[Any]]:
    return [
        (
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
        for op in _in_order(ops)
    ]


def _template_rows(
    ops: dict[str, TemplateUpsertOp], origin: str, texts: dict[int, tuple[Any, str]]
) -> list[Sequence[Any]]:
    rows: list[Sequence[Any]] = []
    for op in _in_order(ops):
        r = op.record
        rows.append((r.name, r.id, _json(r.definition, texts), op.version, origin))
    return rows
