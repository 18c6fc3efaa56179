"""A batch reduced to what one transaction writes: per key and kind, the highest version.

Last writer wins inside a batch as it does across batches (docs/design.md, rule 4): of the
operations on one key only the highest version can change a row, so the apply stages one row
per key. The reduction also collects the sessions a batch writes under, and which of them it
deletes in, from which the advisory-lock keys of the transaction follow.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from perth_pipeline.locks import lock_key
from perth_pipeline.operations import (
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

__all__ = ["Reduced", "reduce_batch"]


@dataclass(slots=True)
class Reduced:
    """The batch, one entry per key and operation kind (the highest version wins).

    Keyed by ``UUID.int``: hashing and ordering a UUID run Python code, an int's run in C (and
    ascending ints are ascending UUIDs, the order in which rows are copied and merged).
    """

    sessions: dict[int, SessionUpsert] = field(default_factory=dict)
    touches: dict[int, SessionTouch] = field(default_factory=dict)
    tabs: dict[int, TabUpsert] = field(default_factory=dict)
    panes: dict[int, PaneUpsert] = field(default_factory=dict)
    history: dict[tuple[int, int], HistoryAppend] = field(default_factory=dict)
    # id -> (kind, version, id, tab_id, session_id): the ancestors go into the tombstone
    deletes: dict[int, tuple[str, int, UUID, UUID | None, UUID]] = field(default_factory=dict)
    templates: dict[str, TemplateUpsert] = field(default_factory=dict)
    template_deletes: dict[str, int] = field(default_factory=dict)
    session_ids: set[int] = field(default_factory=set)  # UUID.int of every session touched
    deleting: set[int] = field(default_factory=set)  # UUID.int of the sessions this batch deletes in

    def lock_keys(self) -> tuple[list[int], list[bool]]:
        """The advisory-lock keys to take, ascending, and whether each is taken exclusively.

        A batch that deletes anything in a session (or deletes a template) takes that key
        exclusively; a batch that only upserts takes it shared, so that such batches of one
        session apply in parallel (see ``lock_keys`` in apply.sql for why that is safe).
        """
        # a session's lock key is the first 8 bytes of its id: computed once per session, not per op
        modes: dict[int, bool] = {}
        for value in self.session_ids:
            key = _signed64(value >> 64)
            modes[key] = modes.get(key, False) or value in self.deleting
        for name in self.templates:
            modes.setdefault(lock_key(name), False)
        for name in self.template_deletes:
            modes[lock_key(name)] = True
        keys = sorted(modes)
        return keys, [modes[k] for k in keys]


def _keep(target: dict[Any, Any], key: Any, op: Any) -> None:
    current = target.get(key)
    if current is None or current.version < op.version:
        target[key] = op


def _keep_delete(r: Reduced, key: UUID, kind: str, version: int, *, tab: UUID | None, session: UUID) -> None:
    current = r.deletes.get(key.int)
    if current is None or current[1] < version:
        r.deletes[key.int] = (kind, version, key, tab, session)
    r.session_ids.add(session.int)
    r.deleting.add(session.int)


def reduce_batch(ops: Iterable[Any]) -> Reduced:  # noqa: C901  (one branch per operation kind)
    r = Reduced()
    sessions = r.session_ids
    for op in ops:
        kind = type(op)
        if kind is PaneUpsert:
            _keep(r.panes, op.record.id.int, op)
            sessions.add(op.session_id.int)
        elif kind is HistoryAppend:
            _keep(r.history, (op.pane_id.int, op.chunk_index), op)
            sessions.add(op.session_id.int)
        elif kind is TabUpsert:
            _keep(r.tabs, op.record.id.int, op)
            sessions.add(op.record.session_id.int)
        elif kind is SessionUpsert:
            _keep(r.sessions, op.record.id.int, op)
            sessions.add(op.record.id.int)
        elif kind is SessionTouch:
            _keep(r.touches, op.id.int, op)
            sessions.add(op.id.int)
        elif kind is SessionDelete:
            _keep_delete(r, op.id, "session", op.version, tab=None, session=op.id)
        elif kind is TabDelete:
            _keep_delete(r, op.id, "tab", op.version, tab=None, session=op.session_id)
        elif kind is PaneDelete:
            _keep_delete(r, op.id, "pane", op.version, tab=op.tab_id, session=op.session_id)
        elif kind is TemplateUpsert:
            _keep(r.templates, op.record.name, op)
        elif kind is TemplateDelete:
            current = r.template_deletes.get(op.name)
            if current is None or current < op.version:
                r.template_deletes[op.name] = op.version
        else:
            raise TypeError(f"not an operation: {kind.__name__}")
    return r


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value
