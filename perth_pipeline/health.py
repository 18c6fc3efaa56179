"""What a producer knows of its backends' health, and what it lets through because of it.

Only the flusher thread writes here; the terminal's threads read it (``is_available``, the stats)
without a lock: each field is one value, and a look that is a cycle old is good enough.

* Redis: a circuit breaker that the poll and the sends drive. A poll that reads proves only that
  Redis reads: a Redis at ``maxmemory`` answers reads and refuses writes. So while enqueues fail,
  a successful poll does not close the breaker; the next send decides.
* PostgreSQL: the producer does not talk to it on the write path; it learns its health from the
  workers' reports (any fresh report up means up; down only if every fresh report says so), and
  asks PostgreSQL itself only when no worker reported within ``health_ttl``. While it is known
  down, nothing is sent: the batches would only pile up on the queue.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .breaker import CircuitBreaker
from .broker import DbHealth
from .errors import PersistenceError
from .settings import Settings

if TYPE_CHECKING:
    from .store import Store

__all__ = ["BackendHealth"]


class BackendHealth:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = CircuitBreaker("Redis", base=settings.breaker_base, cap=settings.breaker_max)
        self.db = CircuitBreaker("PostgreSQL", base=settings.breaker_base, cap=settings.breaker_max)
        self.db_ok: bool | None = None  # None: unknown (no worker reports, no direct check yet)
        self._db_reported_at = 0.0
        self.redis_ok_at = 0.0
        self.queue_depth = 0  # the queue's length at the last poll
        self.enqueue_failing = False

    # --- Redis ------------------------------------------------------------------------------------

    def redis_allowed(self) -> bool:
        return not self.redis.is_down or self.redis.allow()

    def redis_read(self) -> None:
        """A poll went through."""
        self.redis_ok_at = time.monotonic()
        if not self.enqueue_failing:
            # (reads alone do not prove that writes go through: see the module's docstring)
            self.redis.success()

    def redis_failed(self, exc: BaseException) -> None:
        self.redis.failure(exc)

    def enqueued(self) -> None:
        self.enqueue_failing = False
        self.redis.success()
        self.redis_ok_at = time.monotonic()

    def enqueue_failed(self, exc: BaseException) -> None:
        self.enqueue_failing = True
        self.redis.failure(exc)

    # --- PostgreSQL -------------------------------------------------------------------------------

    def note_db_health(self, health: DbHealth) -> None:
        """Up if any worker reaches PostgreSQL; down only if every fresh report says so."""
        if health.ok is None:
            return  # no fresh report: the flusher asks PostgreSQL itself (check_db)
        self._db_reported_at = time.monotonic()
        self._set_db_ok(health.ok, health.error or "reported down by the workers")

    def _set_db_ok(self, ok: bool, error: str) -> None:
        self.db_ok = ok
        if ok:
            self.db.success()
        elif not self.db.is_down:
            self.db.failure(error)

    def db_check_wanted(self, store: Store | None) -> bool:
        """Whether to ask PostgreSQL directly: no worker reported within ``health_ttl``, and a store."""
        if time.monotonic() - self._db_reported_at < self.settings.health_ttl:
            return False
        if store is None:
            self.db_ok = None  # without reports and without a database: unknown
            return False
        return True

    def check_db(self, store: Store) -> None:
        try:
            store.ping()
            self._set_db_ok(True, "")
        except PersistenceError as exc:
            self._set_db_ok(False, str(exc))

    # --- verdicts ---------------------------------------------------------------------------------

    def is_available(self) -> bool:
        """Both backends answered recently (Redis within a few seconds, PostgreSQL not known down)."""
        recent = time.monotonic() - self.redis_ok_at < max(5.0, 4 * self.settings.flush_interval)
        return recent and not self.redis.is_down and self.db_ok is not False

    def may_send(self) -> bool:
        """Whether the backends let a batch go to the queue now (not closing: see ``Flusher.send``)."""
        if not self.redis_allowed():
            return False
        if self.db_ok is False:
            return False
        return self.queue_depth < self.settings.queue_hard_depth
