"""A circuit breaker per backend, so that a dead backend costs one timeout per back-off, not per flush."""

from __future__ import annotations

import random
import time

from .masking import masked_logger

__all__ = ["CircuitBreaker"]

logger = masked_logger("perth_pipeline.producer")


class CircuitBreaker:
    """Closed while calls succeed; open for a growing, capped, jittered back-off after a failure.

    Not thread-safe on purpose: only the flusher thread drives it. Logs one warning
    when the backend goes down and one info line when it answers again.
    """

    def __init__(self, name: str, *, base: float, cap: float) -> None:
        self.name = name
        self.base = base
        self.cap = cap
        self._failures = 0
        self._open_until = 0.0
        self._down_since: float | None = None
        self._skipped = 0
        self.last_error: str | None = None

    @property
    def is_down(self) -> bool:
        return self._down_since is not None

    def allow(self) -> bool:
        """Whether to try the backend now (closed, or open with its back-off over)."""
        if self._down_since is None or time.monotonic() >= self._open_until:
            return True
        self._skipped += 1
        return False

    def success(self) -> None:
        if self._down_since is not None:
            logger.info(
                "%s reachable again after %.1f s; resending what it missed",
                self.name,
                time.monotonic() - self._down_since,
                extra={"backend": self.name, "skipped_flushes": self._skipped, "failures": self._failures},
            )
        self._failures = 0
        self._down_since = None
        self._skipped = 0
        self.last_error = None

    def failure(self, error: BaseException | str) -> float:
        """Record a failure; returns the back-off in seconds before the next try.

        The back-off doubles from ``base`` up to ``cap``, less a random quarter at most:
        never above the cap, still growing at each failure below it (2 x 0.75 > 1), and
        spread out so that many terminals do not come back to a restarted server at once.
        """
        self._failures += 1
        delay: float = min(self.cap, self.base * (2.0 ** min(self._failures - 1, 30)))
        delay *= random.uniform(0.75, 1.0)
        self._open_until = time.monotonic() + delay
        self.last_error = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        if self._down_since is None:
            self._down_since = time.monotonic()
            logger.warning(
                "%s unreachable (%s); persistence continues in memory and resends when it is back",
                self.name,
                self.last_error,
                extra={"backend": self.name},
            )
        return delay
