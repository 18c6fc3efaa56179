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

:class:`Buffer` is the facade, and keeps the entries, the dirty keys and the drain and
resend of them. Its parts with rules of their own live beside it, each without a lock of
its own (they run under the buffer's): :mod:`~perth_pipeline.admission` (the entity bound),
:mod:`~perth_pipeline.routes` (the parent index, learnt routes, writes held for want of a
route), :mod:`~perth_pipeline.scrollback` (pending chunks, bounded in bytes), and
:mod:`~perth_pipeline.entries` (the shapes they share, and what a drain hands out).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from itertools import islice
from typing import Any
from uuid import UUID

from .admission import Admission
from .clock import HybridClock
from .entries import (
    PANE,
    SESSION,
    TAB,
    TEMPLATE,
    Drained,
    Entry,
    Item,
    Key,
    Receipt,
    Record,
    Touch,
    parent_of,
    ref,
    same,
)
from .errors import InvalidRecord
from .masking import masked_logger
from .records import PaneHistoryChunk, PaneRecord, SessionRecord, TabRecord, TemplateRecord
from .routes import RouteIndex
from .scrollback import Chunk, Scrollback
from .validation import copy_json, verify_chunk, verify_pane, verify_session, verify_tab, verify_template

__all__ = ["PANE", "SESSION", "TAB", "TEMPLATE", "Buffer", "Chunk", "Drained", "Item", "Receipt", "Touch"]

logger = masked_logger("perth_pipeline.buffer")

#: Keys the flusher takes (or gives back) under the lock at a time; between two slices it
#: lets the terminal's threads in (about 0.1 to 0.3 ms of work per slice).
_SLICE = 128


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
        self._live: dict[Key, Entry] = {}
        # key -> seq of the oldest write of it not yet drained. A write appends a key with a new
        # (highest) seq, so those keys are in seq order; keys given back by redirty() come with
        # older seqs and are tracked apart, so that the oldest unsent write is known in O(1).
        self._dirty: dict[Key, int] = {}
        self._redirtied: set[Key] = set()
        self._redirtied_min: int | None = None  # a lower bound of the seqs in _redirtied
        self._touches: dict[int, Touch] = {}  # session id (int) -> its pending touch
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
        self._admission = Admission(self._live, max_entities, self.counters)
        # the parent index, learnt routes, and the dirty keys held for want of a route
        self._routes = RouteIndex(self._live, max_entities)
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
            if self._admission.warning is not None:
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
                    if not same(entry.session_id, session_id):
                        self.counters["invalid"] += 1
                        raise InvalidRecord("session_id", "a tab cannot move to another session")
                    self.counters["submitted"] += 1  # an update of a tab it holds
                    self._mark(entry, key, record, snapshot)
                    return
                if not self._admit(entry, key[1], session_id.int):
                    return
                self._store(key, entry, record, snapshot, session_id=session_id, tab_id=None)
                self._routes.created(TAB, key[1])
        finally:
            if self._admission.warning is not None:
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
                routes = self._routes
                session_id = routes.session_of_tab(tab)
                self._store(key, entry, record, snapshot, session_id=session_id, tab_id=tab_id)
                routes.created(PANE, key[1])
                if session_id is not None:
                    routes.link_foreign_tab(tab, session_id.int)
        finally:
            if self._admission.warning is not None:
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
            if self._admission.warning is not None:
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
        key = ref(kind, entity_id)
        ident = key[1]
        try:
            with self._lock:
                self.counters["submitted"] += 1
                entry = self._live.get(key)
                if not self._admission.admit_delete(entry is not None):
                    return
                self._seq += 1
                version = self.clock.next_unlocked()
                if entry is None:
                    tab_id, session_id = self._routes.route_unknown(kind, entity_id)
                    entry = Entry(kind, entity_id, None, None, version, self._seq, True, tab_id, session_id)
                    self._live[key] = entry
                    parent = parent_of(key, entry)
                    if parent is not None:
                        self._routes.link(parent, key)
                else:
                    if not entry.deleted:
                        self._admission.release()
                    entry.record, entry.snapshot, entry.deleted = None, None, True
                    entry.version, entry.seq = version, self._seq
                    # An earlier unsent delete (pending_delete) is covered by this one, which is
                    # higher, but stays marked: it may be of an incarnation under another parent,
                    # whose cascade must not make this delete look superseded (see _drop_child).
                self._make_dirty(key, entry, self._seq)
                if kind != TEMPLATE:
                    self._admission.deleted(ident)
                    route = (entry.tab_id, entry.session_id)
                    doomed = self._routes.cascade(ident, kind, route, self._drop_child)
                    if doomed:
                        self._scrollback.drop_panes(doomed)
                if kind == SESSION:
                    self._touches.pop(ident, None)
        finally:
            if self._admission.warning is not None:
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
            if not self._admission.admit_chunk(pane, size):
                return
            if self._routes.is_gone(pane):
                # the pane's last output, drained after the terminal deleted it: moot, not held
                self.counters["superseded"] += 1
                return
            self._seq += 1
            tab_id, session_id = self._routes.route_of_pane(pane)
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

    def _admit(self, entry: Entry | None, entity_id: int | None, parent_id: int | None) -> bool:
        return self._admission.admit(entry, entity_id, parent_id)

    def _log_full(self) -> None:
        with self._lock:
            extra = self._admission.take_warning()
        if extra is not None:
            logger.warning(
                "persistence buffer full: new entities, and what is written under them, are dropped "
                "(counted in stats()['dropped_entities']) until the buffer drains",
                extra=extra,
            )

    def _store(
        self,
        key: Key,
        entry: Entry | None,
        record: Record,
        snapshot: Any,
        *,
        session_id: UUID | None,
        tab_id: UUID | None,
    ) -> None:
        if entry is None:
            ident = record.name if isinstance(record, TemplateRecord) else record.id
            entry = Entry(key[0], ident, record, snapshot, 0, 0)
            self._live[key] = entry
            self._admission.occupy()
        elif entry.deleted:
            if key in self._dirty or key in self._routes.held:
                # re-created before its delete was sent: the delete still goes, first, so that
                # its cascade (what was written under the old one) is not lost
                entry.pending_delete = entry.version
            entry.deleted = False
            self._admission.occupy()
        old_parent = parent_of(key, entry)
        entry.session_id, entry.tab_id = session_id, tab_id
        self._routes.placed(key, entry, old_parent)
        self._mark(entry, key, record, snapshot)

    def _mark(self, entry: Entry, key: Key, record: Record, snapshot: Any) -> None:
        self._seq = seq = self._seq + 1
        entry.record, entry.snapshot = record, snapshot
        entry.version, entry.seq = self.clock.next_unlocked(), seq
        dirty, routes = self._dirty, self._routes
        held, unrouted = routes.held, routes.unrouted
        if key in dirty or (held and key in held):
            # coalesced: it keeps the seq of its oldest unsent write (flush() waits for that one)
            self.counters["coalesced"] += 1
        else:
            dirty[key] = seq
        if entry.session_id is None and key[0] in (TAB, PANE):
            unrouted.add(key)
        elif unrouted:
            unrouted.discard(key)

    def _make_dirty(self, key: Key, entry: Entry, seq: int) -> None:
        if key in self._dirty or key in self._routes.held:
            # coalesced: it keeps the seq of its oldest unsent write (flush() waits for that one)
            self.counters["coalesced"] += 1
        else:
            self._dirty[key] = seq
        self._routes.track(key, entry)

    def _undirty(self, key: Key) -> bool:
        if self._dirty.pop(key, None) is None:
            return self._routes.unhold(key)
        self._routes.unrouted.discard(key)
        if key in self._redirtied:
            self._redirtied.discard(key)
            if not self._redirtied:
                self._redirtied_min = None
        return True

    def _forget(self, key: Key, entry: Entry) -> None:
        """Remove an entry for good (its delete committed, or dropped)."""
        del self._live[key]
        self._routes.removed(key, entry)
        if not entry.deleted:
            self._admission.release()

    def _drop_child(self, key: Key, child: Entry) -> None:
        if child.pending_delete is not None:
            # the unsent delete of an earlier incarnation (perhaps under another parent, which
            # this cascade does not reach) still has to go: keep it, as a delete, dirty; the new
            # incarnation (or its own delete) is superseded
            if not child.deleted:
                self._admission.release()
                child.version = child.pending_delete
            child.record, child.snapshot, child.deleted = None, None, True
            child.pending_delete = None
            self.counters["superseded"] += 1
            return
        del self._live[key]
        if not child.deleted:
            self._admission.release()
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
        if self._routes.changed:
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
                routes = self._routes
                out.chunks = self._scrollback.take(budget, routes.route_of_pane, routes.is_gone)
        return out

    def _drain_items(self, out: Drained, budget: int) -> tuple[int, int]:
        """Take up to ``budget`` dirty keys into ``out``, looking at ``_SLICE`` at most: (taken, looked).

        (Under the lock.) A key found unroutable is moved to the held keys, out of every later
        drain's way, so a drain's work stays proportional to what was written since the last.
        """
        taken: list[Key] = []
        held: list[Key] = []
        items = out.items
        live, routes = self._live, self._routes
        unrouted = routes.unrouted
        for key, seq in self._dirty.items():
            if len(taken) >= budget or len(taken) + len(held) >= _SLICE:
                break
            entry = live.get(key)
            if entry is None:
                taken.append(key)
                continue
            if unrouted and key in unrouted and not routes.routed(key, entry):
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
            routes.hold(key, pop(key))
        if unrouted:
            unrouted.difference_update(taken)
            unrouted.difference_update(held)
        if self._redirtied:
            self._redirtied.difference_update(taken)
            self._redirtied.difference_update(held)
            if not self._redirtied:
                self._redirtied_min = None
        return len(taken), len(taken) + len(held)

    def _release_held(self) -> None:
        """Back to the dirty keys (and the parked chunks back in line): what is routable now."""
        routes = self._routes
        with self._lock:
            routes.changed = False
            self._scrollback.release(routes.route_of_pane, routes.is_gone)
            keys = list(routes.held)
        for start in range(0, len(keys), _SLICE):
            if start:
                _let_writers_in()
            with self._lock:
                for key, entry, seq in routes.release(keys[start : start + _SLICE]):
                    self._redirty_key(key, entry, seq)

    def unrouted(self) -> tuple[list[UUID], list[UUID]]:
        """Tab ids whose session, and pane ids whose tab and session, the buffer does not know.

        What waits for them (held tabs and panes, parked chunks) stays in memory, dirty, until
        :meth:`learn_routes` tells: a delay is never a loss.
        """
        self._release_held()
        with self._lock:
            return self._routes.missing(self._scrollback.parked_panes())

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
            self._routes.learn(tabs or {}, panes or {})

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
            entry = Entry(
                item.kind, item.key[1], None, None, item.version, item.seq, True, item.tab_id, item.session_id
            )
            self._live[item.ref] = entry
            parent = parent_of(item.ref, entry)
            if parent is not None:
                self._routes.link(parent, item.ref)
        elif not entry.deleted and entry.version > item.version:
            # re-created since: the lost delete still has to go before the new state
            entry.pending_delete = max(entry.pending_delete or 0, item.version)
        return self._redirty_key(item.ref, entry, item.seq)

    def _redirty_key(self, key: Key, entry: Entry, seq: int) -> int:
        seq = min(seq, entry.seq)
        current = self._dirty.get(key)
        if current is None and self._routes.rehold(key, seq):
            return 0  # still waiting for its route: it waits under the older of the two seqs
        if current is not None and current <= seq:
            return 0
        # Dirty again under the lost write's seq, even when the key was written again since (and
        # is dirty under that younger seq): a flush() waiting for the lost write must wait for
        # the resend. (_dirty stays in insertion order; _redirtied_min bounds what is out of it.)
        self._dirty[key] = seq
        self._redirtied.add(key)
        self._redirtied_min = seq if self._redirtied_min is None else min(self._redirtied_min, seq)
        self._routes.track(key, entry)
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
            c for c in chunks if not self._admission.is_dropped(c.pane) and not self._superseded(c)
        )

    def _superseded(self, chunk: Chunk) -> bool:
        pane = self._live.get((PANE, chunk.pane))
        if pane is None:
            return self._routes.is_gone(chunk.pane)  # deleted, and the delete committed
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
                unsent = item.ref in self._dirty or item.ref in self._routes.held
                if current and entry is not None and not unsent:
                    self._forget(item.ref, entry)
            self._admission.rearm()

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
            if self._routes.held_min is not None:
                candidates.append(self._routes.held_min)
            if self._touches:
                candidates.append(min(t.seq for t in self._touches.values()))
            history = self._scrollback.min_seq()
            if history is not None:
                candidates.append(history)
            return min(candidates) if candidates else None

    def has_dirty(self) -> bool:
        """Something can be drained now (what waits for a route does not count: see ``unrouted``)."""
        return bool(self._dirty or self._touches or self._scrollback.has_ready() or self._routes.changed)

    def gauges(self) -> dict[str, int]:
        with self._lock:
            scrollback, held = self._scrollback, self._routes.held
            return {
                "live_entities": self._admission.live_count,
                "held_entries": len(self._live),
                "dirty": len(self._dirty) + len(held) + len(self._touches),
                "unrouted": len(held) + scrollback.parked,
                "pending_history_chunks": len(scrollback),
                "pending_history_bytes": scrollback.content_bytes,
                "pending_history_memory": scrollback.cost,
            }


def _let_writers_in() -> None:
    # A real sleep, however short, hands the interpreter lock to a thread waiting for it;
    # releasing the buffer's lock alone would not (the flusher would keep running).
    time.sleep(0.00002)
