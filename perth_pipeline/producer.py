"""``PersistenceManager``: what the terminal calls.

Write calls validate, record the change in the write-behind buffer and return;
they perform no I/O and never raise for an outage. One flusher thread per
manager sends dirty state as RQ jobs, watches the jobs it sent (a job that
failed or vanished makes its entities dirty again), keeps a circuit breaker per
backend and learns PostgreSQL's health from the workers. Reads are synchronous.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import random
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any
from uuid import UUID

import redis
import zstandard
from rq.job import Job, JobStatus, Retry

from .batch import JOB_FUNCTION, EncodedBatch, PackedJob, encode_batches
from .breaker import CircuitBreaker
from .broker import LIVE_STATUSES, DbHealth, Keys, db_health_verdict, make_queue, make_redis
from .buffer import (
    PANE,
    SESSION,
    TAB,
    TEMPLATE,
    Buffer,
    Chunk,
    Drained,
    Receipt,
    Touch,
)
from .errors import DatabaseUnavailable, InvalidRecord, NotFound, PersistenceError
from .masking import masked_logger
from .records import PaneHistoryChunk, PaneRecord, SessionRecord, SessionTree, TabRecord, TemplateRecord
from .settings import Settings
from .store import Store
from .validation import verify_template_name

__all__ = ["PersistenceManager", "close_all"]

logger = masked_logger("perth_pipeline.producer")

_POLL_BATCH = 200  # the oldest batches in flight whose state one poll reads
_POLL_CHUNK = 50  # ... in pipelines of this many
_DB_CHECK_EVERY = 5.0
_ROUTE_CHECK_EVERY = 1.0
#: At most this many ids in one route look-up (a query per second while anything waits).
_ROUTE_LOOKUP_MAX = 2000
_STATS_EVERY = 5.0
#: With nothing in flight and nothing to send, the flusher looks at Redis this often (for the queue
#: depth, PostgreSQL's health and the breaker), not at every flush interval: an idle terminal costs
#: Redis one round trip a second, not twenty.
_IDLE_POLL_EVERY = 1.0
_STATS_TTL = 30
_YIELD = 0.00002  # a real sleep hands the interpreter lock to a waiting thread (see buffer._let_writers_in)
_MAX_BATCHES_PER_CYCLE = 16
_LOG_EVERY = 30.0  # at most one line per this many seconds for a repeated condition
#: What a dead or stuck Redis raises in the flusher (redis-py wraps most socket errors, not all).
_REDIS_ERRORS = (redis.RedisError, OSError)

_managers: weakref.WeakSet[PersistenceManager] = weakref.WeakSet()


def close_all(timeout: float = 5.0) -> None:
    """Close every manager of this process that is not closed yet, within ``timeout`` in all.

    What ``atexit`` runs (and :func:`perth_pipeline.install_signal_handlers` on a signal): each
    sends what it holds to the queue, as :meth:`PersistenceManager.close` does.
    """
    deadline = time.monotonic() + timeout
    for manager in list(_managers):
        manager.close(timeout=max(0.1, deadline - time.monotonic()))


def _close_all_at_exit() -> None:
    close_all(timeout=2.0 * max(1, len(_managers)))


atexit.register(_close_all_at_exit)


def _uuid(value: Any, field_name: str) -> UUID:
    if isinstance(value, UUID):
        return value
    try:
        return UUID(str(value))
    except (TypeError, ValueError):
        raise InvalidRecord(field_name, f"{value!r} is not a UUID") from None


def _server_version(info: Any) -> tuple[int, int, int]:
    """Redis's version from ``INFO server``, as RQ parses it (RQ's own default when it cannot)."""
    try:
        parts = [int(p) for p in str(info["redis_version"]).split(".")[:3]]
    except (TypeError, KeyError, ValueError):  # an error reply (fakeredis has no INFO), or odd
        return (5, 0, 9)
    major, minor, patch = [*parts, 0, 0, 0][:3]
    return major, minor, patch


def _refusal(meta: bytes | None) -> str | None:
    if not meta:
        return None
    try:
        value = json.loads(meta)
    except ValueError:
        return None
    reason = value.get("perth_refused") if isinstance(value, dict) else None
    return str(reason) if reason else None


class _Summary:
    """One log line for many batches of one kind, at most every ``_LOG_EVERY`` seconds.

    After a Redis restart hundreds of batches vanish at once; an outage must not flood
    the terminal's log with a line per batch.
    """

    def __init__(self, what: str, level: int) -> None:
        self.what = what
        self.level = level
        self.reasons: dict[str, int] = {}
        self.example = ""
        self.logged_at = -_LOG_EVERY

    def note(self, reason: str, job_id: str) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self.example = self.example or job_id

    def emit(self) -> None:
        if not self.reasons or time.monotonic() - self.logged_at < _LOG_EVERY:
            return
        self.logged_at = time.monotonic()
        total = sum(self.reasons.values())
        detail = "; ".join(f"{n} {reason}" for reason, n in sorted(self.reasons.items()))
        logger.log(
            self.level,
            "%d %s: %s",
            total,
            self.what,
            detail,
            extra={"batches": total, "reasons": dict(self.reasons), "example_job_id": self.example},
        )
        self.reasons, self.example = {}, ""


@dataclass(slots=True)
class _InFlight:
    """A batch on the queue, not yet known to be committed: what a resend needs, not its data."""

    job_id: str
    receipt: Receipt  # its entities' keys (the buffer resends their current state)
    touches: list[Touch]
    chunks: list[Chunk]  # scrollback is appended, not state: kept whole for a resend
    min_seq: int
    sent_at: float


class PersistenceManager:
    """The persistence of one terminal process. Thread-safe; one flusher thread.

    ``PersistenceManager(redis_url, database_url)`` never raises for a dead
    backend: it starts in memory and delivers when the backends answer.
    Pass ``redis=`` to supply a client (fakeredis in unit tests).
    """

    def __init__(
        self,
        redis_url: str | None = None,
        database_url: str | None = None,
        *,
        settings: Settings | None = None,
        redis_client: redis.Redis | None = None,
        start: bool = True,
    ) -> None:
        base = settings or Settings()
        self.settings = base.with_urls(redis_url or base.redis_url, database_url or base.database_url)
        s = self.settings
        if redis_client is None and not s.redis_url:
            raise PersistenceError("PersistenceManager needs a redis_url (or REDIS_URL) or a redis client")
        self.origin = f"p{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.keys = Keys(s.queue)
        self.buffer = Buffer(
            max_entities=s.max_entities,
            max_pending_history_bytes=s.max_pending_history_bytes,
            max_json_bytes=s.max_json_bytes,
            max_chunk_bytes=s.max_chunk_bytes,
        )
        self._owns_redis = redis_client is None
        self._redis = redis_client or make_redis(
            s.redis_url or "",
            connect_timeout=s.redis_connect_timeout,
            socket_timeout=s.redis_socket_timeout,
            client_name=f"perth-producer-{self.origin}",
        )
        self._queue = make_queue(s.queue, self._redis, job_class=PackedJob)
        self._store = (
            Store(s.database_url, connect_timeout=s.db_connect_timeout, statement_timeout=s.statement_timeout)
            if s.database_url
            else None
        )
        self._retry = Retry(max=len(s.retry_intervals), interval=list(s.retry_intervals))
        self._compressor = zstandard.ZstdCompressor(level=s.zstd_level)

        self._redis_breaker = CircuitBreaker("Redis", base=s.breaker_base, cap=s.breaker_max)
        self._db_breaker = CircuitBreaker("PostgreSQL", base=s.breaker_base, cap=s.breaker_max)
        self._db_ok: bool | None = None  # None: unknown (no worker reports, no direct check yet)
        self._db_reported_at = 0.0
        self._db_checked_at = -_DB_CHECK_EVERY
        self._redis_ok_at = 0.0
        self._queue_depth = 0
        self._route_checked_at = 0.0
        self._route_error_logged_at = -_LOG_EVERY
        self._polled_at = -_IDLE_POLL_EVERY
        self._stats_published_at = 0.0
        self._cycle_failures = 0
        self._enqueue_failing = False
        self._cycle_failure_logged_at = -_LOG_EVERY
        self._resync_log = _Summary("batches sent again", logging.INFO)
        self._refusal_log = _Summary("batches refused by the workers (not sent again)", logging.WARNING)

        self._inflight: OrderedDict[str, _InFlight] = OrderedDict()
        self._sending_min_seq: int | None = None
        self._state = threading.Lock()
        self._cond = threading.Condition(threading.Lock())
        self._waiters = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.counters: dict[str, int] = {
            "enqueued_jobs": 0,
            "enqueued_ops": 0,
            "dropped_jobs": 0,
            "committed_jobs": 0,
            "failed_jobs": 0,
            "vanished_jobs": 0,
            "abandoned_jobs": 0,
            "refused_jobs": 0,
            "held_back": 0,  # flushes skipped because the queue was past queue_hard_depth
            "unencodable": 0,  # operations the encoder could not take (a bug): dropped, not retried
        }
        _managers.add(self)
        if start:
            self.start()

    @classmethod
    def from_env(cls, **overrides: Any) -> PersistenceManager:
        """Build from ``REDIS_URL``, ``DATABASE_URL`` and ``PERTH_*``; keyword arguments override settings."""
        return cls(settings=Settings.from_env(**overrides))

    def start(self) -> None:
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(
                target=self._run, name=f"perth-flusher-{self.origin}", daemon=True
            )
            self._thread.start()

    def __enter__(self) -> PersistenceManager:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- writes: validate, buffer, return. Never I/O, never raise for an outage. ------------

    def create_session(self, session: SessionRecord) -> None:
        self.buffer.put_session(session)

    def update_session(self, session: SessionRecord) -> None:
        self.buffer.put_session(session)

    def _id(self, value: Any, field_name: str) -> UUID:
        try:
            return _uuid(value, field_name)
        except InvalidRecord:
            self.buffer.count_invalid()
            raise

    def touch_session(self, session_id: UUID | str) -> None:
        self.buffer.touch_session(self._id(session_id, "session_id"), datetime.now(UTC))

    def delete_session(self, session_id: UUID | str) -> None:
        self.buffer.delete(SESSION, self._id(session_id, "session_id"))

    def create_tab(self, tab: TabRecord) -> None:
        self.buffer.put_tab(tab)

    def update_tab(self, tab: TabRecord) -> None:
        self.buffer.put_tab(tab)

    def delete_tab(self, tab_id: UUID | str) -> None:
        self.buffer.delete(TAB, self._id(tab_id, "tab_id"))

    def create_pane(self, pane: PaneRecord) -> None:
        self.buffer.put_pane(pane)

    def update_pane(self, pane: PaneRecord) -> None:
        self.buffer.put_pane(pane)

    def delete_pane(self, pane_id: UUID | str) -> None:
        self.buffer.delete(PANE, self._id(pane_id, "pane_id"))

    def append_pane_history(self, chunk: PaneHistoryChunk) -> None:
        self.buffer.append_history(chunk)

    def save_template(self, template: TemplateRecord) -> None:
        self.buffer.put_template(template)

    def delete_template(self, name: str) -> None:
        try:
            verify_template_name(name)
        except InvalidRecord:
            self.buffer.count_invalid()
            raise
        self.buffer.delete(TEMPLATE, name)

    # --- durability and lifecycle ------------------------------------------------------------

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every batch holding the writes made so far has been committed.

        Returns False if that did not happen within ``timeout`` (a backend is down,
        the workers are behind); the writes stay buffered and are delivered later.
        """
        target = self.buffer.seq
        deadline = time.monotonic() + timeout
        with self._cond:
            self._waiters += 1
        self._wake.set()
        try:
            while not self._settled(target):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self._thread is None or not self._thread.is_alive()):
                    return self._settled(target)
                with self._cond:
                    self._cond.wait(min(remaining, 0.05))
            return True
        finally:
            with self._cond:
                self._waiters -= 1

    def _settled(self, target: int) -> bool:
        # One consistent look, under the state lock: a write is marked as being sent (state)
        # before it leaves the buffer, and made dirty again (buffer) before its batch leaves
        # the in-flight set (state); read one after the other, a write could slip between them.
        with self._state:
            if self._sending_min_seq is not None and self._sending_min_seq <= target:
                return False
            if any(job.min_seq <= target for job in self._inflight.values()):
                return False
            unsent = self.buffer.min_unsent_seq()
        return unsent is None or unsent > target

    def close(self, timeout: float = 5.0) -> None:
        """Send what is buffered to the queue (not waiting for workers) and stop the flusher."""
        if self._closed:
            return
        self._closed = True
        self._close_deadline = time.monotonic() + timeout
        self._stop.set()
        self._wake.set()
        _managers.discard(self)
        if self._thread is None:
            self._final_send()  # never started: send from here, within the same deadline
        elif self._thread is not threading.current_thread():
            self._thread.join(max(0.0, timeout))
        if self._thread is not None and self._thread.is_alive():
            # still blocked on a backend: it is a daemon thread and the process may exit; the
            # clients it uses are left to it (closing them here could wait on its lock)
            logger.warning("flusher did not finish within %.1f s; unsent state is dropped", timeout)
            return
        if self._store is not None:
            self._store.close()
        if self._owns_redis:
            with contextlib.suppress(Exception):  # closing a broken connection may fail; it is gone
                self._redis.close()

    def is_available(self) -> bool:
        """Both backends answered recently (Redis within a few seconds, PostgreSQL not known down)."""
        recent = time.monotonic() - self._redis_ok_at < max(5.0, 4 * self.settings.flush_interval)
        return recent and not self._redis_breaker.is_down and self._db_ok is not False

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.buffer.counters)
        out.update(self.counters)
        out.update(self.buffer.gauges())
        with self._state:
            out["inflight_jobs"] = len(self._inflight)
            out["sending"] = self._sending_min_seq is not None  # drained, not yet on the queue
            oldest = next(iter(self._inflight.values()), None)
        out["queue_depth"] = self._queue_depth
        # how far the workers are behind this producer: the age of its oldest batch not yet committed
        out["lag_seconds"] = 0.0 if oldest is None else round(time.monotonic() - oldest.sent_at, 3)
        out["redis_down"] = self._redis_breaker.is_down
        out["database_down"] = self._db_ok is False
        out["origin"] = self.origin
        return out

    # --- the flusher thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._wake.wait(self._interval())
                self._wake.clear()
                if self._stop.is_set():
                    break
                try:
                    self._cycle()
                except Exception:  # the flusher must survive anything; the next cycle retries
                    self._log_cycle_failure()
                with self._cond:
                    self._cond.notify_all()
            self._final_send()
        finally:
            with self._cond:
                self._cond.notify_all()

    def _interval(self) -> float:
        if self._waiters:
            return 0.005
        interval = self.settings.flush_interval
        if self._queue_depth > self.settings.queue_soft_depth:
            # the workers are behind: send less often so that more updates coalesce
            interval *= min(8.0, 1.0 + self._queue_depth / self.settings.queue_soft_depth)
        return interval

    def _log_cycle_failure(self) -> None:
        """A bug, not an outage: logged with its traceback, but not once per flush."""
        self._cycle_failures += 1
        now = time.monotonic()
        if now - self._cycle_failure_logged_at >= _LOG_EVERY:
            self._cycle_failure_logged_at = now
            logger.exception(
                "persistence flusher cycle failed (%d times so far); it goes on",
                self._cycle_failures,
                extra={"failures": self._cycle_failures},
            )

    def _poll_due(self) -> bool:
        """Something to learn from Redis: batches in flight, state to send, a flush waiting; else idle."""
        if self._inflight or self._waiters or self.buffer.has_dirty():
            return True
        return time.monotonic() - self._polled_at >= _IDLE_POLL_EVERY

    def _cycle(self) -> None:
        if self._poll_due() and self._redis_breaker.allow():
            try:
                self._poll()
                self._redis_ok_at = time.monotonic()
                if not self._enqueue_failing:
                    # (reads alone do not prove that writes go through: a Redis at maxmemory
                    # answers reads and refuses writes; then the next send decides)
                    self._redis_breaker.success()
            except _REDIS_ERRORS as exc:
                self._redis_breaker.failure(exc)
        self._check_db()
        self._resolve_routes()
        if self.buffer.has_dirty():
            self._send()

    def _redis_allowed(self) -> bool:
        return not self._redis_breaker.is_down or self._redis_breaker.allow()

    def _can_send(self) -> bool:
        if not self._redis_allowed():
            return False
        if self._db_ok is False:
            return False
        if self._queue_depth >= self.settings.queue_hard_depth:
            return False
        with self._state:
            return len(self._inflight) < self.settings.max_inflight_jobs

    def _send(self, *, deadline: float | None = None, closing: bool = False) -> None:
        for _ in range(_MAX_BATCHES_PER_CYCLE):
            if not self.buffer.has_dirty():
                return
            if self._queue_depth >= self.settings.queue_hard_depth and not closing:
                # backpressure: nothing is dropped, the state stays dirty until the queue drains
                self.counters["held_back"] += 1
                return
            # when closing, the queue is the last chance of what is buffered: it is sent even while
            # PostgreSQL is down or the queue is long (the workers apply it when they can)
            if not (self._redis_allowed() if closing else self._can_send()):
                self.counters["dropped_jobs"] += 1
                return
            if deadline is not None and time.monotonic() > deadline:
                return
            with self._state:
                self._sending_min_seq = 0  # from the drain on, something is in transit: flush() waits
            try:
                drained = self.buffer.drain(self.settings.batch_max_ops)
                if not len(drained):
                    return
                with self._state:
                    self._sending_min_seq = drained.min_seq
                try:
                    batches = self._encode(drained)
                    if batches:
                        self._enqueue(batches)
                except Exception as exc:
                    # not sent: its entities stay dirty (rule 3), whatever went wrong
                    self.buffer.redirty(drained.items, drained.touches, drained.chunks)
                    self.counters["dropped_jobs"] += 1
                    if not isinstance(exc, _REDIS_ERRORS):
                        raise
                    self._enqueue_failing = True
                    self._redis_breaker.failure(exc)
                    return
                else:
                    self._enqueue_failing = False
                    self._redis_breaker.success()
                    self._redis_ok_at = time.monotonic()
            finally:
                with self._state:
                    self._sending_min_seq = None
            if len(drained) < self.settings.batch_max_ops:
                # all that was dirty is sent: what the terminal writes meanwhile waits for the next
                # cycle (and coalesces) instead of going out as a trickle of tiny jobs
                return

    def _encode(self, drained: Drained) -> list[EncodedBatch]:
        try:
            return self._encode_batches(drained)
        except Exception:
            # Something the write calls let through and the encoder cannot take (a bug): sent
            # again and again it would block every flush after it. Encode one by one, drop what
            # fails (counted, logged), send the rest.
            self._log_cycle_failure()
            return self._encode_batches(self._encodable(drained))

    def _encode_batches(self, drained: Drained) -> list[EncodedBatch]:
        return encode_batches(
            drained,
            origin=self.origin,
            max_ops=self.settings.batch_max_ops,
            max_bytes=self.settings.batch_max_bytes,
            compressor=self._compressor,
        )

    def _encodable(self, drained: Drained) -> Drained:
        """What of ``drained`` encodes, operation by operation; the rest is dropped and counted."""
        good = Drained(
            items=[i for i in drained.items if self._encodes(Drained(items=[i]))],
            touches=[t for t in drained.touches if self._encodes(Drained(touches=[t]))],
            chunks=[c for c in drained.chunks if self._encodes(Drained(chunks=[c]))],
        )
        self.counters["unencodable"] += len(drained) - len(good)
        return good

    def _encodes(self, one: Drained) -> bool:
        try:
            self._encode_batches(one)
        except Exception:
            return False
        return True

    def _enqueue(self, batches: list[EncodedBatch]) -> None:
        s = self.settings
        now = time.time()
        # made before the round trip: the items themselves (records, JSON) are not kept in flight;
        # a batch at a time, handing the interpreter to the terminal's threads in between
        receipts = []
        for n, batch in enumerate(batches):
            if n:
                time.sleep(_YIELD)
            receipts.append(Receipt.of(batch.items))
        with self._redis.pipeline(transaction=True) as pipe:
            for n, batch in enumerate(batches):
                if n:  # RQ's Python per job is about 0.1 ms: several batches would be a long stretch
                    time.sleep(_YIELD)
                job = self._queue.create_job(
                    JOB_FUNCTION,
                    job_id=batch.id,
                    description=batch.description,
                    timeout=s.job_timeout,
                    result_ttl=s.result_ttl,
                    failure_ttl=s.failed_ttl,
                    retry=self._retry,
                )
                if isinstance(job, PackedJob):
                    job.use_packed(batch.data, batch.packed)  # compressed once, in encode_batches
                else:
                    job.data = batch.data
                self._queue.enqueue_job(job, pipeline=pipe)
                for session_id in batch.sessions:
                    key = self.keys.outstanding(session_id)
                    pipe.zadd(key, {batch.id: now})
                    pipe.expire(key, s.failed_ttl)
            pipe.execute()
        with self._state:
            sent_at = time.monotonic()
            for batch, receipt in zip(batches, receipts, strict=True):
                self._inflight[batch.id] = _InFlight(
                    batch.id, receipt, batch.touches, batch.chunks, batch.min_seq, sent_at
                )
        self.counters["enqueued_jobs"] += len(batches)
        self.counters["enqueued_ops"] += sum(b.ops for b in batches)

    def _poll(self) -> None:
        """One round trip: the queue depth, PostgreSQL's health and the state of our oldest jobs.

        With many batches in flight (a worker outage) their states are read in pipelines of
        ``_POLL_CHUNK``, yielding in between: building and parsing a pipeline is Python, about
        10 us a command, and 200 at once would keep the interpreter from the terminal for 2 ms.
        """
        self._polled_at = time.monotonic()
        with self._state:
            jobs = list(self._inflight.values())[:_POLL_BATCH]
        first = jobs[:_POLL_CHUNK]
        # RQ asks the server's version (INFO, a large reply parsed in Python) at a queue's first
        # enqueue: learnt here instead, in the round trip the flusher makes anyway at its start,
        # not in the middle of the first batch sent
        learn_version = not self._queue.redis_server_version
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.llen(self._queue.key)
            pipe.hgetall(self.keys.db_health)
            for job in first:
                pipe.hmget(Job.key_for(job.job_id), "status", "last_heartbeat", "meta")
            if learn_version:
                pipe.info("server")
            results = pipe.execute(raise_on_error=False)
        for result in results[: len(first) + 2]:
            if isinstance(result, Exception):
                raise result
        if learn_version:
            self._queue.redis_server_version = _server_version(results[-1])
        self._queue_depth = int(results[0])
        self._note_db_health(db_health_verdict(results[1], ttl=self.settings.health_ttl))
        states = results[2 : 2 + len(first)]
        for start in range(_POLL_CHUNK, len(jobs), _POLL_CHUNK):
            time.sleep(_YIELD)
            with self._redis.pipeline(transaction=False) as pipe:
                for job in jobs[start : start + _POLL_CHUNK]:
                    pipe.hmget(Job.key_for(job.job_id), "status", "last_heartbeat", "meta")
                states.extend(pipe.execute())
        for n, (job, (status, heartbeat, meta)) in enumerate(zip(jobs, states, strict=True)):
            if n and n % _POLL_CHUNK == 0:
                time.sleep(_YIELD)
            self._settle(job, status.decode() if status else None, heartbeat, meta)
        self._resync_log.emit()
        self._refusal_log.emit()
        if time.monotonic() - self._stats_published_at > _STATS_EVERY:
            self._publish_stats()

    def _settle(
        self, job: _InFlight, status: str | None, heartbeat: bytes | None, meta: bytes | None
    ) -> None:
        if status == JobStatus.FINISHED.value:
            self._forget(job)
            if job.receipt.deletes:
                self.buffer.confirm_deletes(job.receipt.deletes)
            self.counters["committed_jobs"] += 1
            return
        if status in LIVE_STATUSES:
            if status == "started" and heartbeat and self._abandoned(heartbeat):
                # the worker stopped heart-beating: do not rest on RQ's registry maintenance alone
                self.counters["abandoned_jobs"] += 1
                self.buffer.redirty_receipt(job.receipt, job.touches, job.chunks)
                self._forget(job)  # after: see _settled
                self._resync_log.note("abandoned by its worker", job.job_id)
            return
        refused = _refusal(meta)
        if refused is not None:
            # the workers refused what this producer sent: sending it again cannot help
            self._forget(job)
            self.counters["refused_jobs"] += 1
            self._refusal_log.note(refused, job.job_id)
            return
        if status is None:
            # Redis lost it (restarted without persistence, or flushed): nothing says it ran
            self.counters["vanished_jobs"] += 1
        else:
            self.counters["failed_jobs"] += 1
        self.buffer.redirty_receipt(job.receipt, job.touches, job.chunks)
        self._forget(job)  # after its writes are dirty again: see _settled
        self._resync_log.note("vanished from Redis" if status is None else f"ended {status}", job.job_id)

    def _abandoned(self, heartbeat: bytes) -> bool:
        try:
            beat = datetime.fromisoformat(heartbeat.decode().replace("Z", "+00:00"))
        except ValueError:
            return False
        if beat.tzinfo is None:
            beat = beat.replace(tzinfo=UTC)
        return (datetime.now(UTC) - beat).total_seconds() > 3 * self.settings.job_lease

    def _forget(self, job: _InFlight) -> None:
        with self._state:
            self._inflight.pop(job.job_id, None)

    def _note_db_health(self, health: DbHealth) -> None:
        """Up if any worker reaches PostgreSQL; down only if every fresh report says so."""
        if health.ok is None:
            return  # no fresh report: _check_db asks PostgreSQL itself
        self._db_reported_at = time.monotonic()
        self._set_db_ok(health.ok, health.error or "reported down by the workers")

    def _set_db_ok(self, ok: bool, error: str) -> None:
        self._db_ok = ok
        if ok:
            self._db_breaker.success()
        elif not self._db_breaker.is_down:
            self._db_breaker.failure(error)

    def _check_db(self) -> None:
        """Without a fresh report from a worker, check PostgreSQL directly, at most every few seconds."""
        now = time.monotonic()
        if now - self._db_reported_at < self.settings.health_ttl:
            return
        if self._store is None:
            self._db_ok = None
            return
        if now - self._db_checked_at < _DB_CHECK_EVERY:
            return
        self._db_checked_at = now
        try:
            self._store.ping()
            self._set_db_ok(True, "")
        except PersistenceError as exc:
            self._set_db_ok(False, str(exc))

    def _resolve_routes(self, *, force: bool = False) -> None:
        """Ask PostgreSQL for the session of tabs and panes this buffer does not hold.

        What waits for a route stays in the buffer, dirty, however long it takes (the parent's
        batch may still be queued behind a backlog): no timer turns a delay into a loss. Memory
        bounds it: held entities count against ``max_entities``, parked scrollback against
        ``max_pending_history_bytes``. Routes come from the rows, or from the tombstones of
        deleted tabs and panes (whose writes are then sent, and judged by version, or moot).
        """
        now = time.monotonic()
        if not force and now - self._route_checked_at < _ROUTE_CHECK_EVERY:
            return
        self._route_checked_at = now
        tab_ids, pane_ids = self.buffer.unrouted()
        if (not tab_ids and not pane_ids) or self._store is None:
            return  # without a database, only the terminal's own writes can tell
        if len(tab_ids) + len(pane_ids) > _ROUTE_LOOKUP_MAX:
            # a long wait behind a backlog: look up a different sample each time
            tab_ids = random.sample(tab_ids, min(len(tab_ids), _ROUTE_LOOKUP_MAX // 2))
            pane_ids = random.sample(pane_ids, min(len(pane_ids), _ROUTE_LOOKUP_MAX // 2))
        try:
            routes = self._store.routes(tab_ids, pane_ids)
        except DatabaseUnavailable:
            return  # unreachable: the health check says so; the writes wait
        except PersistenceError as exc:  # e.g. a database whose schema predates the look-up
            if now - self._route_error_logged_at >= _LOG_EVERY:
                self._route_error_logged_at = now
                logger.warning(
                    "route look-up failed (%s); writes under unknown parents wait. "
                    "Is the schema current? Run `perth-pipeline init-db`",
                    type(exc).__name__,
                    extra={"unrouted_tabs": len(tab_ids), "unrouted_panes": len(pane_ids)},
                )
            return
        # (a pane the database knows only as a tombstone is routed by it, not treated as gone: another
        # terminal may have created it again since, and the workers judge a chunk by its version)
        self.buffer.learn_routes(routes.tabs, routes.panes)

    def _publish_stats(self) -> None:
        """Each producer's counters, for ``status`` and the metrics (expire with the producer)."""
        self._stats_published_at = time.monotonic()
        stats: dict[str, Any] = {k: v for k, v in self.stats().items() if isinstance(v, int | bool | str)}
        stats["published_at"] = time.time()
        self._redis.set(self.keys.producer(self.origin), json.dumps(stats), ex=_STATS_TTL)

    def _final_send(self) -> None:
        """On close: enqueue what is buffered, until the deadline; never wait for the workers."""
        deadline = getattr(self, "_close_deadline", time.monotonic() + 2.0)
        with contextlib.suppress(Exception):  # a last look for routes; close() returns whatever happens
            self._resolve_routes(force=True)
        while self.buffer.has_dirty() and time.monotonic() < deadline:
            sent = self.counters["enqueued_ops"]
            try:
                self._send(deadline=deadline, closing=True)
            except Exception:  # whatever it is, close() returns; the state stays unsent
                self._log_cycle_failure()
                break
            if self.counters["enqueued_ops"] == sent:
                break  # Redis is down, or nothing sendable is left (ancestors unknown)
        unsent = self.buffer.gauges()
        if unsent["dirty"] or unsent["pending_history_chunks"]:
            logger.warning(
                "closing with unsent state: %d entities, %d scrollback chunks",
                unsent["dirty"],
                unsent["pending_history_chunks"],
                extra=unsent,
            )

    # --- reads (synchronous, from PostgreSQL) ------------------------------------------------------

    def _reads(self) -> Store:
        if self._store is None:
            raise DatabaseUnavailable("no database_url (or DATABASE_URL) is configured for reads")
        return self._store

    def _wait_for_session(self, session_id: UUID, wait: float | None) -> None:
        """Wait (bounded) until every batch already enqueued for the session has been applied."""
        bound = self.settings.read_wait if wait is None else wait
        deadline = time.monotonic() + bound
        key = self.keys.outstanding(session_id)
        delay = 0.005
        while True:
            try:
                members = [
                    m.decode() if isinstance(m, bytes) else str(m) for m in self._redis.zrange(key, 0, -1)
                ]
                if not members:
                    return
                with self._redis.pipeline(transaction=False) as pipe:
                    for job_id in members:
                        pipe.hget(Job.key_for(job_id), "status")
                    statuses = pipe.execute()
                pending = [
                    m for m, st in zip(members, statuses, strict=True) if st and st.decode() in LIVE_STATUSES
                ]
                done = [m for m in members if m not in pending]
                if done:
                    self._redis.zrem(key, *done)
            except redis.RedisError as exc:
                logger.warning("cannot see the queue (%s); reading session %s as it is", exc, session_id)
                return
            if not pending:
                return
            if time.monotonic() >= deadline:
                logger.warning(
                    "session %s may be stale: %d of its batches are still queued after %.1f s",
                    session_id,
                    len(pending),
                    bound,
                    extra={"session_id": str(session_id), "pending_batches": len(pending)},
                )
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def restore_session(self, session_id: UUID | str, *, wait: float | None = None) -> SessionRecord:
        sid = _uuid(session_id, "session_id")
        self._wait_for_session(sid, wait)
        found = self._reads().session(sid)
        if found is None:
            raise NotFound(f"session {sid} is not stored (or was deleted)")
        record, version = found
        self.buffer.observe_version(version)
        return record

    def restore_session_tree(
        self, session_id: UUID | str, *, wait: float | None = None, with_history: bool = True
    ) -> SessionTree:
        """The session, its tabs, their panes and (unless told not to) their scrollback, at once.

        What :meth:`restore_session`, :meth:`restore_tabs`, :meth:`restore_panes` of each tab and
        :meth:`restore_pane_history` of each pane give, waiting once (bounded, as they do) for the
        session's queued batches, then read in one snapshot of the database and a few round trips
        instead of two or three per pane. ``NotFound`` if the session is absent or deleted.
        """
        sid = _uuid(session_id, "session_id")
        self._wait_for_session(sid, wait)
        found = self._reads().session_tree(sid, with_history=with_history)
        if found is None:
            raise NotFound(f"session {sid} is not stored (or was deleted)")
        tree, version = found
        self.buffer.observe_version(version)
        self.buffer.learn_routes(
            tabs={tab.id: sid for tab in tree.tabs},
            panes={pane.id: (tab_id, sid) for tab_id, panes in tree.panes.items() for pane in panes},
        )
        return tree

    def restore_tabs(self, session_id: UUID | str, *, wait: float | None = None) -> list[TabRecord]:
        sid = _uuid(session_id, "session_id")
        self._wait_for_session(sid, wait)
        rows = self._reads().tabs(sid)
        for _, version in rows:
            self.buffer.observe_version(version)
        self.buffer.learn_routes(tabs={tab.id: tab.session_id for tab, _ in rows})
        return [tab for tab, _ in rows]

    def restore_panes(self, tab_id: UUID | str, *, wait: float | None = None) -> list[PaneRecord]:
        tid = _uuid(tab_id, "tab_id")
        store = self._reads()
        session_id = store.session_of_tab(tid)
        if session_id is not None:
            self._wait_for_session(session_id, wait)
        rows = store.panes(tid)
        for _, version in rows:
            self.buffer.observe_version(version)
        if session_id is not None:
            self.buffer.learn_routes(
                tabs={tid: session_id}, panes={pane.id: (tid, session_id) for pane, _ in rows}
            )
        return [pane for pane, _ in rows]

    def restore_pane_history(self, pane_id: UUID | str, *, wait: float | None = None) -> bytes:
        pid = _uuid(pane_id, "pane_id")
        store = self._reads()
        route = store.route_of_pane(pid)
        if route is not None:
            self._wait_for_session(route[1], wait)
            self.buffer.learn_routes(panes={pid: route})
        return store.history(pid)

    def list_sessions(self) -> list[SessionRecord]:
        rows = self._reads().sessions()
        for _, version in rows:
            self.buffer.observe_version(version)
        return [session for session, _ in rows]

    def get_template(self, name: str) -> TemplateRecord:
        found = self._reads().template(name)
        if found is None:
            raise NotFound(f"template {name!r} is not stored (or was deleted)")
        record, version = found
        self.buffer.observe_version(version)
        return record

    def list_templates(self) -> list[TemplateRecord]:
        rows = self._reads().templates()
        for _, version in rows:
            self.buffer.observe_version(version)
        return [template for template, _ in rows]
