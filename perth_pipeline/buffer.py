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

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice
from typing import Any, Final, NamedTuple
from uuid import UUID

from .clock import HybridClock
from .errors import InvalidRecord
from .masking import masked_logger
from .records import PaneHistoryChunk, PaneRecord, SessionRecord, TabRecord, TemplateRecord
from .scrollback import Chunk, Route, Scrollback
from .validation import copy_json, verify_chunk, verify_pane, verify_session, verify_tab, verify_template

__all__ = ["Buffer", "Chunk", "Drained", "Item", "Receipt", "Touch"]

logger = masked_logger("perth_pipeline.buffer")

SESSION: Final = "session"
TAB: Final = "tab"
PANE: Final = "pane"
TEMPLATE: Final = "template"

#: The buffer's key of an entity: ``(kind, UUID.int)``; templates ``("template", name)``.
Key = tuple[str, Any]
Record = SessionRecord | TabRecord | PaneRecord | TemplateRecord

_DROPPED_MEMORY = 65_536
#: Keys the flusher takes (or gives back) under the lock at a time; between two slices it
#: lets the terminal's threads in (about 0.1 to 0.3 ms of work per slice).
_SLICE = 128


@dataclass(slots=True)
class _Entry:
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


class Buffer:
    """Latest state per live entity, dirty keys, pending scrollback. Thread-safe.

    Every method takes one short lock and does work proportional to what it is given
    (one record, one drained batch), never to what the buffer holds, so that a write
    call stays in microseconds even with a quarter of a million dirty entities behind an
    outage.

    Inside, entities are keyed by ``(kind, UUID.int)`` (templates by ``(kind, name)``) and
    parents by ``UUID.int``: hashing a UUID runs Python code (about half a microsecond here),
    hashing an int does not, and a write call and its drain look keys up about a dozen
    times. The UUIDs themselves are kept in the entries, for what goes out.
    """

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
        # Versions are issued under this buffer's lock only (and observed under it): the clock
        # needs no lock of its own here. A clock passed in must not be shared.
        self.clock = clock or HybridClock()
        self._lock = threading.Lock()
        self._seq = 0
        self._live: dict[Key, _Entry] = {}
        self._live_count = 0  # entries not deleted: what the entity bound counts
        # key -> seq of the oldest write of it not yet drained. A write appends a key with a new
        # (highest) seq, so those keys are in seq order; keys given back by redirty() come with
        # older seqs and are tracked apart, so that the oldest unsent write is known in O(1).
        self._dirty: dict[Key, int] = {}
        self._redirtied: set[Key] = set()
        self._redirtied_min: int | None = None  # a lower bound of the seqs in _redirtied
        self._unrouted: set[Key] = set()  # dirty tabs and panes whose session is not known yet
        # Dirty tabs and panes found unroutable by a drain wait here (key -> seq, as in _dirty),
        # out of the drains' way, until their route is learnt: nothing decides a loss by time.
        self._held: dict[Key, int] = {}
        self._held_min: int | None = None  # a lower bound of the seqs in _held
        self._routes_changed = False  # a route was learnt since held keys were last looked at
        self._touches: dict[int, Touch] = {}  # session id (int) -> its pending touch
        # parent id (int) -> keys of the children written under it (a tab's session, a pane's tab;
        # a pane under a tab this buffer does not hold also links that tab under its session)
        self._children: dict[int, set[Key]] = {}
        # ancestors learnt from restores or database look-ups, for entities this buffer does not
        # hold, by id (int)
        self._tab_routes: OrderedDict[int, UUID] = OrderedDict()
        self._pane_routes: OrderedDict[int, tuple[UUID, UUID]] = OrderedDict()
        self._dropped: OrderedDict[int, None] = OrderedDict()
        # panes this terminal deleted (or whose tab or session it deleted), with their route:
        # a chunk appended to one afterwards is moot (superseded at once, not held)
        self._gone_panes: OrderedDict[int, Route] = OrderedDict()
        self._warned_full = False
        self._full_warning: dict[str, int] | None = None
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
        self._scrollback = Scrollback(max_pending_history_bytes, self.counters)

    # --- write side (caller's thread) ---------------------------------------------------

    def put_session(self, record: SessionRecord) -> None:
        self._accept(record, SessionRecord, "session", verify_session)
        ident = record.id.int
        try:
            with self._lock:
                key = (SESSION, ident)
                entry = self._live.get(key)
                if not self._admit(entry, ident, None):
                    return
                if entry is not None and isinstance(entry.record, SessionRecord):
                    held = entry.record.last_active
                    if held > record.last_active:
                        # last_active only grows where it is stored (a max register): keep the
                        # buffer the same, so that what is stored does not depend on coalescing
                        record = record.model_copy(update={"last_active": held})
                self._store(key, entry, record, None, session_id=record.id, tab_id=None)
        finally:
            if self._full_warning is not None:
                self._log_full()

    def put_tab(self, record: TabRecord) -> None:
        self._accept(record, TabRecord, "tab", verify_tab)
        snapshot = self._copy(record.layout_blob, "layout_blob")
        session_id = record.session_id
        key = (TAB, record.id.int)
        try:
            with self._lock:
                entry = self._live.get(key)
                if entry is not None and not entry.deleted:
                    if not _same(entry.session_id, session_id):
                        self.counters["invalid"] += 1
                        raise InvalidRecord("session_id", "a tab cannot move to another session")
                    self.counters["submitted"] += 1  # an update of a tab it holds
                    self._mark(entry, key, record, snapshot)
                    return
                if not self._admit(entry, key[1], session_id.int):
                    return
                self._store(key, entry, record, snapshot, session_id=session_id, tab_id=None)
                self._tab_routes.pop(key[1], None)
        finally:
            if self._full_warning is not None:
                self._log_full()

    def put_pane(self, record: PaneRecord) -> None:
        # The terminal's hottest call (a title or a scroll position changed): an update of a
        # pane it holds is one look-up and a few assignments under the lock.
        if type(record) is not PaneRecord:
            self._refuse_type(record, PaneRecord, "pane")
        fields = record.__dict__
        try:
            verify_pane(record, fields)
        except InvalidRecord:
            self.count_invalid()
            raise
        snapshot = self._copy(fields["component_state"], "component_state")
        tab_id = fields["tab_id"]
        key = (PANE, fields["id"].int)
        try:
            with self._lock:
                entry = self._live.get(key)
                if entry is not None and not entry.deleted:
                    held = entry.tab_id
                    if held is not tab_id and (held is None or held.int != tab_id.int):
                        self.counters["invalid"] += 1
                        raise InvalidRecord(
                            "tab_id", "a pane cannot move to another tab (delete it and create a new one)"
                        )
                    if entry.session_id is not None:  # the common case: an update of a pane it holds
                        self.counters["submitted"] += 1
                        self._mark(entry, key, record, snapshot)
                        return
                tab = tab_id.int
                if not self._admit(entry, key[1], tab):
                    return
                session_id = self._session_of_tab(tab)
                self._store(key, entry, record, snapshot, session_id=session_id, tab_id=tab_id)
                self._pane_routes.pop(key[1], None)
                if session_id is not None:
                    self._link_foreign_tab(tab, session_id.int)
        finally:
            if self._full_warning is not None:
                self._log_full()

    def put_template(self, record: TemplateRecord) -> None:
        self._accept(record, TemplateRecord, "template", verify_template)
        snapshot = self._copy(record.definition, "definition")
        try:
            with self._lock:
                key = (TEMPLATE, record.name)
                entry = self._live.get(key)
                if not self._admit(entry, None, None):
                    return
                self._store(key, entry, record, snapshot, session_id=None, tab_id=None)
        finally:
            if self._full_warning is not None:
                self._log_full()

    def touch_session(self, session_id: UUID, now: datetime) -> None:
        ident = session_id.int
        with self._lock:
            self.counters["submitted"] += 1
            key = (SESSION, ident)
            entry = self._live.get(key)
            if entry is not None and isinstance(entry.record, SessionRecord):
                record = entry.record
                if now > record.last_active:
                    record = record.model_copy(update={"last_active": now})
                self._mark(entry, key, record, None)
                return
            if entry is not None:  # deleted: touching it changes nothing
                return
            pending = self._touches.get(ident)
            if pending is not None:
                self.counters["coalesced"] += 1
                # keeps the seq of the oldest unsent touch: flush() waits for that one
                latest = max(now, pending.last_active)
                self._touches[ident] = Touch(session_id, latest, self.clock.next_unlocked(), pending.seq)
                return
            if len(self._touches) >= self.max_entities:
                self.counters["dropped_entities"] += 1
                return
            self._seq += 1
            self._touches[ident] = Touch(session_id, now, self.clock.next_unlocked(), self._seq)

    def delete(self, kind: str, entity_id: Any) -> None:
        key = _ref(kind, entity_id)
        ident = key[1]
        try:
            with self._lock:
                self.counters["submitted"] += 1
                entry = self._live.get(key)
                if entry is None and len(self._live) >= 2 * self.max_entities:
                    # every slot holds a live entity or a delete not yet committed (a long outage)
                    self.counters["dropped_entities"] += 1
                    self._warn_full()
                    return
                self._seq += 1
                version = self.clock.next_unlocked()
                if entry is None:
                    tab_id, session_id = self._route_unknown(kind, entity_id)
                    entry = _Entry(kind, entity_id, None, None, version, self._seq, True, tab_id, session_id)
                    self._live[key] = entry
                    parent = _parent(key, entry)
                    if parent is not None:
                        self._link(parent, key)
                else:
                    if not entry.deleted:
                        self._release_slot()
                    entry.record, entry.snapshot, entry.deleted = None, None, True
                    entry.version, entry.seq = version, self._seq
                    # An earlier unsent delete (pending_delete) is covered by this one, which is
                    # higher, but stays marked: it may be of an incarnation under another parent,
                    # whose cascade must not make this delete look superseded (see _drop_child).
                self._make_dirty(key, entry, self._seq)
                if kind != TEMPLATE:
                    self._dropped.pop(ident, None)
                    self._drop_descendants(ident, kind, (entry.tab_id, entry.session_id))
                if kind == SESSION:
                    self._touches.pop(ident, None)
        finally:
            if self._full_warning is not None:
                self._log_full()

    def append_history(self, chunk: PaneHistoryChunk) -> None:
        self._accept(chunk, PaneHistoryChunk, "chunk", verify_chunk)
        size = len(chunk.content)
        if size > self.max_chunk_bytes:
            self.count_invalid()
            raise InvalidRecord(
                "content", f"chunk of {size} bytes is over the limit of {self.max_chunk_bytes}"
            )
        pane = chunk.pane_id.int
        with self._lock:
            self.counters["submitted"] += 1
            if pane in self._dropped:
                self.counters["dropped_chunks"] += 1
                self.counters["dropped_chunk_bytes"] += size
                return
            if pane in self._gone_panes:
                # the pane's last output, drained after the terminal deleted it: moot, not held
                self.counters["superseded"] += 1
                return
            self._seq += 1
            tab_id, session_id = self._route_of_pane(pane)
            self._scrollback.append(
                Chunk(chunk, pane, self.clock.next_unlocked(), self._seq, tab_id, session_id)
            )

    def count_invalid(self) -> None:
        with self._lock:
            self.counters["invalid"] += 1

    # --- helpers under the lock -------------------------------------------------------------

    def _refuse_type(self, record: Any, expected: type, what: str) -> None:
        self.count_invalid()
        raise InvalidRecord(what, f"expected a {expected.__name__}, got {type(record).__name__}")

    def _accept(self, record: Any, expected: type, what: str, verify: Callable[[Any], None]) -> None:
        if type(record) is not expected:
            self._refuse_type(record, expected, what)
        try:
            verify(record)
        except InvalidRecord:
            self.count_invalid()
            raise

    def _copy(self, value: Any, field_name: str) -> Any:
        try:
            return copy_json(value, field_name, self.max_json_bytes)
        except InvalidRecord:
            self.count_invalid()
            raise

    def _admit(self, entry: _Entry | None, entity_id: int | None, parent_id: int | None) -> bool:
        """Whether a write may go in (False: dropped and counted). Called under the lock."""
        self.counters["submitted"] += 1
        if parent_id is not None and parent_id in self._dropped:
            if entity_id is not None:
                self._remember_dropped(entity_id)
            self.counters["dropped_entities"] += 1
            return False
        if entry is not None and not entry.deleted:
            return True
        if self._live_count >= self.max_entities or (
            entry is None and len(self._live) >= 2 * self.max_entities
        ):
            if entity_id is not None:
                self._remember_dropped(entity_id)
            self.counters["dropped_entities"] += 1
            self._warn_full()
            return False
        if entity_id is not None:
            # room again: a record is whole, so a later write of a dropped entity is complete state
            self._dropped.pop(entity_id, None)
        return True

    def _warn_full(self) -> None:
        # under the lock: only note it; the caller logs once the lock is released (a log
        # handler may do I/O, and a write call must not wait on it)
        if not self._warned_full:
            self._warned_full = True
            self._full_warning = {
                "max_entities": self.max_entities,
                "live_entities": self._live_count,
                "held_entries": len(self._live),
            }

    def _log_full(self) -> None:
        with self._lock:
            extra, self._full_warning = self._full_warning, None
        if extra is not None:
            logger.warning(
                "persistence buffer full: new entities, and what is written under them, are dropped "
                "(counted in stats()['dropped_entities']) until the buffer drains",
                extra=extra,
            )

    def _release_slot(self) -> None:
        self._live_count -= 1
        self._maybe_rearm()

    def _maybe_rearm(self) -> None:
        # hysteresis: an entity count hovering at the bound must not log a warning per call
        if (
            self._warned_full
            and self._live_count < self.max_entities * 9 // 10
            and len(self._live) < self.max_entities * 18 // 10
        ):
            self._warned_full = False

    def _remember_dropped(self, entity_id: int) -> None:
        self._dropped[entity_id] = None
        if len(self._dropped) > _DROPPED_MEMORY:
            self._dropped.popitem(last=False)

    def _store(
        self,
        key: Key,
        entry: _Entry | None,
        record: Record,
        snapshot: Any,
        *,
        session_id: UUID | None,
        tab_id: UUID | None,
    ) -> None:
        if entry is None:
            ident = record.name if isinstance(record, TemplateRecord) else record.id
            entry = _Entry(key[0], ident, record, snapshot, 0, 0)
            self._live[key] = entry
            self._live_count += 1
        elif entry.deleted:
            if key in self._dirty or key in self._held:
                # re-created before its delete was sent: the delete still goes, first, so that
                # its cascade (what was written under the old one) is not lost
                entry.pending_delete = entry.version
            entry.deleted = False
            self._live_count += 1
        old_parent = _parent(key, entry)
        entry.session_id, entry.tab_id = session_id, tab_id
        parent = _parent(key, entry)
        if old_parent != parent and old_parent is not None:
            self._unlink_from(old_parent, key)
        if parent is not None:
            self._link(parent, key)
        if key[0] == PANE:
            self._gone_panes.pop(key[1], None)  # created again: its scrollback counts again
            self._routes_changed = True  # its parked chunks may be routable now
        elif key[0] == TAB:
            self._routes_changed = True  # held panes under it may be routable now
        self._mark(entry, key, record, snapshot)

    def _mark(self, entry: _Entry, key: Key, record: Record, snapshot: Any) -> None:
        self._seq = seq = self._seq + 1
        entry.record, entry.snapshot = record, snapshot
        entry.version, entry.seq = self.clock.next_unlocked(), seq
        dirty = self._dirty
        if key in dirty or (self._held and key in self._held):
            # coalesced: it keeps the seq of its oldest unsent write (flush() waits for that one)
            self.counters["coalesced"] += 1
        else:
            dirty[key] = seq
        if entry.session_id is None and key[0] in (TAB, PANE):
            self._unrouted.add(key)
        elif self._unrouted:
            self._unrouted.discard(key)

    def _make_dirty(self, key: Key, entry: _Entry, seq: int) -> None:
        if key in self._dirty or key in self._held:
            # coalesced: it keeps the seq of its oldest unsent write (flush() waits for that one)
            self.counters["coalesced"] += 1
        else:
            self._dirty[key] = seq
        self._track_route(key, entry)

    def _track_route(self, key: Key, entry: _Entry) -> None:
        if entry.session_id is None and key[0] in (TAB, PANE):
            self._unrouted.add(key)
        elif self._unrouted:
            self._unrouted.discard(key)

    def _undirty(self, key: Key) -> bool:
        if self._dirty.pop(key, None) is None:
            if self._held.pop(key, None) is None:
                return False
            if not self._held:
                self._held_min = None
            return True
        self._unrouted.discard(key)
        if key in self._redirtied:
            self._redirtied.discard(key)
            if not self._redirtied:
                self._redirtied_min = None
        return True

    def _link(self, parent_id: int, key: Key) -> None:
        children = self._children.get(parent_id)
        if children is None:
            self._children[parent_id] = {key}
        else:
            children.add(key)

    def _unlink_from(self, parent_id: int, key: Key) -> None:
        children = self._children.get(parent_id)
        if children is not None:
            children.discard(key)
            if not children:
                del self._children[parent_id]

    def _link_foreign_tab(self, tab_id: int, session_id: int) -> None:
        # a pane under a tab this buffer does not hold: a delete of the session must still find it
        key = (TAB, tab_id)
        if key not in self._live:
            self._link(session_id, key)

    def _forget(self, key: Key, entry: _Entry) -> None:
        """Remove an entry for good (its delete committed, or dropped)."""
        del self._live[key]
        parent = _parent(key, entry)
        if parent is not None:
            self._unlink_from(parent, key)
        if not entry.deleted:
            self._release_slot()

    def _session_of_tab(self, tab_id: int) -> UUID | None:
        tab = self._live.get((TAB, tab_id))
        if tab is not None and tab.session_id is not None:
            return tab.session_id
        return self._tab_routes.get(tab_id)

    def _route_of_pane(self, pane_id: int) -> tuple[UUID | None, UUID | None]:
        pane = self._live.get((PANE, pane_id))
        if pane is not None and pane.tab_id is not None:
            return pane.tab_id, pane.session_id or self._session_of_tab(pane.tab_id.int)
        route = self._pane_routes.get(pane_id) or self._gone_panes.get(pane_id)
        return route if route is not None else (None, None)

    def _route_unknown(self, kind: str, entity_id: Any) -> tuple[UUID | None, UUID | None]:
        if kind == SESSION:
            return None, entity_id
        if kind == TAB:
            return None, self._tab_routes.get(entity_id.int)
        if kind == PANE:
            return self._route_of_pane(entity_id.int)
        return None, None

    def _drop_descendants(self, parent_id: int, kind: str, route: Route) -> None:
        """A delete supersedes everything buffered under it (the apply cascades by version).

        ``route`` is the deleted entity's ``(tab_id, session_id)``. The panes it takes with it are
        remembered as gone, with their routes: a later chunk of one is moot, and a later delete
        of one knows where to go.
        """
        stack = [parent_id]
        doomed: dict[int, Route] = {parent_id: route} if kind == PANE else {}
        while stack:
            current = stack.pop()
            for child_key in self._children.pop(current, ()):
                child = self._live.get(child_key)
                if child is not None:
                    if _parent(child_key, child) != current:
                        continue  # re-created under another parent since: not under this one
                    self._drop_child(child_key, child)
                stack.append(child_key[1])
                if child_key[0] == PANE:
                    doomed[child_key[1]] = (None, None) if child is None else (child.tab_id, child.session_id)
        if doomed:
            for pane, pane_route in doomed.items():
                self._remember_gone(pane, pane_route)
            self._scrollback.drop_panes(set(doomed))

    def _remember_gone(self, pane: int, route: Route) -> None:
        self._gone_panes[pane] = route
        self._gone_panes.move_to_end(pane)
        if len(self._gone_panes) > _DROPPED_MEMORY:
            self._gone_panes.popitem(last=False)

    def _drop_child(self, key: Key, child: _Entry) -> None:
        if child.pending_delete is not None:
            # the unsent delete of an earlier incarnation (perhaps under another parent, which
            # this cascade does not reach) still has to go: keep it, as a delete, dirty; the new
            # incarnation (or its own delete) is superseded
            if not child.deleted:
                self._release_slot()
                child.version = child.pending_delete
            child.record, child.snapshot, child.deleted = None, None, True
            child.pending_delete = None
            self.counters["superseded"] += 1
            return
        del self._live[key]
        if not child.deleted:
            self._release_slot()
        if self._undirty(key):
            self.counters["superseded"] += 1

    # --- flusher side -----------------------------------------------------------------------

    def drain(self, max_items: int) -> Drained:
        """Take up to ``max_items`` dirty operations (oldest first), leaving the rest dirty.

        Items whose ancestors are still unknown are held apart, dirty, until their route is
        learnt (see :meth:`unrouted`); one pane's unroutable chunks are parked without holding
        back any other's. The lock is taken for ``_SLICE`` keys at a time, and the interpreter
        lock is let go between slices, so that a write call never waits for a whole drain.
        """
        out = Drained()
        budget = max_items
        if self._routes_changed:
            self._release_held()
        with self._lock:
            if self._touches and budget > 0:
                for sid in list(islice(self._touches, budget)):
                    out.touches.append(self._touches.pop(sid))
                budget -= len(out.touches)
        while budget > 0 and self._dirty:
            with self._lock:
                taken, looked = self._drain_items(out, budget)
            budget -= taken
            if looked < _SLICE:
                break
            _let_writers_in()
        if budget > 0 and self._scrollback:
            with self._lock:
                out.chunks = self._scrollback.take(budget, self._route_of_pane, self._gone_panes.__contains__)
        return out

    def _drain_items(self, out: Drained, budget: int) -> tuple[int, int]:
        """Take up to ``budget`` dirty keys into ``out``, looking at ``_SLICE`` at most: (taken, looked).

        (Under the lock.) A key found unroutable is moved to the held keys, out of every later
        drain's way, so a drain's work stays proportional to what was written since the last.
        """
        taken: list[Key] = []
        held: list[Key] = []
        items = out.items
        live, unrouted = self._live, self._unrouted
        for key, seq in self._dirty.items():
            if len(taken) >= budget or len(taken) + len(held) >= _SLICE:
                break
            entry = live.get(key)
            if entry is None:
                taken.append(key)
                continue
            if unrouted and key in unrouted and not self._routed(key, entry):
                held.append(key)
                continue
            taken.append(key)
            kind, tab_id, session_id = entry.kind, entry.tab_id, entry.session_id
            public = (kind, entry.ident)
            if entry.pending_delete is not None:
                if not entry.deleted:
                    # the delete goes first so that its cascade is not lost to the re-creation
                    items.append(
                        Item(
                            kind, public, entry.pending_delete, seq, None, None, True, tab_id, session_id, key
                        )
                    )
                entry.pending_delete = None  # (a delete since covers it)
            items.append(
                Item(
                    kind,
                    public,
                    entry.version,
                    seq,
                    entry.record,
                    entry.snapshot,
                    entry.deleted,
                    tab_id,
                    session_id,
                    key,
                )
            )
        pop = self._dirty.pop
        for key in taken:
            pop(key)
        for key in held:
            self._hold(key, pop(key))
        if unrouted:
            unrouted.difference_update(taken)
            unrouted.difference_update(held)
        if self._redirtied:
            self._redirtied.difference_update(taken)
            self._redirtied.difference_update(held)
            if not self._redirtied:
                self._redirtied_min = None
        return len(taken), len(taken) + len(held)

    def _hold(self, key: Key, seq: int) -> None:
        self._held[key] = seq
        self._held_min = seq if self._held_min is None else min(self._held_min, seq)

    def _release_held(self) -> None:
        """Back to the dirty keys (and the parked chunks back in line): what is routable now."""
        with self._lock:
            self._routes_changed = False
            self._scrollback.release(self._route_of_pane, self._gone_panes.__contains__)
            keys = list(self._held)
        for start in range(0, len(keys), _SLICE):
            if start:
                _let_writers_in()
            with self._lock:
                for key in keys[start : start + _SLICE]:
                    seq = self._held.get(key)
                    if seq is None:
                        continue  # superseded meanwhile
                    entry = self._live.get(key)
                    if entry is None:
                        del self._held[key]
                    elif self._routed(key, entry):
                        del self._held[key]
                        self._redirty_key(key, entry, seq)
                if not self._held:
                    self._held_min = None

    def _routed(self, key: Key, entry: _Entry) -> bool:
        """Find the session of a tab or pane from what the buffer knows now (under the lock)."""
        kind = key[0]
        if entry.session_id is not None:
            pass  # known since (a tab created again names its session in its record)
        elif kind == TAB:
            entry.session_id = self._tab_routes.get(key[1])
        elif kind == PANE:
            if entry.tab_id is None:
                entry.tab_id, entry.session_id = self._route_of_pane(key[1])
            else:
                entry.session_id = self._session_of_tab(entry.tab_id.int)
        if entry.session_id is None:
            return False
        self._unrouted.discard(key)
        if kind == TAB:
            self._link(entry.session_id.int, key)
        elif entry.tab_id is not None:
            self._link(entry.tab_id.int, key)
            self._link_foreign_tab(entry.tab_id.int, entry.session_id.int)
        return True

    def unrouted(self) -> tuple[list[UUID], list[UUID]]:
        """Tab ids whose session, and pane ids whose tab and session, the buffer does not know.

        What waits for them (held tabs and panes, parked chunks) stays in memory, dirty, until
        :meth:`learn_routes` tells: a delay is never a loss.
        """
        self._release_held()
        tabs: set[UUID] = set()
        panes: set[UUID] = set()
        with self._lock:
            for key in [*self._held, *self._unrouted]:
                entry = self._live.get(key)
                if entry is None:
                    self._unrouted.discard(key)
                elif key in self._unrouted and self._routed(key, entry):
                    continue
                elif key[0] == PANE and entry.tab_id is not None:
                    tabs.add(entry.tab_id)
                elif key[0] == PANE:
                    panes.add(entry.ident)
                else:
                    tabs.add(entry.ident)
            for pane_id in self._scrollback.parked_panes():
                pane = self._live.get((PANE, pane_id.int))
                if pane is not None and pane.tab_id is not None:
                    tabs.add(pane.tab_id)
                else:
                    panes.add(pane_id)
        return sorted(tabs), sorted(panes)

    def learn_routes(
        self,
        tabs: dict[UUID, UUID] | None = None,
        panes: dict[UUID, tuple[UUID, UUID]] | None = None,
    ) -> None:
        """Remember ancestors read from the database (restores, look-ups), bounded.

        A pane known only by its tombstone is routed by it like any other: its chunks are sent and
        the workers judge them by version (another terminal may have created it again). Only this
        terminal's own delete of a pane (or of its tab or session) makes its scrollback moot.
        """
        with self._lock:
            for tab_id, session_id in (tabs or {}).items():
                ident = tab_id.int
                self._tab_routes[ident] = session_id
                self._tab_routes.move_to_end(ident)
            for pane_id, route in (panes or {}).items():
                ident = pane_id.int
                self._pane_routes[ident] = route
                self._pane_routes.move_to_end(ident)
            for routes in (self._tab_routes, self._pane_routes):
                while len(routes) > self.max_entities:
                    routes.popitem(last=False)
            self._routes_changed = True

    def redirty(
        self, items: Iterable[Item], touches: Iterable[Touch] = (), chunks: Iterable[Chunk] = ()
    ) -> int:
        """Make undelivered operations dirty again (unless superseded since). Returns how many."""
        return self.redirty_receipt(Receipt.of(items), touches, chunks)

    def redirty_receipt(
        self, receipt: Receipt, touches: Iterable[Touch] = (), chunks: Iterable[Chunk] = ()
    ) -> int:
        """:meth:`redirty` of what a :class:`Receipt` kept of the items."""
        count = 0
        upserts, deletes = receipt.upserts, receipt.deletes
        for start in range(0, len(upserts), _SLICE):
            if start:
                _let_writers_in()
            with self._lock:
                for ref, seq in upserts[start : start + _SLICE]:
                    entry = self._live.get(ref)
                    if entry is not None:  # else superseded by a delete of it or of an ancestor
                        count += self._redirty_key(ref, entry, seq)
        with self._lock:
            for item in deletes:
                count += self._redirty_delete(item)
            for touch in touches:
                count += self._redirty_touch(touch)
            count += self._redirty_chunks(list(chunks))
            self.counters["resynced"] += count
        return count

    def _redirty_delete(self, item: Item) -> int:
        entry = self._live.get(item.ref)
        if entry is None:
            # a lost delete is always sent again: the entry is gone only because something that
            # covers it was committed or superseded it, and applying it again changes nothing then
            entry = _Entry(
                item.kind, item.key[1], None, None, item.version, item.seq, True, item.tab_id, item.session_id
            )
            self._live[item.ref] = entry
            parent = _parent(item.ref, entry)
            if parent is not None:
                self._link(parent, item.ref)
        elif not entry.deleted and entry.version > item.version:
            # re-created since: the lost delete still has to go before the new state
            entry.pending_delete = max(entry.pending_delete or 0, item.version)
        return self._redirty_key(item.ref, entry, item.seq)

    def _redirty_key(self, key: Key, entry: _Entry, seq: int) -> int:
        seq = min(seq, entry.seq)
        current = self._dirty.get(key)
        if current is None and key in self._held:
            # still waiting for its route: it waits under the older of the two seqs
            if seq < self._held[key]:
                self._hold(key, seq)
            return 0
        if current is not None and current <= seq:
            return 0
        # Dirty again under the lost write's seq, even when the key was written again since (and
        # is dirty under that younger seq): a flush() waiting for the lost write must wait for
        # the resend. (_dirty stays in insertion order; _redirtied_min bounds what is out of it.)
        self._dirty[key] = seq
        self._redirtied.add(key)
        self._redirtied_min = seq if self._redirtied_min is None else min(self._redirtied_min, seq)
        self._track_route(key, entry)
        return 1 if current is None else 0

    def _redirty_touch(self, touch: Touch) -> int:
        ident = touch.session_id.int
        entry = self._live.get((SESSION, ident))
        if entry is None:
            if ident in self._touches:
                return 0  # a newer touch of it is pending
            self._touches[ident] = touch
            return 1
        if isinstance(entry.record, SessionRecord) and touch.last_active > entry.record.last_active:
            # held since: the record carries last_active now
            record = entry.record.model_copy(update={"last_active": touch.last_active})
            self._mark(entry, (SESSION, ident), record, None)
            return 1
        return 0

    def _redirty_chunks(self, chunks: list[Chunk]) -> int:
        return self._scrollback.restore(
            c for c in chunks if c.pane not in self._dropped and not self._superseded(c)
        )

    def _superseded(self, chunk: Chunk) -> bool:
        pane = self._live.get((PANE, chunk.pane))
        if pane is None:
            return chunk.pane in self._gone_panes  # deleted, and the delete committed
        return pane.deleted and pane.version > chunk.version

    def confirm(self, items: Iterable[Item]) -> None:
        """Operations committed: a delete that is still the latest state is forgotten."""
        self.confirm_deletes([item for item in items if item.deleted])

    def confirm_deletes(self, deletes: Iterable[Item]) -> None:
        """:meth:`confirm` of committed deletes (what a :class:`Receipt` keeps of them)."""
        with self._lock:
            for item in deletes:
                entry = self._live.get(item.ref)
                current = entry is not None and entry.deleted and entry.version == item.version
                unsent = item.ref in self._dirty or item.ref in self._held
                if current and entry is not None and not unsent:
                    self._forget(item.ref, entry)
            self._maybe_rearm()

    def observe_version(self, version: int) -> None:
        with self._lock:  # versions are issued under this lock (see __init__)
            self.clock.observe(version)

    # --- introspection --------------------------------------------------------------------------

    @property
    def seq(self) -> int:
        return self._seq

    def min_unsent_seq(self) -> int | None:
        """The oldest write not yet drained (or a lower bound of it), or None when nothing waits.

        Writes held for want of a route count: ``flush()`` is True only once they are committed.
        """
        with self._lock:
            candidates = []
            if self._dirty:
                candidates.append(next(iter(self._dirty.values())))
            if self._redirtied_min is not None:
                candidates.append(self._redirtied_min)
            if self._held_min is not None:
                candidates.append(self._held_min)
            if self._touches:
                candidates.append(min(t.seq for t in self._touches.values()))
            history = self._scrollback.min_seq()
            if history is not None:
                candidates.append(history)
            return min(candidates) if candidates else None

    def has_dirty(self) -> bool:
        """Something can be drained now (what waits for a route does not count: see ``unrouted``)."""
        return bool(self._dirty or self._touches or self._scrollback.has_ready() or self._routes_changed)

    def gauges(self) -> dict[str, int]:
        with self._lock:
            scrollback = self._scrollback
            return {
                "live_entities": self._live_count,
                "held_entries": len(self._live),
                "dirty": len(self._dirty) + len(self._held) + len(self._touches),
                "unrouted": len(self._held) + scrollback.parked,
                "pending_history_chunks": len(scrollback),
                "pending_history_bytes": scrollback.content_bytes,
                "pending_history_memory": scrollback.cost,
            }


def _let_writers_in() -> None:
    # A real sleep, however short, hands the interpreter lock to a thread waiting for it;
    # releasing the buffer's lock alone would not (the flusher would keep running).
    time.sleep(0.00002)


def _ref(kind: str, ident: Any) -> Key:
    """The buffer's key of an entity: ``(kind, UUID.int)``, or ``("template", name)``."""
    return (kind, ident) if kind == TEMPLATE else (kind, ident.int)


def _same(a: UUID | None, b: UUID | None) -> bool:
    """``a == b`` for UUIDs without UUID.__eq__ (Python code) in the common case."""
    return a is b or (a is not None and b is not None and a.int == b.int)


def _parent(key: Key, entry: _Entry) -> int | None:
    """The parent an entry is linked under: a tab's session, a pane's tab (as ``UUID.int``)."""
    kind = key[0]
    if kind == TAB:
        return None if entry.session_id is None else entry.session_id.int
    if kind == PANE:
        return None if entry.tab_id is None else entry.tab_id.int
    return None
