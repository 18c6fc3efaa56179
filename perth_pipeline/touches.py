"""Touches of sessions the buffer does not hold: ``last_active`` bumps waiting to be sent.

A part of the buffer (:mod:`perth_pipeline.buffer`), kept apart because its rules are its own
(a touch of a session the buffer holds is folded into its record instead, by the buffer):

* **``last_active`` only grows** where it is stored (a max register), so touches of one session
  coalesce into one, carrying the latest time and a new version, but the seq of the oldest unsent
  touch: ``flush()`` waits for that one.
* **A delete of the session makes its pending touch moot**; a touch lost in delivery comes back
  unless a newer one is pending.
* **Bounded.** Past ``max_entities`` pending touches a touch of yet another session is dropped
  and counted (``dropped_entities``): the terminal never waits.

No lock of its own: every method runs under the buffer's lock (which also guards the clock).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from itertools import islice
from uuid import UUID

from .clock import HybridClock
from .entries import Touch

__all__ = ["PendingTouches"]


class PendingTouches:
    """Pending touch per session id (``UUID.int``), in write order. Runs under the buffer's lock.

    ``clock`` is the buffer's (versions are issued under its lock); ``counters`` the buffer's.
    """

    def __init__(self, max_entities: int, clock: HybridClock, counters: dict[str, int]) -> None:
        self._max_entities = max_entities
        self._clock = clock
        self._counters = counters
        self._pending: dict[int, Touch] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def __bool__(self) -> bool:
        return bool(self._pending)

    def add(self, session_id: UUID, now: datetime, next_seq: Callable[[], int]) -> None:
        """A touch of a session the buffer does not hold; ``next_seq`` issues the buffer's next seq."""
        ident = session_id.int
        pending = self._pending.get(ident)
        if pending is not None:
            self._counters["coalesced"] += 1
            # keeps the seq of the oldest unsent touch: flush() waits for that one
            latest = max(now, pending.last_active)
            self._pending[ident] = Touch(session_id, latest, self._clock.next_unlocked(), pending.seq)
            return
        if len(self._pending) >= self._max_entities:
            self._counters["dropped_entities"] += 1
            return
        seq = next_seq()
        self._pending[ident] = Touch(session_id, now, self._clock.next_unlocked(), seq)

    def take(self, budget: int) -> list[Touch]:
        """Up to ``budget`` pending touches, oldest first, taken out."""
        return [self._pending.pop(ident) for ident in list(islice(self._pending, budget))]

    def restore(self, touch: Touch) -> int:
        """A touch lost in delivery: pending again, unless a newer one is. Returns 1 if restored."""
        ident = touch.session_id.int
        if ident in self._pending:
            return 0  # a newer touch of it is pending
        self._pending[ident] = touch
        return 1

    def discard(self, session_id: int) -> None:
        """The session was deleted: its pending touch is moot."""
        self._pending.pop(session_id, None)

    def min_seq(self) -> int | None:
        return min((t.seq for t in self._pending.values()), default=None)
