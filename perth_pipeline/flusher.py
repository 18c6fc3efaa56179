"""The flusher thread: it sends the buffer's dirty state to the queue as RQ jobs.

One thread per producer wakes every ``flush_interval`` (every 5 ms while a ``flush()`` waits,
less often while the workers are behind, so that more updates coalesce), ticks its periodic
tasks (:mod:`perth_pipeline.tasks`: the poll, PostgreSQL's health, route look-ups, stats) and
sends what is dirty, in batches of at most ``batch_max_ops``.

Rules kept here:

* What is not sent stays dirty (rule 3), whatever went wrong: a failed encode or enqueue makes
  the drained writes dirty again before the being-sent mark is cleared (see
  :mod:`perth_pipeline.inflight` for why that order matters to ``flush()``).
* Backpressure never drops: past ``queue_hard_depth`` nothing is sent and the state stays
  dirty until the queue drains. While PostgreSQL is known down or ``max_inflight_jobs`` batches
  are in flight, nothing is sent either. On close, the queue is the last chance of what is
  buffered: it is sent whatever PostgreSQL's health or the queue's length, until the deadline.
* The flusher survives anything: a cycle that fails is logged (with its traceback, at most
  every 30 s: it is a bug, not an outage) and the next one retries. An operation the encoder
  cannot take is dropped and counted rather than block every later flush.
* It keeps the interpreter from the terminal's threads for short stretches only: it yields
  between the batches it builds and enqueues (RQ's Python is about 0.1 ms per job).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
import zstandard
from rq import Queue
from rq.job import Retry

from .batch import JOB_FUNCTION, EncodedBatch, PackedJob, encode_batches
from .broker import Keys
from .buffer import Buffer, Drained, Receipt
from .health import BackendHealth
from .inflight import LOG_EVERY, InFlightTracker
from .masking import masked_logger
from .settings import Settings
from .store import Store
from .tasks import REDIS_ERRORS, YIELD, DbCheckTask, PollTask, RouteTask, StatsTask

__all__ = ["Flusher"]

logger = masked_logger("perth_pipeline.producer")

_MAX_BATCHES_PER_CYCLE = 16


class Flusher:
    """The thread, its loop and the sends. Counts into the producer's ``counters``."""

    def __init__(
        self,
        *,
        settings: Settings,
        origin: str,
        keys: Keys,
        buffer: Buffer,
        counters: dict[str, int],
        tracker: InFlightTracker,
        health: BackendHealth,
        redis_client: redis.Redis,
        queue: Queue,
        store: Store | None,
        stats: Callable[[], dict[str, Any]],
    ) -> None:
        self.settings = settings
        self.origin = origin
        self.keys = keys
        self.buffer = buffer
        self.counters = counters
        self.tracker = tracker
        self.health = health
        self.redis = redis_client
        self.queue = queue
        self.store = store
        self.stats = stats
        self._retry = Retry(max=len(settings.retry_intervals), interval=list(settings.retry_intervals))
        self._compressor = zstandard.ZstdCompressor(level=settings.zstd_level)
        self._cycle_failures = 0
        self._cycle_failure_logged_at = -LOG_EVERY
        self.poll_task = PollTask(self)
        self.stats_task = StatsTask(self)
        self.db_check_task = DbCheckTask(self)
        self.route_task = RouteTask(self)
        self.waiters = 0
        self._cond = threading.Condition(threading.Lock())
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._deadline: float | None = None
        self.thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self.thread is None and not self._stop.is_set():
            self.thread = threading.Thread(target=self._run, name=f"perth-flusher-{self.origin}", daemon=True)
            self.thread.start()

    def stop(self, timeout: float) -> bool:
        """Send what is buffered (until ``timeout``) and stop; False if the thread is still running."""
        self._deadline = time.monotonic() + timeout
        self._stop.set()
        self._wake.set()
        if self.thread is None:
            self._final_send()  # never started: send from here, within the same deadline
        elif self.thread is not threading.current_thread():
            self.thread.join(max(0.0, timeout))
        return self.thread is None or not self.thread.is_alive()

    def wait(self, done: Callable[[], bool], timeout: float) -> bool:
        """Wake the flusher (every 5 ms while anyone waits) until ``done()``, within ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self.waiters += 1
        self._wake.set()
        try:
            while not done():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.thread is None or not self.thread.is_alive()):
                    return done()
                with self._cond:
                    self._cond.wait(min(remaining, 0.05))
            return True
        finally:
            with self._cond:
                self.waiters -= 1

    # --- the loop ----------------------------------------------------------------------------------

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
                    self.log_cycle_failure()
                with self._cond:
                    self._cond.notify_all()
            self._final_send()
        finally:
            with self._cond:
                self._cond.notify_all()

    def _interval(self) -> float:
        if self.waiters:
            return 0.005
        interval = self.settings.flush_interval
        depth, soft = self.health.queue_depth, self.settings.queue_soft_depth
        if depth > soft:
            # the workers are behind: send less often so that more updates coalesce
            interval *= min(8.0, 1.0 + depth / soft)
        return interval

    def log_cycle_failure(self) -> None:
        """A bug, not an outage: logged with its traceback, but not once per flush."""
        self._cycle_failures += 1
        now = time.monotonic()
        if now - self._cycle_failure_logged_at >= LOG_EVERY:
            self._cycle_failure_logged_at = now
            logger.exception(
                "persistence flusher cycle failed (%d times so far); it goes on",
                self._cycle_failures,
                extra={"failures": self._cycle_failures},
            )

    def _cycle(self) -> None:
        self.poll_task.tick()
        self.db_check_task.tick()
        self.route_task.tick()
        if self.buffer.has_dirty():
            self._send()

    def _final_send(self) -> None:
        """On close: enqueue what is buffered, until the deadline; never wait for the workers."""
        deadline = self._deadline if self._deadline is not None else time.monotonic() + 2.0
        with contextlib.suppress(Exception):  # a last look for routes; close() returns whatever happens
            self.route_task.run(self)
        while self.buffer.has_dirty() and time.monotonic() < deadline:
            sent = self.counters["enqueued_ops"]
            try:
                self._send(deadline=deadline, closing=True)
            except Exception:  # whatever it is, close() returns; the state stays unsent
                self.log_cycle_failure()
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

    # --- sending -----------------------------------------------------------------------------------

    def _can_send(self) -> bool:
        return self.health.may_send() and self.tracker.has_room(self.settings.max_inflight_jobs)

    def _send(self, *, deadline: float | None = None, closing: bool = False) -> None:
        for _ in range(_MAX_BATCHES_PER_CYCLE):
            if not self.buffer.has_dirty():
                return
            if self.health.queue_depth >= self.settings.queue_hard_depth and not closing:
                # backpressure: nothing is dropped, the state stays dirty until the queue drains
                self.counters["held_back"] += 1
                return
            # when closing, the queue is the last chance of what is buffered: it is sent even while
            # PostgreSQL is down or the queue is long (the workers apply it when they can)
            if not (self.health.redis_allowed() if closing else self._can_send()):
                self.counters["dropped_jobs"] += 1
                return
            if deadline is not None and time.monotonic() > deadline:
                return
            self.tracker.begin_send()  # from the drain on, something is in transit: flush() waits
            try:
                drained = self.buffer.drain(self.settings.batch_max_ops)
                if not len(drained):
                    return
                self.tracker.sending(drained.min_seq)
                try:
                    batches = self._encode(drained)
                    if batches:
                        self._enqueue(batches)
                except Exception as exc:
                    # not sent: its entities stay dirty (rule 3), whatever went wrong
                    self.buffer.redirty(drained.items, drained.touches, drained.chunks)
                    self.counters["dropped_jobs"] += 1
                    if not isinstance(exc, REDIS_ERRORS):
                        raise
                    self.health.enqueue_failed(exc)
                    return
                else:
                    self.health.enqueued()
            finally:
                self.tracker.end_send()
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
            self.log_cycle_failure()
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
                time.sleep(YIELD)
            receipts.append(Receipt.of(batch.items))
        with self.redis.pipeline(transaction=True) as pipe:
            for n, batch in enumerate(batches):
                if n:  # RQ's Python per job is about 0.1 ms: several batches would be a long stretch
                    time.sleep(YIELD)
                job = self.queue.create_job(
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
                self.queue.enqueue_job(job, pipeline=pipe)
                for session_id in batch.sessions:
                    key = self.keys.outstanding(session_id)
                    pipe.zadd(key, {batch.id: now})
                    pipe.expire(key, s.failed_ttl)
            pipe.execute()
        self.tracker.add(batches, receipts)
        self.counters["enqueued_jobs"] += len(batches)
        self.counters["enqueued_ops"] += sum(b.ops for b in batches)
