"""The coalescing write-behind buffer. No I/O happens here.

The buffer holds the latest state of every live entity (sessions, tabs, panes;
templates by name) as a full record, a set of dirty keys waiting to be sent, and
the scrollback chunks waiting to be sent. Write calls run in the terminal's
threads and only touch dicts under one short lock; the flusher thread drains
dirty state from here and gives back what it could not deliver.

Rules kept here (DESIGN.md, rule 2 and 3):

* Repeated upserts of one key between two drains become one operation (the
  latest, sent whole); a delete supersedes earlier upserts of the same key and of
  everything under it.
* What a write call accepted is what gets stored: JSON fields are deep-copied on
  acceptance.
* A key that could not be delivered is dirty again; a delete is forgotten only
  once it is committed. Scrollback chunks are appended in order and bounded in
  bytes (the oldest pending chunks go first, counted).
* Past ``max_entities`` a new entity, and anything written under it, is dropped
  and counted.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final
from uuid import UUID

from .clock import HybridClock
from .errors import InvalidRecord
from .records import PaneHistoryChunk, PaneRecord, SessionRecord, TabRecord, TemplateRecord

__all__ = ["Buffer", "Chunk", "Drained", "Item"]

logger = logging.getLogger("perth_pipeline.buffer")

SESSION: Final = "session"
TAB: Final = "tab"
PANE: Final = "pane"
TEMPLATE: Final = "template"

Key = tuple[str, Any]
Record = SessionRecord | TabRecord | PaneRecord | TemplateRecord

_DROPPED_MEMORY = 65_536


def copy_json(value: Any, field_name: str, budget: int) -> Any:
    """A deep copy of a JSON value, refusing one whose size (roughly, in bytes) exceeds ``budget``.

    Cheaper than serializing: the common case (a small dict) is a few dict
    comprehensions. The size estimate counts string lengths and a few bytes per
    node, a lower bound of the JSON text, so a value that passes may be a little
    over when escaped; the worker's validation is exact.
    """
    if type(value) is dict and not value:
        return {}
    copier = _JsonCopier(field_name, budget)
    copied = copier.walk(value)
    if copier.remaining < 0:
        raise InvalidRecord(field_name, f"is over the limit of {budget} bytes of JSON")
    return copied


class _JsonCopier:
    __slots__ = ("field", "remaining")

    def __init__(self, field_name: str, budget: int) -> None:
        self.field = field_name
        self.remaining = budget

    def walk(self, node: Any) -> Any:
        kind = type(node)
        if kind is dict:
            return self._dict(node)
        if kind is list or kind is tuple:
            self.remaining -= 2 + len(node)
            return [self.walk(v) for v in node]
        if kind is str:
            self.remaining -= len(node) + 2
            if "\x00" in node:
                raise InvalidRecord(self.field, "must not contain NUL characters")
            return node
        if node is None or kind is bool or kind is int:
            self.remaining -= 5
            return node
        if kind is float:
            if not math.isfinite(node):
                raise InvalidRecord(self.field, "NaN and infinity are not JSON")
            self.remaining -= 8
            return node
        raise InvalidRecord(self.field, f"{kind.__name__} is not a JSON value")

    def _dict(self, node: dict[Any, Any]) -> dict[str, Any]:
        self.remaining -= 2 + 2 * len(node)
        out = {}
        for k, v in node.items():
            if type(k) is not str:
                raise InvalidRecord(self.field, f"JSON object keys must be strings, not {type(k).__name__}")
            self.remaining -= len(k) + 3
            out[k] = self.walk(v)
        if self.remaining < 0:
            raise InvalidRecord(self.field, "is over the size limit of JSON")
        return out


@dataclass(slots=True)
class _Entry:
    kind: str
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


@dataclass(slots=True, frozen=True)
class Item:
    """One entity operation as drained: an immutable view of an entry at one moment."""

    kind: str
    key: Key
    version: int
    seq: int
    record: Record | None
    snapshot: Any
    deleted: bool
    tab_id: UUID | None
    session_id: UUID | None


def _with_route(item: Item, entry: _Entry) -> Item:
    return Item(
        item.kind,
        item.key,
        item.version,
        item.seq,
        item.record,
        item.snapshot,
        item.deleted,
        entry.tab_id,
        entry.session_id,
    )


@dataclass(slots=True, frozen=True)
class Touch:
    session_id: UUID
    last_active: datetime
    version: int
    seq: int


@dataclass(slots=True)
class Chunk:
    chunk: PaneHistoryChunk
    version: int
    seq: int
    tab_id: UUID | None
    session_id: UUID | None

    @property
    def size(self) -> int:
        return len(self.chunk.content)


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


class Buffer:
    """Latest state per live entity, dirty keys, pending scrollback. Thread-safe."""

    def __init__(
        self,
        *,
        max_entities: int,
        max_pending_history_bytes: int,
        max_json_bytes: int,
        max_chunk_bytes: int,
        clock: HybridClock | None = None,
    ) -> None:
        self.max_entities = max_entities
        self.max_pending_history_bytes = max_pending_history_bytes
        self.max_json_bytes = max_json_bytes
        self.max_chunk_bytes = max_chunk_bytes
        self.clock = clock or HybridClock()
        self._lock = threading.Lock()
        self._seq = 0
        self._live: dict[Key, _Entry] = {}
        self._live_count = 0  # entries not deleted: what the entity bound counts
        self._dirty: dict[Key, int] = {}  # key -> seq of the write that made it dirty (insertion ordered)
        self._touches: dict[UUID, Touch] = {}
        self._history: deque[Chunk] = deque()
        self._history_bytes = 0
        self._children: dict[UUID, set[Key]] = {}
        # ancestors learnt from restores or database look-ups, for entities this buffer does not hold
        self._tab_routes: OrderedDict[UUID, UUID] = OrderedDict()
        self._pane_routes: OrderedDict[UUID, tuple[UUID, UUID]] = OrderedDict()
        self._dropped: OrderedDict[UUID, None] = OrderedDict()
        self._warned_full = False
        self.counters: dict[str, int] = {
            "submitted": 0,
            "coalesced": 0,
            "invalid": 0,
            "dropped_entities": 0,
            "dropped_chunks": 0,
            "dropped_chunk_bytes": 0,
            "superseded": 0,
            "resynced": 0,
        }

    # --- write side (caller's thread) ---------------------------------------------------

    def put_session(self, record: SessionRecord) -> None:
        self._check_type(record, SessionRecord, "session")
        with self._lock:
            key = (SESSION, record.id)
            entry = self._live.get(key)
            if not self._admit(key, entry, record.id, None):
                return
            self._store(key, entry, SESSION, record, None, session_id=record.id, tab_id=None)

    def put_tab(self, record: TabRecord) -> None:
        self._check_type(record, TabRecord, "tab")
        snapshot = self._copy(record.layout_blob, "layout_blob")
        with self._lock:
            key = (TAB, record.id)
            entry = self._live.get(key)
            if entry is not None and not entry.deleted and entry.session_id != record.session_id:
                self.counters["invalid"] += 1
                raise InvalidRecord("session_id", "a tab cannot move to another session")
            if not self._admit(key, entry, record.id, record.session_id):
                return
            self._store(key, entry, TAB, record, snapshot, session_id=record.session_id, tab_id=None)
            self._tab_routes.pop(record.id, None)
            self._children.setdefault(record.session_id, set()).add(key)

    def put_pane(self, record: PaneRecord) -> None:
        self._check_type(record, PaneRecord, "pane")
        snapshot = self._copy(record.component_state, "component_state")
        with self._lock:
            key = (PANE, record.id)
            entry = self._live.get(key)
            if entry is not None and not entry.deleted and entry.tab_id != record.tab_id:
                self.counters["invalid"] += 1
                raise InvalidRecord(
                    "tab_id", "a pane cannot move to another tab (delete it and create a new one)"
                )
            if not self._admit(key, entry, record.id, record.tab_id):
                return
            session_id = self._session_of_tab(record.tab_id)
            self._store(key, entry, PANE, record, snapshot, session_id=session_id, tab_id=record.tab_id)
            self._pane_routes.pop(record.id, None)
            self._children.setdefault(record.tab_id, set()).add(key)

    def put_template(self, record: TemplateRecord) -> None:
        self._check_type(record, TemplateRecord, "template")
        snapshot = self._copy(record.definition, "definition")
        with self._lock:
            key = (TEMPLATE, record.name)
            entry = self._live.get(key)
            if not self._admit(key, entry, None, None):
                return
            self._store(key, entry, TEMPLATE, record, snapshot, session_id=None, tab_id=None)

    def touch_session(self, session_id: UUID, now: datetime) -> None:
        with self._lock:
            self.counters["submitted"] += 1
            entry = self._live.get((SESSION, session_id))
            if entry is not None and not entry.deleted:
                record = entry.record
                assert isinstance(record, SessionRecord)
                if now > record.last_active:
                    record = record.model_copy(update={"last_active": now})
                self._mark(entry, (SESSION, session_id), record, None)
                return
            if entry is not None:  # deleted: touching it changes nothing
                return
            if session_id in self._touches:
                self.counters["coalesced"] += 1
            elif len(self._touches) >= self.max_entities:
                self.counters["dropped_entities"] += 1
                return
            self._seq += 1
            self._touches[session_id] = Touch(session_id, now, self.clock.next(), self._seq)

    def delete(self, kind: str, entity_id: Any) -> None:
        with self._lock:
            self.counters["submitted"] += 1
            key = (kind, entity_id)
            entry = self._live.get(key)
            self._seq += 1
            version = self.clock.next()
            if entry is None:
                tab_id, session_id = self._route_unknown(kind, entity_id)
                self._live[key] = _Entry(kind, None, None, version, self._seq, True, tab_id, session_id)
            else:
                if key in self._dirty:
                    self.counters["coalesced"] += 1
                if not entry.deleted:
                    self._live_count -= 1
                entry.record, entry.snapshot, entry.deleted = None, None, True
                entry.version, entry.seq = version, self._seq
            self._dirty[key] = self._seq
            if kind in (SESSION, TAB, PANE):
                self._drop_descendants(entity_id)
            if kind == SESSION:
                self._touches.pop(entity_id, None)

    def append_history(self, chunk: PaneHistoryChunk) -> None:
        self._check_type(chunk, PaneHistoryChunk, "chunk")
        size = len(chunk.content)
        if size > self.max_chunk_bytes:
            self.counters["invalid"] += 1
            raise InvalidRecord(
                "content", f"chunk of {size} bytes is over the limit of {self.max_chunk_bytes}"
            )
        with self._lock:
            self.counters["submitted"] += 1
            if chunk.pane_id in self._dropped:
                self.counters["dropped_chunks"] += 1
                self.counters["dropped_chunk_bytes"] += size
                return
            self._seq += 1
            tab_id, session_id = self._route_of_pane(chunk.pane_id)
            self._history.append(Chunk(chunk, self.clock.next(), self._seq, tab_id, session_id))
            self._history_bytes += size
            while self._history_bytes > self.max_pending_history_bytes and self._history:
                old = self._history.popleft()
                self._history_bytes -= old.size
                self.counters["dropped_chunks"] += 1
                self.counters["dropped_chunk_bytes"] += old.size

    def count_invalid(self) -> None:
        with self._lock:
            self.counters["invalid"] += 1

    # --- helpers under the lock -------------------------------------------------------------

    def _check_type(self, record: Any, expected: type, what: str) -> None:
        if type(record) is not expected:
            self.counters["invalid"] += 1
            raise InvalidRecord(what, f"expected a {expected.__name__}, got {type(record).__name__}")

    def _copy(self, value: Any, field_name: str) -> Any:
        try:
            return copy_json(value, field_name, self.max_json_bytes)
        except InvalidRecord:
            self.counters["invalid"] += 1
            raise

    def _admit(self, key: Key, entry: _Entry | None, entity_id: UUID | None, parent_id: UUID | None) -> bool:
        """Whether a write may go in (False: dropped and counted). Called under the lock."""
        self.counters["submitted"] += 1
        if parent_id is not None and parent_id in self._dropped:
            if entity_id is not None:
                self._remember_dropped(entity_id)
            self.counters["dropped_entities"] += 1
            return False
        if entry is not None and not entry.deleted:
            return True
        if self._live_count >= self.max_entities:
            if entity_id is not None:
                self._remember_dropped(entity_id)
            self.counters["dropped_entities"] += 1
            if not self._warned_full:
                self._warned_full = True
                logger.warning(
                    "persistence buffer full; new entities are dropped until some are deleted",
                    extra={"max_entities": self.max_entities},
                )
            return False
        return True

    def _remember_dropped(self, entity_id: UUID) -> None:
        self._dropped[entity_id] = None
        if len(self._dropped) > _DROPPED_MEMORY:
            self._dropped.popitem(last=False)

    def _store(
        self,
        key: Key,
        entry: _Entry | None,
        kind: str,
        record: Record,
        snapshot: Any,
        *,
        session_id: UUID | None,
        tab_id: UUID | None,
    ) -> None:
        if entry is None or entry.deleted:
            if entry is None:
                entry = _Entry(kind, record, snapshot, 0, 0)
                self._live[key] = entry
            elif key in self._dirty:
                entry.pending_delete = entry.version
            self._live_count += 1
            entry.deleted = False
            if self._live_count < self.max_entities:
                self._warned_full = False
        entry.session_id, entry.tab_id = session_id, tab_id
        self._mark(entry, key, record, snapshot)

    def _mark(self, entry: _Entry, key: Key, record: Record, snapshot: Any) -> None:
        self._seq += 1
        entry.record, entry.snapshot = record, snapshot
        entry.version, entry.seq = self.clock.next(), self._seq
        if key in self._dirty:
            self.counters["coalesced"] += 1
        self._dirty[key] = self._seq

    def _session_of_tab(self, tab_id: UUID) -> UUID | None:
        tab = self._live.get((TAB, tab_id))
        if tab is not None:
            return tab.session_id
        return self._tab_routes.get(tab_id)

    def _route_of_pane(self, pane_id: UUID) -> tuple[UUID | None, UUID | None]:
        pane = self._live.get((PANE, pane_id))
        if pane is not None and pane.tab_id is not None:
            return pane.tab_id, pane.session_id or self._session_of_tab(pane.tab_id)
        route = self._pane_routes.get(pane_id)
        return route if route is not None else (None, None)

    def _route_unknown(self, kind: str, entity_id: Any) -> tuple[UUID | None, UUID | None]:
        if kind == SESSION:
            return None, entity_id
        if kind == TAB:
            return None, self._tab_routes.get(entity_id)
        if kind == PANE:
            return self._route_of_pane(entity_id)
        return None, None

    def _drop_descendants(self, parent_id: UUID) -> None:
        """A delete supersedes everything buffered under it (the apply cascades by version)."""
        stack = [parent_id]
        doomed_panes: set[UUID] = set()
        while stack:
            for child_key in self._children.pop(stack.pop(), ()):
                child = self._live.pop(child_key, None)
                if child is None:
                    continue
                if not child.deleted:
                    self._live_count -= 1
                if self._dirty.pop(child_key, None) is not None:
                    self.counters["superseded"] += 1
                stack.append(child_key[1])
                if child_key[0] == PANE:
                    doomed_panes.add(child_key[1])
        if isinstance(parent_id, UUID):
            doomed_panes.add(parent_id)
        if self._history and doomed_panes:
            kept = deque(c for c in self._history if c.chunk.pane_id not in doomed_panes)
            self.counters["superseded"] += len(self._history) - len(kept)
            self._history = kept
            self._history_bytes = sum(c.size for c in kept)

    # --- flusher side -----------------------------------------------------------------------

    def drain(self, max_items: int) -> Drained:
        """Take up to ``max_items`` dirty operations (oldest first), leaving the rest dirty.

        Items whose ancestors are still unknown stay dirty (see :meth:`unrouted`).
        """
        out = Drained()
        with self._lock:
            budget = max_items
            if self._touches and budget > 0:
                for sid in list(self._touches)[:budget]:
                    out.touches.append(self._touches.pop(sid))
                budget -= len(out.touches)
            if budget > 0 and self._dirty:
                self._drain_items(out, budget)
                budget -= len(out.items)
            while budget > 0 and self._history:
                chunk = self._history[0]
                if chunk.session_id is None:
                    chunk.tab_id, chunk.session_id = self._route_of_pane(chunk.chunk.pane_id)
                    if chunk.session_id is None:
                        break  # keep order: wait for the pane's route
                self._history.popleft()
                self._history_bytes -= chunk.size
                out.chunks.append(chunk)
                budget -= 1
        return out

    def _drain_items(self, out: Drained, budget: int) -> None:
        taken: list[Key] = []
        for key in self._dirty:
            if len(taken) >= budget:
                break
            entry = self._live.get(key)
            if entry is None:
                taken.append(key)
                continue
            if not self._routed(key, entry):
                continue
            taken.append(key)
            seq = self._dirty[key]
            if entry.pending_delete is not None:
                # the delete goes first so that its cascade is not lost to the re-creation
                delete = Item(entry.kind, key, entry.pending_delete, seq, None, None, True, None, None)
                out.items.append(_with_route(delete, entry))
                entry.pending_delete = None
            out.items.append(
                Item(
                    entry.kind,
                    key,
                    entry.version,
                    seq,
                    entry.record,
                    entry.snapshot,
                    entry.deleted,
                    entry.tab_id,
                    entry.session_id,
                )
            )
        for key in taken:
            del self._dirty[key]

    def _routed(self, key: Key, entry: _Entry) -> bool:
        kind = key[0]
        if kind == TAB and entry.session_id is None:
            entry.session_id = self._tab_routes.get(key[1])
        elif kind == PANE and entry.session_id is None:
            if entry.tab_id is None:
                entry.tab_id, entry.session_id = self._route_of_pane(key[1])
            else:
                entry.session_id = self._session_of_tab(entry.tab_id)
        return kind == TEMPLATE or entry.session_id is not None

    def unrouted(self) -> tuple[list[UUID], list[UUID]]:
        """Tab ids whose session, and pane ids whose tab and session, the buffer does not know."""
        tabs: set[UUID] = set()
        panes: set[UUID] = set()
        with self._lock:
            for key in self._dirty:
                entry = self._live.get(key)
                if entry is None or entry.session_id is not None or key[0] == TEMPLATE:
                    continue
                if key[0] == PANE and entry.tab_id is not None:
                    tabs.add(entry.tab_id)
                elif key[0] == PANE:
                    panes.add(key[1])
                elif key[0] == TAB:
                    tabs.add(key[1])
            if self._history and self._history[0].session_id is None:
                panes.add(self._history[0].chunk.pane_id)
        return sorted(tabs), sorted(panes)

    def learn_routes(
        self,
        tabs: dict[UUID, UUID] | None = None,
        panes: dict[UUID, tuple[UUID, UUID]] | None = None,
    ) -> None:
        """Remember ancestors read from the database (restores, look-ups), bounded."""
        with self._lock:
            for tab_id, session_id in (tabs or {}).items():
                self._tab_routes[tab_id] = session_id
                self._tab_routes.move_to_end(tab_id)
            for pane_id, route in (panes or {}).items():
                self._pane_routes[pane_id] = route
                self._pane_routes.move_to_end(pane_id)
            for routes in (self._tab_routes, self._pane_routes):
                while len(routes) > self.max_entities:
                    routes.popitem(last=False)

    def discard_unroutable(self, tab_ids: Iterable[UUID], pane_ids: Iterable[UUID]) -> int:
        """Drop dirty entities and chunks whose ancestors no one knows (counted)."""
        tabs, panes = set(tab_ids), set(pane_ids)
        dropped = 0
        with self._lock:
            for key in list(self._dirty):
                entry = self._live.get(key)
                if entry is None or entry.session_id is not None:
                    continue
                if (key[0] == TAB and key[1] in tabs) or (
                    key[0] == PANE and (key[1] in panes or entry.tab_id in tabs)
                ):
                    del self._dirty[key]
                    self._live.pop(key, None)
                    if not entry.deleted:
                        self._live_count -= 1
                    dropped += 1
            while self._history and self._history[0].session_id is None:
                if self._history[0].chunk.pane_id not in panes:
                    break
                chunk = self._history.popleft()
                self._history_bytes -= chunk.size
                self.counters["dropped_chunks"] += 1
                self.counters["dropped_chunk_bytes"] += chunk.size
            self.counters["dropped_entities"] += dropped
        return dropped

    def redirty(
        self, items: Iterable[Item], touches: Iterable[Touch] = (), chunks: Iterable[Chunk] = ()
    ) -> int:
        """Make undelivered operations dirty again (unless superseded since). Returns how many."""
        count = 0
        with self._lock:
            for item in items:
                entry = self._live.get(item.key)
                if entry is None:
                    continue
                if item.deleted and not entry.deleted and entry.version > item.version:
                    # re-created since: the lost delete still has to go before the new state
                    entry.pending_delete = max(entry.pending_delete or 0, item.version)
                if item.key in self._dirty:
                    continue
                self._dirty[item.key] = min(item.seq, entry.seq)
                count += 1
            for touch in touches:
                if touch.session_id not in self._touches and (SESSION, touch.session_id) not in self._live:
                    self._touches[touch.session_id] = touch
                    count += 1
            restored = [c for c in chunks if c.chunk.pane_id not in self._dropped]
            for chunk in reversed(restored):
                if self._history_bytes + chunk.size > self.max_pending_history_bytes:
                    self.counters["dropped_chunks"] += 1
                    self.counters["dropped_chunk_bytes"] += chunk.size
                    continue
                self._history.appendleft(chunk)
                self._history_bytes += chunk.size
                count += 1
            self.counters["resynced"] += count
        return count

    def confirm(self, items: Iterable[Item]) -> None:
        """Operations committed: a delete that is still the latest state is forgotten."""
        with self._lock:
            for item in items:
                if not item.deleted:
                    continue
                entry = self._live.get(item.key)
                current = entry is not None and entry.deleted and entry.version == item.version
                if current and item.key not in self._dirty:
                    del self._live[item.key]

    def observe_version(self, version: int) -> None:
        self.clock.observe(version)

    # --- introspection --------------------------------------------------------------------------

    @property
    def seq(self) -> int:
        return self._seq

    def min_unsent_seq(self) -> int | None:
        """The oldest write not yet drained, or None when nothing waits."""
        with self._lock:
            candidates = []
            if self._dirty:
                candidates.append(min(self._dirty.values()))
            if self._touches:
                candidates.append(min(t.seq for t in self._touches.values()))
            if self._history:
                candidates.append(self._history[0].seq)
            return min(candidates) if candidates else None

    def has_dirty(self) -> bool:
        return bool(self._dirty or self._touches or self._history)

    def gauges(self) -> dict[str, int]:
        with self._lock:
            return {
                "live_entities": self._live_count,
                "dirty": len(self._dirty) + len(self._touches),
                "pending_history_chunks": len(self._history),
                "pending_history_bytes": self._history_bytes,
            }
