"""The hybrid logical clock that versions every write.

``next()`` returns ``max(time.time_ns(), last + 1)``: close to wall time, strictly
increasing within a producer, and never below a version the producer has seen
(``observe``), so that a terminal that restarts and restores its rows writes
above them even if its wall clock stepped back. The producer's id (the batch's
``origin``) breaks ties between producers.

Two bounds keep a version storable (``bigint``) and acceptable to the workers (who refuse a
version more than ``records.MAX_CLOCK_SKEW_NS`` ahead of their clock):

* ``observe`` ignores a version further ahead of this host's clock than that (a row written
  by a broken clock, or by hand): adopting it would make every later version of this producer
  refused, in every session. Ignored, the poisoned row keeps winning over this producer's
  writes until its time comes, and a warning says so.
* a host clock past ``records.MAX_VERSION`` (the year 2262) is not used as it is: versions go
  on by logical increments, with an error logged once.
"""

from __future__ import annotations

import logging
import threading
import time

from .records import MAX_CLOCK_SKEW_NS, MAX_VERSION

__all__ = ["HybridClock"]

logger = logging.getLogger("perth_pipeline.clock")

_time_ns = time.time_ns
#: The highest physical time used: room below the ``bigint`` ceiling for 2^40 logical increments.
_PHYSICAL_MAX = MAX_VERSION - 2**40
_WARN_EVERY_NS = 60 * 10**9


class HybridClock:
    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()
        self._warned_at = -_WARN_EVERY_NS
        self._clock_broken = False

    def next(self) -> int:
        with self._lock:
            return self.next_unlocked()

    def next_unlocked(self) -> int:
        """:meth:`next` for a caller that serializes every use of this clock under a lock of its own.

        (The buffer issues versions under its lock and observes them under it too: a second
        lock per write call would only cost time.)
        """
        now = _time_ns()
        if now > _PHYSICAL_MAX:
            now = self._past_the_end(now)
        last = self._last
        self._last = now = now if now > last else last + 1
        return now

    def _past_the_end(self, now: int) -> int:
        if not self._clock_broken:
            self._clock_broken = True
            logger.error("this host's clock is past 2262 (%d ns): versions go on by logical increments", now)
        return _PHYSICAL_MAX

    def observe(self, version: int) -> None:
        """Never issue a version at or below ``version`` (one read back from the database)."""
        now = _time_ns()
        if version > min(now, _PHYSICAL_MAX) + MAX_CLOCK_SKEW_NS:
            if now - self._warned_at >= _WARN_EVERY_NS:
                self._warned_at = now
                logger.warning(
                    "ignored a stored version %.1f hours ahead of this host's clock (a clock was wrong "
                    "where it was written); the row keeps winning over this producer's writes until then",
                    (version - now) / 3.6e12,
                )
            return
        with self._lock:
            self._last = max(self._last, version)

    @property
    def last(self) -> int:
        return self._last
