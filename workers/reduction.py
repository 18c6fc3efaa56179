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

from . import decoder as d

__all__ = [
    "HistoryAppendOp",
    "PaneUpsertOp",
    "Reduced",
    "SessionUpsertOp",
    "TabUpsertOp",
    "TemplateUpsertOp",
    "reduce_batch",
]

# The operations of the models or of the decoder: the same fields (see reduce_batch).
SessionUpsertOp = SessionUpsert | d.SessionUpsertStruct
TabUpsertOp = TabUpsert | d.TabUpsertStruct
PaneUpsertOp = PaneUpsert | d.PaneUpsertStruct
HistoryAppendOp = HistoryAppend | d.HistoryAppendStruct
TemplateUpsertOp = TemplateUpsert | d.TemplateUpsertStruct


@dataclass(slots=True)
class Reduced:
    """The batch, one entry per key and operation kind (the highest version wins).

    Keyed by ``UUID.int``: hashing and ordering a UUID run Python code, an int's run in C (and
    ascending ints are ascending UUIDs, the order in which rows are copied and merged).
    """

    sessions: dict[int, SessionUpsertOp] = field(default_factory=dict)
    touches: dict[int, SessionTouch | d.SessionTouchStruct] = field(default_factory=dict)
    tabs: dict[int, TabUpsertOp] = field(default_factory=dict)
    panes: dict[int, PaneUpsertOp] = field(default_factory=dict)
    history: dict[tuple[int, int], HistoryAppendOp] = field(default_factory=dict)
    # id -> (kind, version, id, tab_id, session_id): the ancestors go into the tombstone
    deletes: dict[int, tuple[str, int, UUID, UUID | None, UUID]] = field(default_factory=dict)
    templates: dict[str, TemplateUpsertOp] = field(default_factory=dict)
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


# The kind of each operation class, of the models and of the decoder alike (a dict look-up, no
# isinstance chain: this runs once per operation).
(_PANE_UP, _HISTORY, _TAB_UP, _SESSION_UP, _TOUCH) = range(5)
(_SESSION_DEL, _TAB_DEL, _PANE_DEL, _TEMPLATE_UP, _TEMPLATE_DEL) = range(5, 10)
_KINDS: dict[type, int] = {
    PaneUpsert: _PANE_UP,
    d.PaneUpsertStruct: _PANE_UP,
    HistoryAppend: _HISTORY,
    d.HistoryAppendStruct: _HISTORY,
    TabUpsert: _TAB_UP,
    d.TabUpsertStruct: _TAB_UP,
    SessionUpsert: _SESSION_UP,
    d.SessionUpsertStruct: _SESSION_UP,
    SessionTouch: _TOUCH,
    d.SessionTouchStruct: _TOUCH,
    SessionDelete: _SESSION_DEL,
    d.SessionDeleteStruct: _SESSION_DEL,
    TabDelete: _TAB_DEL,
    d.TabDeleteStruct: _TAB_DEL,
    PaneDelete: _PANE_DEL,
    d.PaneDeleteStruct: _PANE_DEL,
    TemplateUpsert: _TEMPLATE_UP,
    d.TemplateUpsertStruct: _TEMPLATE_UP,
    TemplateDelete: _TEMPLATE_DEL,
    d.TemplateDeleteStruct: _TEMPLATE_DEL,
}


def reduce_batch(ops: Iterable[Any]) -> Reduced:  # noqa: C901  (one branch per operation kind)
    """Operations of the models (``perth_pipeline.operations``) or of the decoder (``workers.decoder``)."""
    r = Reduced()
    sessions = r.session_ids
    kinds = _KINDS
    for op in ops:
        kind = kinds.get(type(op))
        if kind == _PANE_UP:
            _keep(r.panes, op.record.id.int, op)
            sessions.add(op.session_id.int)
        elif kind == _HISTORY:
            _keep(r.history, (op.pane_id.int, op.chunk_index), op)
            sessions.add(op.session_id.int)
        elif kind == _TAB_UP:
            _keep(r.tabs, op.record.id.int, op)
            sessions.add(op.record.session_id.int)
        elif kind == _SESSION_UP:
            _keep(r.sessions, op.record.id.int, op)
            sessions.add(op.record.id.int)
        elif kind == _TOUCH:
            _keep(r.touches, op.id.int, op)
            sessions.add(op.id.int)
        elif kind == _SESSION_DEL:
            _keep_delete(r, op.id, "session", op.version, tab=None, session=op.id)
        elif kind == _TAB_DEL:
            _keep_delete(r, op.id, "tab", op.version, tab=None, session=op.session_id)
        elif kind == _PANE_DEL:
            _keep_delete(r, op.id, "pane", op.version, tab=op.tab_id, session=op.session_id)
        elif kind == _TEMPLATE_UP:
            _keep(r.templates, op.record.name, op)
        elif kind == _TEMPLATE_DEL:
            current = r.template_deletes.get(op.name)
            if current is None or current < op.version:
                r.template_deletes[op.name] = op.version
        else:
            raise TypeError(f"not an operation: {type(op).__name__}")
    return r


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value
