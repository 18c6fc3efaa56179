"""The coalescing write-behind buffer. No I/O happens here.

The buffer holds the latest state of every live entity (sessions, tabs, panes;
templates by name) as a full record, a set of dirty keys waiting to be sent, and
the scrollback chunks waiting to be sent. Write calls run in the terminal's
threads and only touch dicts under one short lock; the flusher thread drains
dirty state from here and gives back what it could not deliver.

Rules kept here (docs/design.md, rules 2 and 3):

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

:class:`Buffer` is the facade: the lock, the write calls (a record is checked and copied
before the lock is taken, by :class:`~perth_pipeline.validation.Intake`), and the drain and
resend, a slice at a time. Its parts with rules of their own live beside it, each without a
lock of its own (they run under the buffer's):
:mod:`~perth_pipeline.table` (the entries: what a write, delete, resend or commit does to them),
:mod:`~perth_pipeline.dirty` (the keys waiting to be drained, in write order),
:mod:`~perth_pipeline.touches` (touches of sessions it does not hold),
:mod:`~perth_pipeline.admission` (the entity bound), :mod:`~perth_pipeline.routes` (the parent
index, learnt routes, writes held for want of a route), :mod:`~perth_pipeline.scrollback`
(pending chunks, bounded in bytes), and :mod:`~perth_pipeline.entries` (the shapes they share,
and what a drain hands out).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any
from uuid import UUID

from .admission import Admission
from .clock import HybridClock
from .dirty import SLICE, DirtyMap
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
    Touch,
    ref,
)
from .errors import InvalidRecord
from .masking import masked_logger
from .records import PaneHistoryChunk, PaneRecord, SessionRecord, TabRecord, TemplateRecord
from .routes import RouteIndex
from .scrollback import Chunk, Scrollback
from .table import EntryTable
from .touches import PendingTouches
from .validation import Intake, verify_pane, verify_session, verify_tab, verify_template

__all__ = ["PANE", "SESSION", "TAB", "TEMPLATE", "Buffer", "Chunk", "Drained", "Item", "Receipt", "Touch"]

logger = masked_logger("perth_pipeline.buffer")

#: What :attr:`Buffer.counters` counts (``stats()`` reports them).
COUNTERS = (
    "submitted",
    "coalesced",
    "invalid",
    "dropped_entities",
    "dropped_chunks",
    "dropped_chunk_bytes",
    "superseded",
    "resynced",
)


class Buffer:
    """Latest state per live entity, dirty keys, pending scrollback. Thread-safe.

    Every method takes one short lock and does work proportional to what it is given
    (one record, one drained batch), never to what the buffer holds, so that a write
    call stays in microseconds even with a quarter of a million dirty entities behind an
    outage. (Inside, entities are keyed by ints, not UUIDs: see :mod:`perth_pipeline.entries`.)
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
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._intake = Intake(
            max_json_bytes=max_json_bytes, max_chunk_bytes=max_chunk_bytes, count_invalid=self.count_invalid
        )
        # the parts (see the module's docstring) share the table of entries; only the table changes it
        self._live: dict[Key, Entry] = {}
        self._admission = Admission(self._live, max_entities, self.counters)
        self._routes = RouteIndex(self._live, max_entities)
        self._scrollback = Scrollback(max_pending_history_bytes, self.counters)
        self._dirty = DirtyMap(self._routes, self.counters)
        self._touches = PendingTouches(max_entities, self.clock, self.counters)
        self._table = EntryTable(
            self._live,
            self.clock,
            self.counters,
            admission=self._admission,
            routes=self._routes,
            dirty=self._dirty,
            touches=self._touches,
        )

    # --- write side (caller's thread) ---------------------------------------------------

    def put_session(self, record: SessionRecord) -> None:
        self._intake.accept(record, SessionRecord, "session", verify_session)
        self._write(self._table.put_session, record)

    def put_tab(self, record: TabRecord) -> None:
        self._intake.accept(record, TabRecord, "tab", verify_tab)
        self._write(self._table.put_tab, record, self._intake.copy(record.layout_blob, "layout_blob"))

    def put_pane(self, record: PaneRecord) -> None:
        # The terminal's hottest call (a title or a scroll position changed): an update of a
        # pane it holds is one look-up and a few assignments under the lock.
        if type(record) is not PaneRecord:
            self._intake.refuse_type(record, PaneRecord, "pane")
        fields = record.__dict__
        try:
            verify_pane(record, fields)
        except InvalidRecord:
            self.count_invalid()
            raise
        snapshot = self._intake.copy(fields["component_state"], "component_state")
        tab_id = fields["tab_id"]
        key = (PANE, fields["id"].int)
        try:
            with self._lock:
                entry = self._live.get(key)
                # the common case, an update of a pane held with its route (and its tab), is marked
                # here; anything else (a creation, a refused move, a route to find) is the table's
                if entry is not None and entry.session_id is not None and not entry.deleted:
                    held = entry.tab_id
                    if held is tab_id or (held is not None and held.int == tab_id.int):
                        self.counters["submitted"] += 1
                        self._table.mark(entry, key, record, snapshot)
                        return
                self._table.put_pane(key, entry, record, snapshot)
        finally:
            if self._admission.warning is not None:
                self._log_full()

    def put_template(self, record: TemplateRecord) -> None:
        self._intake.accept(record, TemplateRecord, "template", verify_template)
        self._write(self._table.put_template, record, self._intake.copy(record.definition, "definition"))

    def touch_session(self, session_id: UUID, now: datetime) -> None:
        with self._lock:
            self.counters["submitted"] += 1
            self._table.touch_session(session_id, now)

    def delete(self, kind: str, entity_id: Any) -> None:
        key = ref(kind, entity_id)
        try:
            with self._lock:
                doomed = self._table.delete(key, entity_id)
                if doomed:
                    self._scrollback.drop_panes(doomed)
        finally:
            if self._admission.warning is not None:
                self._log_full()

    def append_history(self, chunk: PaneHistoryChunk) -> None:
        size = self._intake.accept_chunk(chunk)
        pane = chunk.pane_id.int
        with self._lock:
            self.counters["submitted"] += 1
            if not self._admission.admit_chunk(pane, size):
                return
            if self._routes.is_gone(pane):
                # the pane's last output, drained after the terminal deleted it: moot, not held
                self.counters["superseded"] += 1
                return
            table = self._table
            table.seq = seq = table.seq + 1  # (table.next_seq(), inlined: output is a hot path)
            tab_id, session_id = self._routes.route_of_pane(pane)
            self._scrollback.append(Chunk(chunk, pane, self.clock.next_unlocked(), seq, tab_id, session_id))

    def count_invalid(self) -> None:
        with self._lock:
            self.counters["invalid"] += 1

    def _write(self, write: Callable[..., None], *args: Any) -> None:
        """One write of the table's under the lock; the entity bound's warning logged after, if noted."""
        try:
            with self._lock:
                write(*args)
        finally:
            if self._admission.warning is not None:
                self._log_full()

    def _log_full(self) -> None:
        with self._lock:
            extra = self._admission.take_warning()
        if extra is not None:
            logger.warning(
                "persistence buffer full: new entities, and what is written under them, are dropped "
                "(counted in stats()['dropped_entities']) until the buffer drains",
                extra=extra,
            )

    # --- flusher side -----------------------------------------------------------------------

    def drain(self, max_items: int) -> Drained:
        """Take up to ``max_items`` dirty operations (oldest first), leaving the rest dirty.

        Items whose ancestors are still unknown are held apart, dirty, until their route is
        learnt (see :meth:`unrouted`); one pane's unroutable chunks are parked without holding
        back any other's. The lock is taken for ``SLICE`` keys at a time, and the interpreter
        lock is let go between slices, so that a write call never waits for a whole drain.
        """
        out = Drained()
        budget = max_items
        if self._routes.changed:
            self._release_held()
        with self._lock:
            if self._touches and budget > 0:
                out.touches = self._touches.take(budget)
                budget -= len(out.touches)
        while budget > 0 and self._dirty:
            with self._lock:
                taken, looked = self._dirty.take(out, budget, self._live)
            budget -= taken
            if looked < SLICE:
                break
            _let_writers_in()
        if budget > 0 and self._scrollback:
            with self._lock:
                routes = self._routes
                out.chunks = self._scrollback.take(budget, routes.route_of_pane, routes.is_gone)
        return out

    def _release_held(self) -> None:
        """Back to the dirty keys (and the parked chunks back in line): what is routable now."""
        routes = self._routes
        with self._lock:
            routes.changed = False
            self._scrollback.release(routes.route_of_pane, routes.is_gone)
            keys = list(routes.held)
        for start in range(0, len(keys), SLICE):
            if start:
                _let_writers_in()
            with self._lock:
                for key, entry, seq in routes.release(keys[start : start + SLICE]):
                    self._dirty.redirty(key, entry, seq)

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
        for start in range(0, len(upserts), SLICE):
            if start:
                _let_writers_in()
            with self._lock:
                for ref, seq in upserts[start : start + SLICE]:
                    entry = self._live.get(ref)
                    if entry is not None:  # else superseded by a delete of it or of an ancestor
                        count += self._dirty.redirty(ref, entry, seq)
        with self._lock:
            for item in deletes:
                count += self._table.restore_delete(item)
            for touch in touches:
                count += self._table.restore_touch(touch)
            dropped, superseded = self._admission.is_dropped, self._table.chunk_superseded
            count += self._scrollback.restore(c for c in chunks if not dropped(c.pane) and not superseded(c))
            self.counters["resynced"] += count
        return count

    def confirm(self, items: Iterable[Item]) -> None:
        """Operations committed: a delete that is still the latest state is forgotten."""
        self.confirm_deletes([item for item in items if item.deleted])

    def confirm_deletes(self, deletes: Iterable[Item]) -> None:
        """:meth:`confirm` of committed deletes (what a :class:`Receipt` keeps of them)."""
        with self._lock:
            for item in deletes:
                self._table.confirm_delete(item)
            self._admission.rearm()

    def observe_version(self, version: int) -> None:
        with self._lock:  # versions are issued under this lock (see __init__)
            self.clock.observe(version)

    # --- introspection --------------------------------------------------------------------------

    @property
    def seq(self) -> int:
        return self._table.seq

    def min_unsent_seq(self) -> int | None:
        """The oldest write not yet drained (or a lower bound of it), or None when nothing waits.

        Writes held for want of a route count: ``flush()`` is True only once they are committed.
        """
        with self._lock:
            candidates = (
                self._dirty.min_seq(),
                self._routes.held_min,
                self._touches.min_seq(),
                self._scrollback.min_seq(),
            )
            return min((seq for seq in candidates if seq is not None), default=None)

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
