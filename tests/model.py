"""The final database state that a set of writes must produce, from the versioned semantics alone.

Arrival order plays no part here. For every key, the write with the highest
``(version, origin)`` is the candidate; it survives unless a delete of the entity
or of one of its ancestors carries a higher ``(version, origin)`` (a delete at v
removes the entity and the descendants written below v, and keeps later, older
writes out). A session's ``last_active`` is the greatest among its surviving
writes (a max register). Tombstones keep the highest delete of each id.

Origins break ties in the database's collation: pass ``origin_key`` built by
:func:`origin_ranker` so that the model orders them as PostgreSQL does.

``read_tables`` reads the same shape from a database: rows keyed by primary
key, server-set timestamps (``updated_at``, ``deleted_at``...) left out. It
fails if a key appears twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg

from perth_pipeline.operations import (
    HistoryAppend,
    PaneDelete,
    PaneUpsert,
    SessionDelete,
    SessionUpsert,
    TabDelete,
    TabUpsert,
    TemplateDelete,
    TemplateUpsert,
)

__all__ = ["Tables", "Write", "expected_tables", "origin_ranker", "read_tables"]

Tables = dict[str, dict[Any, tuple[Any, ...]]]
TABLES = ("sessions", "tabs", "panes", "pane_history", "templates", "tombstones", "template_tombstones")

_QUERIES = {
    "sessions": "SELECT id, name, template_name, created_at, last_active, version, origin FROM sessions",
    "tabs": "SELECT id, session_id, position, name, layout_blob, version, origin FROM tabs",
    "panes": (
        "SELECT id, tab_id, pane_id, pane_type, component_state, title, cwd, command, session_id, "
        "version, origin FROM panes"
    ),
    "pane_history": (
        "SELECT pane_id, chunk_index, content, encoding, raw_size, tab_id, session_id, version, origin "
        "FROM pane_history"
    ),
    "templates": "SELECT name, id, definition, version, origin FROM templates",
    "tombstones": "SELECT id, kind, version, origin FROM tombstones",
    "template_tombstones": "SELECT name, version, origin FROM template_tombstones",
}


@dataclass(frozen=True, slots=True)
class Write:
    """One operation as a producer issued it (its batch's origin)."""

    origin: str
    op: Any


def read_tables(conn: psycopg.Connection[Any]) -> Tables:
    out: Tables = {}
    for table, query in _QUERIES.items():
        rows = conn.execute(query).fetchall()
        width = 2 if table == "pane_history" else 1
        keyed = {row[:width] if width > 1 else row[0]: tuple(_plain(v) for v in row[width:]) for row in rows}
        assert len(keyed) == len(rows), f"duplicate keys in {table}"
        out[table] = keyed
    return out


def _plain(value: Any) -> Any:
    return bytes(value) if isinstance(value, memoryview) else value


def origin_ranker(conn: psycopg.Connection[Any], origins: Iterable[str]) -> Callable[[str], int]:
    """The rank of each origin in the database's own collation (what its row comparisons use)."""
    ordered = [
        r[0]
        for r in conn.execute("SELECT o FROM unnest(%s::text[]) AS o ORDER BY o", (sorted(set(origins)),))
    ]
    rank = {origin: n for n, origin in enumerate(ordered)}
    return rank.__getitem__


def expected_tables(writes: Iterable[Write], origin_key: Callable[[str], Any]) -> Tables:  # noqa: C901, PLR0915
    best: dict[tuple[str, Any], tuple[Any, Write]] = {}
    deletes: dict[Any, tuple[Any, str, Write]] = {}
    template_deletes: dict[str, tuple[Any, Write]] = {}
    session_writes: dict[UUID, list[tuple[Any, Any]]] = {}

    def keep(key: tuple[str, Any], vk: Any, write: Write) -> None:
        if key not in best or best[key][0] < vk:
            best[key] = (vk, write)

    for write in writes:
        op = write.op
        vk = (op.version, origin_key(write.origin))
        if isinstance(op, SessionUpsert):
            keep(("session", op.record.id), vk, write)
            session_writes.setdefault(op.record.id, []).append((vk, op.record.last_active))
        elif isinstance(op, TabUpsert):
            keep(("tab", op.record.id), vk, write)
        elif isinstance(op, PaneUpsert):
            keep(("pane", op.record.id), vk, write)
        elif isinstance(op, HistoryAppend):
            keep(("chunk", (op.pane_id, op.chunk_index)), vk, write)
        elif isinstance(op, TemplateUpsert):
            keep(("template", op.record.name), vk, write)
        elif isinstance(op, SessionDelete | TabDelete | PaneDelete):
            kind = {SessionDelete: "session", TabDelete: "tab", PaneDelete: "pane"}[type(op)]
            if op.id not in deletes or deletes[op.id][0] < vk:
                deletes[op.id] = (vk, kind, write)
        elif isinstance(op, TemplateDelete):
            if op.name not in template_deletes or template_deletes[op.name][0] < vk:
                template_deletes[op.name] = (vk, write)
        else:
            raise AssertionError(f"the model does not cover {type(op).__name__}")

    def alive(vk: Any, *ids: UUID) -> bool:
        return all(i not in deletes or deletes[i][0] < vk for i in ids)

    tables: Tables = {name: {} for name in TABLES}
    for (kind, key), (vk, write) in best.items():
        op = write.op
        if kind == "session" and alive(vk, key):
            r = op.record
            last_active = max(la for v, la in session_writes[key] if alive(v, key))
            tables["sessions"][key] = (
                r.name,
                r.template_name,
                r.created_at,
                last_active,
                op.version,
                write.origin,
            )
        elif kind == "tab" and alive(vk, key, op.record.session_id):
            r = op.record
            tables["tabs"][key] = (r.session_id, r.position, r.name, r.layout_blob, op.version, write.origin)
        elif kind == "pane" and alive(vk, key, op.record.tab_id, op.session_id):
            r = op.record
            tables["panes"][key] = (
                r.tab_id, r.pane_id, r.pane_type, r.component_state, r.title, r.cwd, r.command,
                op.session_id, op.version, write.origin,
            )  # fmt: skip
        elif kind == "chunk" and alive(vk, op.pane_id, op.tab_id, op.session_id):
            tables["pane_history"][key] = (
                op.content, op.encoding, op.raw_size, op.tab_id, op.session_id, op.version, write.origin,
            )  # fmt: skip
        elif kind == "template":
            dead = key in template_deletes and template_deletes[key][0] > vk
            if not dead:
                r = op.record
                tables["templates"][key] = (r.id, r.definition, op.version, write.origin)
    for ident, (_, kind, write) in deletes.items():
        tables["tombstones"][ident] = (kind, write.op.version, write.origin)
    for name, (_, write) in template_deletes.items():
        tables["template_tombstones"][name] = (write.op.version, write.origin)
    return tables


def differences(actual: Tables, expected: Tables, limit: int = 20) -> list[str]:
    """Human-readable differences, for assertion messages."""
    out: list[str] = []
    for table in TABLES:
        a, e = actual.get(table, {}), expected.get(table, {})
        for key in sorted(set(a) | set(e), key=str):
            if a.get(key) != e.get(key):
                out.append(f"{table}[{key}]: database {a.get(key)!r} != model {e.get(key)!r}")
                if len(out) >= limit:
                    return out
    return out
