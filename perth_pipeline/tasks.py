"""The flusher's periodic work, as small tasks that each know their interval.

The flusher wakes every ``flush_interval`` (sooner while a ``flush()`` waits) and ticks each task;
a task that is due runs, and reschedules itself ``interval`` seconds from the start of that run,
even if the run fails: a dead backend is not asked again at every cycle. A task whose
precondition does not hold (``_ready``: the breaker is open, a worker reported recently) does not
run and stays due. As psycopg_pool's ``MaintenanceTask`` does, a task holds only a weak
reference to the flusher that owns it: it never keeps a dropped flusher alive, and does nothing
once it is gone.

The tasks, in the order of a cycle (the flusher sends after them):

* :class:`PollTask`: one round trip to Redis for the queue's depth, the workers' reports on
  PostgreSQL and the state of the oldest batches in flight, which it settles. Every cycle while
  anything is in flight, waits to be sent or a ``flush()`` waits; once a second when idle (an
  idle terminal costs Redis one round trip a second, not twenty). It drives the Redis breaker.
* :class:`StatsTask`: this producer's counters for ``status`` and the metrics, every few seconds,
  in the poll's wake (a failed write counts against Redis as the poll's own would).
* :class:`DbCheckTask`: without a fresh report from a worker, PostgreSQL is asked directly.
* :class:`RouteTask`: the session of tabs and panes the buffer holds writes for but does not
  know (see its docstring: a delay never becomes a loss).
"""

from __future__ import annotations

import json
import math
import random
import time
import weakref
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import redis
from rq.job import Job

from .broker import db_health_verdict
from .errors import DatabaseUnavailable, PersistenceError
from .inflight import LOG_EVERY
from .masking import masked_logger

if TYPE_CHECKING:
    from .flusher import Flusher

__all__ = ["REDIS_ERRORS", "YIELD", "DbCheckTask", "MaintenanceTask", "PollTask", "RouteTask", "StatsTask"]

logger = masked_logger("perth_pipeline.producer")

#: What a dead or stuck Redis raises in the flusher (redis-py wraps most socket errors, not all).
REDIS_ERRORS = (redis.RedisError, OSError)
YIELD = 0.00002  # a real sleep hands the interpreter lock to a waiting thread (see buffer._let_writers_in)

_POLL_BATCH = 200  # the oldest batches in flight whose state one poll reads
_POLL_CHUNK = 50  # ... in pipelines of this many
_STATS_TTL = 30
#: At most this many ids in one route look-up (a query per second while anything waits).
_ROUTE_LOOKUP_MAX = 2000

OwnerT = TypeVar("OwnerT")


def _server_version(info: Any) -> tuple[int, int, int]:
    """Redis's version from ``INFO server``, as RQ parses it (RQ's own default when it cannot)."""
    try:
        parts = [int(p) for p in str(info["redis_version"]).split(".")[:3]]
    except (TypeError, KeyError, ValueError):  # an error reply (fakeredis has no INFO), or odd
        return (5, 0, 9)
    major, minor, patch = [*parts, 0, 0, 0][:3]
    return major, minor, patch


class MaintenanceTask(Generic[OwnerT]):
    """Periodic work for an owner it references weakly; due at once when made."""

    interval: ClassVar[float]

    def __init__(self, owner: OwnerT) -> None:
        self._owner = weakref.ref(owner)
        self._next_at = -math.inf

    def tick(self) -> None:
        """Run if due (and ready)."""
        owner = self._owner()
        if owner is not None and self._due(owner, time.monotonic()):
            self.run(owner)

    def run(self, owner: OwnerT) -> None:
        """Run now, due or not (if ready), and reschedule."""
        if not self._ready(owner):
            return
        self._next_at = time.monotonic() + self.interval
        self._work(owner)

    def _due(self, owner: OwnerT, now: float) -> bool:
        return now >= self._next_at

    def _ready(self, owner: OwnerT) -> bool:
        return True

    def _work(self, owner: OwnerT) -> None:
        raise NotImplementedError


