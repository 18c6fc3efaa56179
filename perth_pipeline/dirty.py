"""The keys written since they were last drained: their order, the drain, the resend.

A part of the buffer (:mod:`perth_pipeline.buffer`), kept apart because its rules are its own:

* **One operation per key per drain.** A key is dirty at most once, under the seq of its oldest
  write not yet drained: repeated writes between two drains coalesce (counted), and ``flush()``
  waits for that oldest write. A drain hands out the entry's current state, never an old one.
* **The oldest unsent write is known in O(1).** A write appends its key with a new (highest)
  seq, so the map is in seq order and its first value is its minimum. Keys given back after a
  failed delivery come with older seqs, out of that order: they are tracked apart, with a lower
  bound of their seqs, so a write call never pays for a scan.
* **A lost write is dirty again under its own seq**, even when its key was written again since
  (and is dirty under that younger seq): a ``flush()`` waiting for the lost write waits for the
  resend. A key still held for want of a route (see :mod:`perth_pipeline.routes`) waits there,
  under the older of the two seqs.
* **A drain's work is proportional to what was written since the last**, never to what the
  buffer holds: a key found unroutable is moved to the held keys, out of every later drain's way,
  and a drain looks at :data:`SLICE` keys at a time so the buffer's lock is let go between slices.

No lock of its own: every method runs under the buffer's lock.
"""

from __future__ import annotations

from .entries import Drained, Entry, Item, Key
from .routes import RouteIndex

__all__ = ["SLICE", "DirtyMap"]

#: Keys the flusher takes (or gives back) under the lock at a time; between two slices it
#: lets the terminal's threads in (about 0.1 to 0.3 ms of work per slice).
SLICE = 128


class DirtyMap:
    """Dirty keys in seq order, and those given back out of it. Runs under the buffer's lock.

    ``seqs`` maps each dirty key to the seq of its oldest undrained write. The buffer's write
    path (:meth:`perth_pipeline.table.EntryTable.mark`) adds to it directly, for speed; the dict
    is never rebound, so a reference to it stays valid. ``routes`` holds the keys held for want of
    a route: they are dirty too, only out of the drains' way. ``counters`` are the buffer's.
    """

    def __init__(self, routes: RouteIndex, counters: dict[str, int]) -> None:
        self._routes = routes
        self._counters = counters
        self.seqs: dict[Key, int] = {}
        self._redirtied: set[Key] = set()  # keys given back with an older seq than their place says
        self._redirtied_min: int | None = None  # a lower bound of the seqs in _redirtied

    def __len__(self) -> int:
        return len(self.seqs)

    def __bool__(self) -> bool:
        return bool(self.seqs)

    def unsent(self, key: Key) -> bool:
        """Whether a write of ``key`` waits to be drained (dirty, or held for want of a route)."""
        return key in self.seqs or key in self._routes.held

    def add(self, key: Key, entry: Entry, seq: int) -> None:
        """A write of ``key`` (held as ``entry``) under ``seq``; coalesced if one is unsent."""
        if key in self.seqs or key in self._routes.held:
            # coalesced: it keeps the seq of its oldest unsent write (flush() waits for that one)
            self._counters["coalesced"] += 1
        else:
            self.seqs[key] = seq
        self._routes.track(key, entry)

    def discard(self, key: Key) -> bool:
        """Forget the unsent write of ``key`` (superseded). False: there was none."""
        if self.seqs.pop(key, None) is None:
            return self._routes.unhold(key)
        self._routes.unrouted.discard(key)
        if key in self._redirtied:
            self._redirtied.discard(key)
            if not self._redirtied:
                self._redirtied_min = None
        return True

    def redirty(self, key: Key, entry: Entry, seq: int) -> int:
        """A lost write of ``key`` under ``seq``: dirty again. Returns 1 if it was not dirty."""
        seq = min(seq, entry.seq)
        current = self.seqs.get(key)
        if current is None and self._routes.rehold(key, seq):
            return 0  # still waiting for its route: it waits under the older of the two seqs
        if current is not None and current <= seq:
            return 0
        # out of seq order now: _redirtied_min bounds what is
        self.seqs[key] = seq
        self._redirtied.add(key)
        self._redirtied_min = seq if self._redirtied_min is None else min(self._redirtied_min, seq)
        self._routes.track(key, entry)
        return 1 if current is None else 0

    def min_seq(self) -> int | None:
        """The oldest seq of a dirty key (or a lower bound of it); held keys not counted."""
        first = next(iter(self.seqs.values()), None)
        if first is None or self._redirtied_min is None:
            return first if first is not None else self._redirtied_min
        return min(first, self._redirtied_min)

    def take(self, out: Drained, budget: int, live: dict[Key, Entry]) -> tuple[int, int]:
        """Take up to ``budget`` dirty keys into ``out``, looking at ``SLICE`` at most: (taken, looked).

        ``live`` is the buffer's table of entries. A key found unroutable is moved to the held
        keys, out of every later drain's way.
        """
        taken: list[Key] = []
        held: list[Key] = []
        items = out.items
        routes = self._routes
        unrouted = routes.unrouted
        for key, seq in self.seqs.items():
            if len(taken) >= budget or len(taken) + len(held) >= SLICE:
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
        pop = self.seqs.pop
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
