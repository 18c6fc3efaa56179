"""The scheduler behind ``perth-pipeline scheduler``: enqueues the periodic cleanup as a JSON job.

``rq cron`` (RQ 2.12) enqueues with pickle, which the JSON-only, allowlisting
workers refuse; this small scheduler enqueues ``workers.maintenance.cleanup``
with the JSON serializer instead.

Run one on as many hosts as you like: one is active at a time. The active one
holds a Redis lock with a TTL and renews it every tick; if it dies, another
takes over when the lock expires. The schedule itself (when the next run is
due) lives in Redis too, and a run is claimed atomically by the lock holder, so
a takeover neither repeats nor skips a run. A run is skipped while the previous
cleanup job is still waiting or running (workers down for a day do not find a
day's worth of cleanups on their return).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from typing import Any

import redis
from rq.job import Job

from . import wire
from .broker import LIVE_STATUSES, Keys, make_queue
from .masking import masked_logger
from .retention import MIN_JOB_RETENTION
from .settings import Settings
from .units import format_duration

__all__ = ["CLEANUP_FUNCTION", "Scheduler"]

logger = masked_logger("perth_pipeline.scheduler")

#: The job the scheduler enqueues (allowlisted in workers.jobs.ALLOWED).
CLEANUP_FUNCTION = wire.CLEANUP

# KEYS[1]: the lock; ARGV: token, ttl (ms). 1 if still ours (and renewed).
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
# KEYS[1]: the lock; ARGV: token. Deletes it only if it is ours.
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""
# KEYS[1]: the lock, KEYS[2]: when the next run is due; ARGV: token, now, next, ttl (ms).
# -1: not the lock holder; 0: not due; 1: claimed (the next run is now ARGV[3]).
_CLAIM = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then
    return -1
end
local due = tonumber(redis.call('get', KEYS[2]) or '0')
if due > tonumber(ARGV[2]) then
    return 0
end
redis.call('set', KEYS[2], ARGV[3], 'PX', ARGV[4])
return 1
"""


class Scheduler:
    """One scheduler process's view: the lock, the schedule, the enqueue. Call :meth:`tick` periodically."""

    def __init__(
        self,
        settings: Settings,
        connection: redis.Redis,
        *,
        every: float,
        older_than: float,
        tombstone_retention: float | None = None,
        lock_ttl: float = 30.0,
        job_timeout: int = 1800,
    ) -> None:
        if every <= 0 or older_than <= 0:
            raise ValueError("the schedule and the retention must be positive durations")
        if older_than < MIN_JOB_RETENTION or (tombstone_retention or MIN_JOB_RETENTION) < MIN_JOB_RETENTION:
            raise ValueError(f"a cleanup job keeps at least {MIN_JOB_RETENTION / 3600:g} hour of data")
        self.settings = settings
        self.redis = connection
        self.every = every
        self.older_than = older_than
        self.tombstone_retention = tombstone_retention
        self.lock_ttl_ms = max(1000, int(lock_ttl * 1000))
        self.job_timeout = job_timeout
        self.keys = Keys(settings.queue)
        self.lock_key = self.keys.scheduler_lock
        self.next_key = f"{self.keys.prefix}scheduler:next:cleanup"
        self.last_key = f"{self.keys.prefix}scheduler:last:cleanup"
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.queue = make_queue(settings.queue, connection)
        self.is_leader = False
        self._renew = connection.register_script(_RENEW)
        self._release = connection.register_script(_RELEASE)
        self._claim = connection.register_script(_CLAIM)

    def hold(self) -> bool:
        """Renew the lock if it is ours, else try to take it. True while this one is active."""
        if self.is_leader:
            self.is_leader = bool(self._renew(keys=[self.lock_key], args=[self.token, self.lock_ttl_ms]))
            if not self.is_leader:
                logger.warning("scheduler lost its lock (paused past its TTL?); another one is active")
            return self.is_leader
        if self.redis.set(self.lock_key, self.token, nx=True, px=self.lock_ttl_ms):
            self.is_leader = True
            logger.info("this scheduler is now the active one", extra={"scheduler": self.token})
        return self.is_leader

    def tick(self, now: float | None = None) -> str | None:
        """Hold the lock and, if a run is due, enqueue it. Returns the id of the job enqueued."""
        if not self.hold():
            return None
        now = time.time() if now is None else now
        keep_ms = int(max(self.every * 2, 60) * 1000)
        claimed = self._claim(
            keys=[self.lock_key, self.next_key],
            args=[self.token, repr(now), repr(now + self.every), keep_ms],
        )
        if claimed == -1:
            self.is_leader = False
            return None
        if claimed == 0:
            return None
        if self._previous_still_live():
            logger.info("cleanup skipped: the previous cleanup job is still queued or running")
            return None
        job = self.queue.enqueue(
            CLEANUP_FUNCTION,
            self.options(),
            job_timeout=self.job_timeout,
            result_ttl=max(self.settings.result_ttl, int(self.every) + 60),
            failure_ttl=self.settings.failed_ttl,
            description=f"cleanup: sessions inactive for more than {format_duration(self.older_than)}",
        )
        self.redis.set(self.last_key, job.id, px=keep_ms)
        logger.info("enqueued cleanup job %s", job.id, extra={"job_id": job.id, **self.options()})
        return str(job.id)

    def options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"older_than": self.older_than}
        if self.tombstone_retention is not None:
            options["tombstone_retention"] = self.tombstone_retention
        return options

    def _previous_still_live(self) -> bool:
        last = self.redis.get(self.last_key)
        if not last:
            return False
        job_id = last.decode() if isinstance(last, bytes) else str(last)
        status = self.redis.hget(Job.key_for(job_id), "status")
        if not status:
            return False
        return (status.decode() if isinstance(status, bytes) else str(status)) in LIVE_STATUSES

    def release(self) -> None:
        """Give the lock up (so that another scheduler takes over at once)."""
        if self.is_leader:
            with contextlib.suppress(redis.RedisError):  # it expires on its own
                self._release(keys=[self.lock_key], args=[self.token])
            self.is_leader = False

    def run(self, stop: threading.Event, *, interval: float = 5.0) -> None:
        """Tick every ``interval`` seconds until ``stop`` is set; then release the lock."""
        failing_since: float | None = None
        try:
            while not stop.is_set():
                try:
                    self.tick()
                    if failing_since is not None:
                        logger.info("Redis reachable again after %.0f s", time.monotonic() - failing_since)
                        failing_since = None
                except redis.RedisError as exc:
                    self.is_leader = False  # unknown: renewing will tell
                    if failing_since is None:
                        failing_since = time.monotonic()
                        logger.warning("scheduler cannot reach Redis (%s); retrying", exc)
                stop.wait(interval)
        finally:
            self.release()