class PollTask(MaintenanceTask["Flusher"]):
    interval = 1.0  # when idle; every cycle while busy (see _due)

    def _due(self, owner: Flusher, now: float) -> bool:
        busy = len(owner.tracker) or owner.waiters or owner.buffer.has_dirty()
        return bool(busy) or super()._due(owner, now)

    def _ready(self, owner: Flusher) -> bool:
        return owner.health.redis.allow()

    def _work(self, owner: Flusher) -> None:
        try:
            self._poll(owner)
        except REDIS_ERRORS as exc:
            owner.health.redis_failed(exc)
        else:
            owner.health.redis_read()

    def _poll(self, owner: Flusher) -> None:
        """One round trip: the queue depth, PostgreSQL's health and the state of our oldest jobs.

        With many batches in flight (a worker outage) their states are read in pipelines of
        ``_POLL_CHUNK``, yielding in between: building and parsing a pipeline is Python, about
        10 us a command, and 200 at once would keep the interpreter from the terminal for 2 ms.
        """
        client, queue = owner.redis, owner.queue
        jobs = owner.tracker.oldest(_POLL_BATCH)
        first = jobs[:_POLL_CHUNK]
        # RQ asks the server's version (INFO, a large reply parsed in Python) at a queue's first
        # enqueue: learnt here instead, in the round trip the flusher makes anyway at its start,
        # not in the middle of the first batch sent
        learn_version = not queue.redis_server_version
        with client.pipeline(transaction=False) as pipe:
            pipe.llen(queue.key)
            pipe.hgetall(owner.keys.db_health)
            for job in first:
                pipe.hmget(Job.key_for(job.job_id), "status", "last_heartbeat", "meta")
            if learn_version:
                pipe.info("server")
            results = pipe.execute(raise_on_error=False)
        for result in results[: len(first) + 2]:
            if isinstance(result, Exception):
                raise result
        if learn_version:
            queue.redis_server_version = _server_version(results[-1])
        owner.health.queue_depth = int(results[0])
        owner.health.note_db_health(db_health_verdict(results[1], ttl=owner.settings.health_ttl))
        states = results[2 : 2 + len(first)]
        for start in range(_POLL_CHUNK, len(jobs), _POLL_CHUNK):
            time.sleep(YIELD)
            with client.pipeline(transaction=False) as pipe:
                for job in jobs[start : start + _POLL_CHUNK]:
                    pipe.hmget(Job.key_for(job.job_id), "status", "last_heartbeat", "meta")
                states.extend(pipe.execute())
        for n, (job, (status, heartbeat, meta)) in enumerate(zip(jobs, states, strict=True)):
            if n and n % _POLL_CHUNK == 0:
                time.sleep(YIELD)
            owner.tracker.settle(job, status.decode() if status else None, heartbeat, meta)
        owner.tracker.emit_logs()
        owner.stats_task.tick()


class StatsTask(MaintenanceTask["Flusher"]):
    interval = 5.0

    def _work(self, owner: Flusher) -> None:
        """Each producer's counters, for ``status`` and the metrics (expire with the producer)."""
        stats: dict[str, Any] = {k: v for k, v in owner.stats().items() if isinstance(v, int | bool | str)}
        stats["published_at"] = time.time()
        owner.redis.set(owner.keys.producer(owner.origin), json.dumps(stats), ex=_STATS_TTL)


class DbCheckTask(MaintenanceTask["Flusher"]):
    interval = 5.0

    def _ready(self, owner: Flusher) -> bool:
        return owner.health.db_check_wanted(owner.store)

    def _work(self, owner: Flusher) -> None:
        if owner.store is not None:  # (_ready says so)
            owner.health.check_db(owner.store)


class RouteTask(MaintenanceTask["Flusher"]):
    """Ask PostgreSQL for the session of tabs and panes this buffer does not hold.

    What waits for a route stays in the buffer, dirty, however long it takes (the parent's
    batch may still be queued behind a backlog): no timer turns a delay into a loss. Memory
    bounds it: held entities count against ``max_entities``, parked scrollback against
    ``max_pending_history_bytes``. Routes come from the rows, or from the tombstones of
    deleted tabs and panes (whose writes are then sent, and judged by version, or moot).
    """

    interval = 1.0

    def __init__(self, owner: Flusher) -> None:
        super().__init__(owner)
        self._error_logged_at = -LOG_EVERY

    def _work(self, owner: Flusher) -> None:
        tab_ids, pane_ids = owner.buffer.unrouted()
        if (not tab_ids and not pane_ids) or owner.store is None:
            return  # without a database, only the terminal's own writes can tell
        if len(tab_ids) + len(pane_ids) > _ROUTE_LOOKUP_MAX:
            # a long wait behind a backlog: look up a different sample each time
            tab_ids = random.sample(tab_ids, min(len(tab_ids), _ROUTE_LOOKUP_MAX // 2))
            pane_ids = random.sample(pane_ids, min(len(pane_ids), _ROUTE_LOOKUP_MAX // 2))
        try:
            routes = owner.store.routes(tab_ids, pane_ids)
        except DatabaseUnavailable:
            return  # unreachable: the health check says so; the writes wait
        except PersistenceError as exc:  # e.g. a database whose schema predates the look-up
            now = time.monotonic()
            if now - self._error_logged_at >= LOG_EVERY:
                self._error_logged_at = now
                logger.warning(
                    "route look-up failed (%s); writes under unknown parents wait. "
                    "Is the schema current? Run `perth-pipeline init-db`",
                    type(exc).__name__,
                    extra={"unrouted_tabs": len(tab_ids), "unrouted_panes": len(pane_ids)},
                )
            return
        # (a pane the database knows only as a tombstone is routed by it, not treated as gone: another
        # terminal may have created it again since, and the workers judge a chunk by its version)
        owner.buffer.learn_routes(routes.tabs, routes.panes)
