"""What may enter the buffer: the entity bound, the entities dropped at it, the warning.

A part of the buffer (:mod:`perth_pipeline.buffer`), kept apart because its rules are its own
(the scrollback's bound, in bytes, lives in :mod:`perth_pipeline.scrollback`):

* **Bounded by entities.** Past ``max_entities`` live entities a new one, and anything written
  under it, is dropped and counted (``dropped_entities``, ``dropped_chunks``): the terminal never
  waits and memory stays bounded. An update of an entity already held always goes in (it costs
  nothing more). Deletes not yet committed hold a slot too, up to as many again: past twice the
  bound nothing new goes in at all (a long outage).
* **A dropped entity stays dropped for what is under it**, remembered (bounded, oldest forgotten
  first) until room comes back and the entity itself is written again: a record is whole, so that
  write is complete state, and what follows it is kept again.
* **One warning per crossing.** The bound is logged once when reached, and again only after the
  buffer went well below it (hysteresis: a count hovering at the bound must not log per call).
  The warning is only noted under the lock; the buffer logs it once the lock is released (a log
  handler may do I/O, and a write call must not wait on it).

No lock of its own: every method runs under the buffer's lock.
"""

from __future__ import annotations

from collections import OrderedDict

from .entries import Entry, Key

__all__ = ["DROPPED_MEMORY", "Admission"]

#: Entities remembered as dropped at the bound, oldest forgotten first.
DROPPED_MEMORY = 65_536


class Admission:
    """The entity bound and what was dropped at it. Runs under the buffer's lock (none of its own).

    ``live`` is the buffer's table of entries (live ones and deletes not yet committed), read
    here, never changed; ``counters`` the buffer's counters, which this class adds to.
    """

    def __init__(self, live: dict[Key, Entry], max_entities: int, counters: dict[str, int]) -> None:
        self._live = live
        self.max_entities = max_entities
        self._counters = counters
        self.live_count = 0  # entries not deleted: what the entity bound counts
        self._dropped: OrderedDict[int, None] = OrderedDict()
        self._warned = False
        # noted under the lock, logged by the buffer once the lock is released (see take_warning)
        self.warning: dict[str, int] | None = None

    def admit(self, entry: Entry | None, entity_id: int | None, parent_id: int | None) -> bool:
        """Whether a write of an entity (held as ``entry``) may go in (False: dropped and counted)."""
        self._counters["submitted"] += 1
        if parent_id is not None and parent_id in self._dropped:
            if entity_id is not None:
                self._remember_dropped(entity_id)
            self._counters["dropped_entities"] += 1
            return False
        if entry is not None and not entry.deleted:
            return True
        if self.live_count >= self.max_entities or (
            entry is None and len(self._live) >= 2 * self.max_entities
        ):
            if entity_id is not None:
                self._remember_dropped(entity_id)
            self._counters["dropped_entities"] += 1
            self._warn_full()
            return False
        if entity_id is not None:
            # room again: a record is whole, so a later write of a dropped entity is complete state
            self._dropped.pop(entity_id, None)
        return True

    def admit_delete(self, held: bool) -> bool:
        """Whether a delete may go in; ``held``: the buffer holds an entry of it already."""
        if not held and len(self._live) >= 2 * self.max_entities:
            # every slot holds a live entity or a delete not yet committed (a long outage)
            self._counters["dropped_entities"] += 1
            self._warn_full()
            return False
        return True

    def admit_chunk(self, pane_id: int, size: int) -> bool:
        """Whether a chunk may go in: not when its pane was dropped (counted)."""
        if pane_id in self._dropped:
            self._counters["dropped_chunks"] += 1
            self._counters["dropped_chunk_bytes"] += size
            return False
        return True

    def is_dropped(self, entity_id: int) -> bool:
        return entity_id in self._dropped

    def deleted(self, entity_id: int) -> None:
        """An entity deleted by the terminal: whatever was dropped of it is moot."""
        self._dropped.pop(entity_id, None)

    def occupy(self) -> None:
        """An entity created (or created again): it takes a slot."""
        self.live_count += 1

    def release(self) -> None:
        """An entity deleted, or forgotten: its slot is free."""
        self.live_count -= 1
        self.rearm()

    def rearm(self) -> None:
        # hysteresis: an entity count hovering at the bound must not log a warning per call
        if (
            self._warned
            and self.live_count < self.max_entities * 9 // 10
            and len(self._live) < self.max_entities * 18 // 10
        ):
            self._warned = False

    def take_warning(self) -> dict[str, int] | None:
        """The warning noted since last taken, to be logged outside the lock: its fields, or None."""
        warning, self.warning = self.warning, None
        return warning

    def _warn_full(self) -> None:
        if not self._warned:
            self._warned = True
            self.warning = {
                "max_entities": self.max_entities,
                "live_entities": self.live_count,
                "held_entries": len(self._live),
            }

    def _remember_dropped(self, entity_id: int) -> None:
        self._dropped[entity_id] = None
        if len(self._dropped) > DROPPED_MEMORY:
            self._dropped.popitem(last=False)
