"""The hybrid logical clock that versions every write.

``next()`` returns ``max(time.time_ns(), last + 1)``: close to wall time, strictly
increasing within a producer, and never below a version the producer has seen
(``observe``), so that a terminal that restarts and restores its rows writes
above them even if its wall clock stepped back. The producer's id (the batch's
``origin``) breaks ties between producers.
"""

from __future__ import annotations

import threading
import time

__all__ = ["HybridClock"]

_time_ns = time.time_ns


class HybridClock:
    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            return self.next_unlocked()

    def next_unlocked(self) -> int:
        """:meth:`next` for a caller that serializes every use of this clock under a lock of its own.

        (The buffer issues versions under its lock and observes them under it too: a second
        lock per write call would only cost time.)
        """
        now = _time_ns()
        last = self._last
        self._last = now = now if now > last else last + 1
        return now

    def observe(self, version: int) -> None:
        """Never issue a version at or below ``version`` (one read back from the database)."""
        with self._lock:
            self._last = max(self._last, version)

    @property
    def last(self) -> int:
        return self._last
