"""The buffer's entries: what each write, delete, resend and commit does to them.

A part of the buffer (:mod:`perth_pipeline.buffer`), kept apart because its rules are its own:

* **One entry per entity, holding its latest state whole** (or its delete): a write replaces the
  record and takes a new version and seq, and marks the key dirty (see :mod:`perth_pipeline.dirty`),
  so that what goes out is always the current state.
* **A delete supersedes everything under it.** It replaces the entry with a tombstone and drops
  what is buffered below it (through the parent index, :mod:`perth_pipeline.routes`), counted as
  superseded. An entity created again before its delete was sent keeps that delete
  (``pending_delete``), sent first: its cascade must not be lost to the new incarnation, which may
  live under another parent the cascade does not reach.
* **A delete is forgotten only once it is committed** and no later write of the key waits; a
  delete lost in delivery is created again even when its entry is gone (something covering it was
  committed, or superseded it: applying it again changes nothing then).
* **Every live entry holds a slot** of the entity bound (:mod:`perth_pipeline.admission`): taken
  when one is created or created again, given back when it is deleted or forgotten.
* **An entity keeps its parent.** A tab cannot move to another session, nor a pane to another
  tab (refused, counted invalid): the parent index and a delete's cascade rely on it.
* **A session's ``last_active`` only grows** where it is stored (a max register): a write or a
  touch never lowers it, so what is stored does not depend on coalescing. A touch of a session
  the buffer does not hold waits apart (:mod:`perth_pipeline.touches`); its delete makes it moot.

The seq (write order, shared with touches and chunks) is issued here, the version by the
buffer's clock. No lock of its own: every method runs under the buffer's lock.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from .admission import Admission
from .clock import HybridClock
from .dirty import DirtyMap
from .entries import PANE, SESSION, TAB, TEMPLATE, Entry, Item, Key, Record, Touch, parent_of, same
from .errors import InvalidRecord
from .records import PaneRecord, SessionRecord, TabRecord, TemplateRecord
from .routes import RouteIndex
from .scrollback import Chunk
from .touches import PendingTouches

__all__ = ["EntryTable"]


class EntryTable:
    """The entries by key and the seq. Runs under the buffer's lock (none of its own).

    ``live`` is the buffer's table of entries (shared with admission and routes, which read it);
    only this class adds to it or takes from it. ``counters`` are the buffer's; a write's
    ``submitted`` is counted here where the admission does not count it.
    """

    def __init__(
        self,
        live: dict[Key, Entry],
        clock: HybridClock,
        counters: dict[str, int],
        *,
        admission: Admission,
        routes: RouteIndex,
        dirty: DirtyMap,
        touches: PendingTouches,
    ) -> None:
        self.live = live
        self._clock = clock
        self._counters = counters
        self._admission = admission
        self._routes = routes
        self._dirty = dirty
        self._dirty_seqs = dirty.seqs  # never rebound (see DirtyMap): read once, for mark()
        self._touches = touches
        # the last seq issued (write order); the buffer's append_history issues one inline
        self.seq = 0

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    # --- writes -------------------------------------------------------------------------------

    def put_session(self, record: SessionRecord) -> None:
        ident = record.id.int
        key = (SESSION, ident)
        entry = self.live.get(key)
        if not self._admission.admit(entry, ident, None):
            return
        if entry is not None and isinstance(entry.record, SessionRecord):
            held = entry.record.last_active
            if held > record.last_active:
                record = record.model_copy(update={"last_active": held})  # a max register
        self.store(key, entry, record, None, session_id=record.id, tab_id=None)

    def put_tab(self, record: TabRecord, snapshot: Any) -> None:
        session_id = record.session_id
        key = (TAB, record.id.int)
        entry = self.live.get(key)
        if entry is not None and not entry.deleted:
            if not same(entry.session_id, session_id):
                self._counters["invalid"] += 1
                raise InvalidRecord("session_id", "a tab cannot move to another session")
            self._counters["submitted"] += 1  # an update of a tab it holds
            self.mark(entry, key, record, snapshot)
            return
        if not self._admission.admit(entry, key[1], session_id.int):
            return
        self.store(key, entry, record, snapshot, session_id=session_id, tab_id=None)
        self._routes.created(TAB, key[1])

    def put_pane(self, key: Key, entry: Entry | None, record: PaneRecord, snapshot: Any) -> None:
        """A write of a pane held as ``entry``: an update, or a creation, stored with its route.

        (The buffer marks the common case itself, an update of a pane held with its session and
        the same tab: the terminal's hottest call.)
        """
        tab_id = record.tab_id
        if entry is not None and not entry.deleted:
            held = entry.tab_id
            if held is not tab_id and (held is None or held.int != tab_id.int):
                self._counters["invalid"] += 1
                raise InvalidRecord(
                    "tab_id", "a pane cannot move to another tab (delete it and create a new one)"
                )
            if entry.session_id is not None:  # an update of a pane it holds
                self._counters["submitted"] += 1
                self.mark(entry, key, record, snapshot)
                return
        tab = tab_id.int
        if not self._admission.admit(entry, key[1], tab):
            return
        routes = self._routes
        session_id = routes.session_of_tab(tab)
        self.store(key, entry, record, snapshot, session_id=session_id, tab_id=tab_id)
        routes.created(PANE, key[1])
        if session_id is not None:
            routes.link_foreign_tab(tab, session_id.int)

    def put_template(self, record: TemplateRecord, snapshot: Any) -> None:
        key = (TEMPLATE, record.name)
        entry = self.live.get(key)
        if self._admission.admit(entry, None, None):
            self.store(key, entry, record, snapshot, session_id=None, tab_id=None)

    def store(
        self,
        key: Key,
        entry: Entry | None,
        record: Record,
        snapshot: Any,
        *,
        session_id: UUID | None,
        tab_id: UUID | None,
    ) -> None:
        """A write that may create the entity (again), with its ancestors. Admitted already."""
        if entry is None:
            ident = record.name if isinstance(record, TemplateRecord) else record.id
            entry = Entry(key[0], ident, record, snapshot, 0, 0)
            self.live[key] = entry
            self._admission.occupy()
        elif entry.deleted:
            if self._dirty.unsent(key):
                # re-created before its delete was sent: the delete still goes, first, so that
                # its cascade (what was written under the old one) is not lost
                entry.pending_delete = entry.version
            entry.deleted = False
            self._admission.occupy()
        old_parent = parent_of(key, entry)
        entry.session_id, entry.tab_id = session_id, tab_id
        self._routes.placed(key, entry, old_parent)
        self.mark(entry, key, record, snapshot)

    def mark(self, entry: Entry, key: Key, record: Record, snapshot: Any) -> None:
        """A write of an entity the buffer holds (live): its new state, dirty."""
        # The terminal's hottest path (an update of a pane it holds): DirtyMap.add and
        # RouteIndex.track inlined.
        self.seq = seq = self.seq + 1
        entry.record, entry.snapshot = record, snapshot
        entry.version, entry.seq = self._clock.next_unlocked(), seq
        dirty, routes = self._dirty_seqs, self._routes
        held, unrouted = routes.held, routes.unrouted
        if key in dirty or (held and key in held):
            # coalesced: it keeps the seq of its oldest unsent write (flush() waits for that one)
            self._counters["coalesced"] += 1
        else:
            dirty[key] = seq
        if entry.session_id is None and key[0] in (TAB, PANE):
            unrouted.add(key)
        elif unrouted:
            unrouted.discard(key)

    def touch_session(self, session_id: UUID, now: datetime) -> None:
        key = (SESSION, session_id.int)
        entry = self.live.get(key)
        if entry is None:
            self._touches.add(session_id, now, self.next_seq)
        elif isinstance(record := entry.record, SessionRecord):  # (deleted: touching it changes nothing)
            if now > record.last_active:
                record = record.model_copy(update={"last_active": now})
            self.mark(entry, key, record, None)

    def delete(self, key: Key, entity_id: Any) -> set[int]:
        """A delete of an entity (``key`` is its :func:`~perth_pipeline.entries.ref`).

        Returns the panes it takes with it (their pending scrollback is moot).
        """
        kind, ident = key
        self._counters["submitted"] += 1
        entry = self.live.get(key)
        if not self._admission.admit_delete(entry is not None):
            return set()
        seq = self.next_seq()
        version = self._clock.next_unlocked()
        if entry is None:
            tab_id, session_id = self._routes.route_unknown(kind, entity_id)
            entry = self._tombstone(
                key, kind, entity_id, version=version, seq=seq, tab_id=tab_id, session_id=session_id
            )
        else:
            if not entry.deleted:
                self._admission.release()
            entry.record, entry.snapshot, entry.deleted = None, None, True
            entry.version, entry.seq = version, seq
            # An earlier unsent delete (pending_delete) is covered by this one, which is
            # higher, but stays marked: it may be of an incarnation under another parent,
            # whose cascade must not make this delete look superseded (see _drop_child).
        self._dirty.add(key, entry, seq)
        if kind == TEMPLATE:
            return set()
        self._admission.deleted(ident)
        route = (entry.tab_id, entry.session_id)
        doomed = self._routes.cascade(ident, kind, route, self._drop_child)
        if kind == SESSION:
            self._touches.discard(ident)
        return doomed

    def _tombstone(
        self,
        key: Key,
        kind: str,
        ident: Any,
        *,
        version: int,
        seq: int,
        tab_id: UUID | None,
        session_id: UUID | None,
    ) -> Entry:
        """The delete of an entity the buffer does not hold, linked under its parent."""
        entry = Entry(kind, ident, None, None, version, seq, True, tab_id, session_id)
        self.live[key] = entry
        parent = parent_of(key, entry)
        if parent is not None:
            self._routes.link(parent, key)
        return entry

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
            self._counters["superseded"] += 1
            return
        del self.live[key]
        if not child.deleted:
            self._admission.release()
        if self._dirty.discard(key):
            self._counters["superseded"] += 1

    # --- resends and commits ------------------------------------------------------------------

    def restore_delete(self, item: Item) -> int:
        """A delete lost in delivery: dirty again (created again if gone). Returns 1 if it was not dirty."""
        entry = self.live.get(item.ref)
        if entry is None:
            # a lost delete is always sent again: the entry is gone only because something that
            # covers it was committed or superseded it, and applying it again changes nothing then
            entry = self._tombstone(
                item.ref,
                item.kind,
                item.key[1],
                version=item.version,
                seq=item.seq,
                tab_id=item.tab_id,
                session_id=item.session_id,
            )
        elif not entry.deleted and entry.version > item.version:
            # re-created since: the lost delete still has to go before the new state
            entry.pending_delete = max(entry.pending_delete or 0, item.version)
        return self._dirty.redirty(item.ref, entry, item.seq)

    def restore_touch(self, touch: Touch) -> int:
        """A touch lost in delivery: pending again, or folded into the session held since."""
        key = (SESSION, touch.session_id.int)
        entry = self.live.get(key)
        if entry is None:
            return self._touches.restore(touch)
        if isinstance(entry.record, SessionRecord) and touch.last_active > entry.record.last_active:
            record = entry.record.model_copy(update={"last_active": touch.last_active})
            self.mark(entry, key, record, None)  # held since: the record carries it now
            return 1
        return 0

    def confirm_delete(self, item: Item) -> None:
        """A delete committed: forgotten if it is still the latest state and nothing of it waits."""
        entry = self.live.get(item.ref)
        current = entry is not None and entry.deleted and entry.version == item.version
        if current and entry is not None and not self._dirty.unsent(item.ref):
            self._forget(item.ref, entry)

    def _forget(self, key: Key, entry: Entry) -> None:
        """Remove an entry for good (its delete committed)."""
        del self.live[key]
        self._routes.removed(key, entry)
        if not entry.deleted:
            self._admission.release()

    def chunk_superseded(self, chunk: Chunk) -> bool:
        """Whether a chunk's pane was deleted after it was written."""
        pane = self.live.get((PANE, chunk.pane))
        if pane is None:
            return self._routes.is_gone(chunk.pane)  # deleted, and the delete committed
        return pane.deleted and pane.version > chunk.version
