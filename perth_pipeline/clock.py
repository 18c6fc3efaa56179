"""The hybrid logical clock that versions every write.

``next()`` returns ``max(time.time_ns(), last + 1)``: close to wall time, strictly
increasing within a producer, and never below a version the producer has seen
(``observe``), so that a terminal that restarts and restores its rows writes
above them even if its wall clock stepped back. The producer's id (the batch's
``origin``) breaks ties between producers.

Two bounds keep every version storable (``bigint``) and acceptable to the workers, who refuse
a version more than ``limits.MAX_CLOCK_SKEW_NS`` (a day) ahead of their own clock:

* ``observe`` ignores a version more than half that ahead of this host's clock (a row written
  by a broken clock, or by hand at 2^63-1): adopting it would make every later version of this
  producer refused, in every session. Half, so that what this producer issues after adopting a
  version is still accepted by a worker whose clock is up to 12 hours behind its own. An ignored
  row keeps winning over this producer's writes until its time comes; a warning (at most one a
  minute) says so.
* a host clock past ``_CEILING`` (the year 2262, where nanoseconds leave ``bigint``) is not
  used: versions go on by logical increments from the last one, with an error logged once, and
  they never pass ``limits.MAX_VERSION``.
"""

from __future__ import annotations

import threading
import time

from .limits import MAX_CLOCK_SKEW_NS, MAX_VERSION
from .masking import masked_logger

__all__ = ["HybridClock"]

logger = masked_logger("perth_pipeline.clock")

_time_ns = time.time_ns
#: The highest version taken from the wall clock or adopted from a row: 2^40 logical increments
#: below the ``bigint`` ceiling (12 days at a million writes a second).
_CEILING = MAX_VERSION - 2**40
#: How far ahead of this host's clock an observed version is still adopted.
_ADOPT_AHEAD_NS = MAX_CLOCK_SKEW_NS // 2
_WARN_EVERY_NS = 60 * 10**9


class HybridClock:
    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()
        self._warned_at: int | None = None
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
        last = self._last
        if now > last and now <= _CEILING:
            self._last = now
            return now
        if now > _CEILING:
            self._past_the_end(now)
        if last < MAX_VERSION:
            self._last = last = last + 1
        return last

    def _past_the_end(self, now: int) -> None:
        if not self._clock_broken:
            self._clock_broken = True
            logger.error(
                "this host's clock is past 2262: versions go on by logical increments from the last one",
                extra={"time_ns": now, "version": self._last},
            )

    def observe(self, version: int) -> None:
        """Never issue a version at or below ``version`` (one read back from the database)."""
        now = _time_ns()
        if version > min(now + _ADOPT_AHEAD_NS, _CEILING):
            self._ignored(version, now)
            return
        with self._lock:
            self._last = max(self._last, version)

    def _ignored(self, version: int, now: int) -> None:
        at = time.monotonic_ns()
        if self._warned_at is not None and at - self._warned_at < _WARN_EVERY_NS:
            return
        self._warned_at = at
        logger.warning(
            "ignored a stored version %.1f hours ahead of this host's clock (the clock of the host "
            "that wrote it was wrong); that row wins over this producer's writes until then",
            (version - now) / 3.6e12,
            extra={"version": version, "time_ns": now},
        )

    @property
    def last(self) -> int:
        return self._last
