"""The buffer's entries, and what a drain hands out of them.

A part of the buffer (:mod:`perth_pipeline.buffer`): the shapes its helpers share.

* An entity is keyed by ``(kind, UUID.int)`` (a template by ``("template", name)``), a parent by
  ``UUID.int``: hashing a UUID runs Python code (about half a microsecond here), hashing an int does
  not, and a write call and its drain look keys up about a dozen times. The UUIDs themselves are
  kept in the entries, for what goes out.
* An :class:`Entry` is the latest state of one entity, or its delete until that is committed.
* What a drain hands out is immutable (:class:`Item`, :class:`Touch`); what a sender keeps of it
  until its fate is known (:class:`Receipt`) holds keys, never data: a resend is of the current
  state, never an old one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, NamedTuple
from uuid import UUID

from .records import PaneRecord, SessionRecord, TabRecord, TemplateRecord
from .scrollback import Chunk

__all__ = [
    "PANE",
    "SESSION",
    "TAB",
    "TEMPLATE",
    "Drained",
    "Entry",
    "Item",
    "Key",
    "Receipt",
    "Record",
    "Touch",
    "parent_of",
    "ref",
    "same",
]

SESSION: Final = "session"
TAB: Final = "tab"
PANE: Final = "pane"
TEMPLATE: Final = "template"

#: The buffer's key of an entity: ``(kind, UUID.int)``; templates ``("template", name)``.
Key = tuple[str, Any]
Record = SessionRecord | TabRecord | PaneRecord | TemplateRecord


@dataclass(slots=True)
class Entry:
    kind: str
    ident: Any  # the entity's id (a UUID; a template's name)
    record: Record | None  # None once deleted
    snapshot: Any  # deep copy of the record's JSON field, taken on acceptance
    version: int
    seq: int
    deleted: bool = False
    # ancestors: a tab's session; a pane's (tab, session). None while unknown.
    tab_id: UUID | None = None
    session_id: UUID | None = None
    # a delete not yet sent when the same id was created again: it is sent before the upsert,
    # so that its cascade (descendants written below it) is not lost.
    pending_delete: int | None = None


class Item(NamedTuple):
    """One entity operation as drained: an immutable view of an entry at one moment.

    (A named tuple: the flusher makes a thousand of these under the buffer's lock at a time,
    and a tuple is made several times faster than a frozen dataclass.) ``key`` is the public
    key, ``(kind, UUID)`` or ``("template", name)``; ``ref`` the buffer's own.
    """

    kind: str
    key: tuple[str, Any]
    version: int
    seq: int
    record: Record | None
    snapshot: Any
    deleted: bool
    tab_id: UUID | None
    session_id: UUID | None
    ref: Key


class Receipt(NamedTuple):
    """What a sender keeps of drained items until it knows their fate (committed, or lost).

    Enough to make them dirty again (their keys: the buffer resends the current state, never
    the old one) and to forget committed deletes, but not their data. Upserts are kept as
    ``(key, seq)`` tuples of ints and strings, which the cyclic garbage collector stops
    tracking: a producer with thousands of batches in flight (a worker outage) then adds
    nothing to the host's full collections. Deletes, rarer, are kept whole.
    """

    upserts: list[tuple[Key, int]]
    deletes: list[Item]

    @classmethod
    def of(cls, items: Iterable[Item]) -> Receipt:
        upserts: list[tuple[Key, int]] = []
        deletes: list[Item] = []
        for item in items:
            if item.deleted:
                deletes.append(item)
            else:
                upserts.append((item.ref, item.seq))
        return cls(upserts, deletes)


class Touch(NamedTuple):
    session_id: UUID
    last_active: datetime
    version: int
    seq: int


@dataclass(slots=True)
class Drained:
    items: list[Item] = field(default_factory=list)
    touches: list[Touch] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items) + len(self.touches) + len(self.chunks)

    @property
    def min_seq(self) -> int | None:
        seqs = [i.seq for i in self.items] + [t.seq for t in self.touches] + [c.seq for c in self.chunks]
        return min(seqs) if seqs else None


def ref(kind: str, ident: Any) -> Key:
    """The buffer's key of an entity: ``(kind, UUID.int)``, or ``("template", name)``."""
    return (kind, ident) if kind == TEMPLATE else (kind, ident.int)


def same(a: UUID | None, b: UUID | None) -> bool:
    """``a == b`` for UUIDs without UUID.__eq__ (Python code) in the common case."""
    return a is b or (a is not None and b is not None and a.int == b.int)


def parent_of(key: Key, entry: Entry) -> int | None:
    """The parent an entry is linked under: a tab's session, a pane's tab (as ``UUID.int``)."""
    kind = key[0]
    if kind == TAB:
        return None if entry.session_id is None else entry.session_id.int
    if kind == PANE:
        return None if entry.tab_id is None else entry.tab_id.int
    return None
