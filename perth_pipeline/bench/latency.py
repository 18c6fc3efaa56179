"""Case 1: what one write call costs the terminal, with Redis healthy, paused, refused and PostgreSQL stopped.

The producer runs on throwaway servers of the benchmark's own (the faults are
real: ``CLIENT PAUSE``, a stopped ``redis-server``, a stopped PostgreSQL) with
its flusher running at the default interval and no worker anywhere. The caller
makes ``update_pane`` calls in bursts, one burst per millisecond, sleeping in
between as a terminal's thread does while it waits for input. Two things are
measured per condition:

* the call: ``perf_counter_ns`` around each write call;
* the wake-up: how late the caller runs after each sleep. A thread that sleeps
  must get the interpreter back when it wakes; if the flusher kept the GIL for a
  long stretch, this is where it shows (CPython lets a waiting thread force a
  switch only after ``sys.getswitchinterval()``, 5 ms). Its floor is the
  kernel's timer slack (about 50 us). On a busy machine it also holds the time
  the thread waited for a CPU; the kernel counts that wait per thread
  (``/proc/thread-self/schedstat``), and the lateness less that wait is the
  ``gil_wait``: the time the caller waited for the interpreter lock.

A control run first makes the same calls to a function that does nothing, with
no producer at all: the floor of this machine at that moment.

Beside it, the naive producer: ``Queue.enqueue`` of one job per call on a
redis-py client with its defaults.
"""

from __future__ import annotations

import gc
import os
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from rq import Queue
from rq.serializers import JSONSerializer

from perth_pipeline import PaneRecord, PersistenceManager
from perth_pipeline.settings import Settings
from perth_pipeline.store import Store

from ..testing import ThrowawayPostgres, ThrowawayRedis
from .naive import FUNCTION as NAIVE_FUNCTION
from .naive import naive_row
from .stats import percentiles, ratio
from .workload import Tree, write_tree

__all__ = ["CONDITIONS", "LatencyConfig", "run_latency"]

CONDITIONS = ("healthy", "redis_paused", "redis_refused", "postgres_stopped")

_STATS = ("submitted", "coalesced", "enqueued_jobs", "enqueued_ops", "dropped_jobs", "resynced")


@dataclass(frozen=True, slots=True)
class LatencyConfig:
    calls: int = 100_000
    per_tick: int = 20  # calls per 1 ms burst: 20,000 calls a second
    naive_calls: int = 5_000
    pause_ms: int = 3_000
    conditions: tuple[str, ...] = CONDITIONS


class _RunQueue:
    """Nanoseconds a thread (this one by default) has spent runnable but not running (Linux schedstat)."""

    def __init__(self, native_id: int | None = None) -> None:
        task = "thread-self" if native_id is None else f"self/task/{native_id}"
        path = f"/proc/{task}/schedstat"
        try:
            self.fd: int | None = os.open(path, os.O_RDONLY)
        except OSError:
            self.fd = None

    def waited(self) -> int:
        if self.fd is None:
            return 0
        return int(os.pread(self.fd, 128, 0).split()[1])

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)


@dataclass(slots=True)
class Paced:
    """What :func:`paced_calls` measured, in nanoseconds."""

    calls: array[int]  # each write call
    lateness: array[int]  # each wake-up after a sleep, past its target
    gil_wait: array[int]  # the same, less the time the thread waited for a CPU (not the interpreter)
    corrected: bool  # whether the run-queue wait was known (Linux schedstat)
    #: ``gil_wait`` less the time the other thread (the flusher) itself waited for a CPU meanwhile:
    #: a thread preempted while it holds the interpreter lock makes the caller wait too, and that
    #: wait is the machine's, not a stretch of the flusher's work (a diagnostic, an upper bound
    #: of the correction: the flusher may have waited for a CPU while not holding the lock)
    gil_wait_holder_running: array[int] = field(default_factory=lambda: array("q"))


def paced_calls(
    call: Callable[[Any], None], records: list[Any], per_tick: int, *, other_thread: int | None = None
) -> Paced:
    """Call ``call`` on every record, ``per_tick`` calls per millisecond, sleeping in between.

    The wake-up lateness is split with the kernel's per-thread scheduling statistics: the part
    spent runnable but not running is the machine's (other processes on the CPUs); what is left
    is the wait for the interpreter lock (and the timer slack).
    """
    clock = time.perf_counter_ns
    sleep = time.sleep
    runqueue = _RunQueue()
    other = _RunQueue(other_thread) if other_thread is not None else None
    holder_running: array[int] = array("q")
    latencies = array("q", bytes(8 * len(records)))
    lateness: array[int] = array("q")
    gil_wait: array[int] = array("q")
    tick = 1_000_000
    target = clock() + tick
    i, n = 0, len(records)
    while i < n:
        now = clock()
        if now < target:
            waited = runqueue.waited()
            other_waited = other.waited() if other is not None else 0
            sleep((target - now) / 1e9)
            late = clock() - target
            lateness.append(late)
            wait = max(0, late - (runqueue.waited() - waited))
            gil_wait.append(wait)
            if other is not None:
                holder_running.append(max(0, wait - (other.waited() - other_waited)))
        end = min(n, i + per_tick)
        while i < end:
            t0 = clock()
            call(records[i])
            latencies[i] = clock() - t0
            i += 1
        target += tick
        now = clock()
        if target < now:  # behind schedule (a stall): start again from now rather than rush
            target = now + tick
    corrected = runqueue.fd is not None
    runqueue.close()
    if other is not None:
        other.close()
    return Paced(latencies, lateness, gil_wait, corrected, holder_running)


def _naive_calls(
    url: str, queue: str, rows: list[dict[str, Any]], *, budget_s: float, limit: int
) -> dict[str, Any]:
    """``Queue.enqueue`` per call, on a client with redis-py's defaults (as a naive producer has it)."""
    client = redis.Redis.from_url(url)
    q = Queue(
        queue, connection=client, serializer=JSONSerializer
    )  # never pickle (see perth_pipeline.bench.naive)
    samples: list[int] = []
    errors = 0
    started = time.monotonic()
    try:
        for row in rows[:limit]:
            t0 = time.perf_counter_ns()
            try:
                q.enqueue(NAIVE_FUNCTION, row)
            except redis.RedisError:
                errors += 1
            samples.append(time.perf_counter_ns() - t0)
            if time.monotonic() - started > budget_s:
                break
    finally:
        client.close()
    return {**percentiles(samples, 1000.0), "errors": errors}


class _GcPauses:
    """The collector's pauses while the calls run, by generation (in whichever thread they ran)."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses[info["generation"]].append(time.perf_counter() - self._started)

    def __enter__(self) -> _GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self) -> dict[str, Any]:
        return {
            f"gen{g}": {"count": len(p), "max_ms": round(max(p, default=0.0) * 1000, 2)}
            for g, p in self.pauses.items()
        }


def _wait(predicate: Callable[[], bool], timeout: float) -> float | None:
    """Seconds until ``predicate()`` held, or None if it did not within ``timeout``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            return None
        time.sleep(0.01)
    return time.monotonic() - started


class _Condition:
    def __init__(self, name: str, r: ThrowawayRedis, pg: ThrowawayPostgres, cfg: LatencyConfig) -> None:
        self.name, self.r, self.pg, self.cfg = name, r, pg, cfg

    def producer_on(self, manager: PersistenceManager) -> None:
        if self.name == "redis_paused":
            self.r.pause(self.cfg.pause_ms)
        elif self.name == "redis_refused":
            self.r.stop()
        elif self.name == "postgres_stopped":
            self.pg.stop()
            # no worker reports PostgreSQL's health: the producer checks it itself, every few seconds
            if _wait(lambda: bool(manager.stats()["database_down"]), 30.0) is None:
                raise RuntimeError("the producer did not notice that PostgreSQL stopped within 30 s")

    def naive_on(self) -> None:
        if self.name == "redis_paused":
            self.r.pause(self.cfg.pause_ms)
        elif self.name == "redis_refused":
            self.r.stop()
        elif self.name == "postgres_stopped":
            self.pg.stop()  # a naive enqueue does not touch PostgreSQL: stopped all the same

    def off(self) -> None:
        if self.name == "redis_refused" and self.r.proc is None:
            self.r.start()
        elif self.name == "postgres_stopped":
            self.pg.start()


def _producer_run(
    cond: _Condition, tree: Tree, updates: list[PaneRecord], cfg: LatencyConfig, queue: str
) -> dict[str, Any]:
    settings = Settings(redis_url=cond.r.url, database_url=cond.pg.url, queue=queue)
    manager = PersistenceManager(settings=settings)
    try:
        write_tree(manager, tree)
        if _wait(lambda: not manager.buffer.has_dirty() and manager.is_available(), 60.0) is None:
            raise RuntimeError(f"the producer did not send its first batches: {manager.stats()}")
        cond.producer_on(manager)
        started = time.monotonic()
        with _GcPauses() as gc_pauses:
            flusher = manager._flusher.thread  # the benchmark's own look inside: the thread it competes with
            paced = paced_calls(
                manager.update_pane,
                updates,
                cfg.per_tick,
                other_thread=flusher.native_id if flusher is not None else None,
            )
        elapsed = time.monotonic() - started
        cond.off()
        resync = _wait(lambda: not manager.buffer.has_dirty() and manager.is_available(), 90.0)
        stats = manager.stats()
    finally:
        manager.close(timeout=2.0)
    return {
        "calls": {**percentiles(paced.calls, 1000.0), "seconds": round(elapsed, 2)},
        "wakeup_lateness": percentiles(paced.lateness, 1000.0),
        "gil_wait": {**percentiles(paced.gil_wait, 1000.0), "corrected": paced.corrected},
        "gil_wait_holder_running": percentiles(paced.gil_wait_holder_running, 1000.0)
        if len(paced.gil_wait_holder_running)
        else None,
        "resync_s": None if resync is None else round(resync, 2),
        "stats": {k: stats[k] for k in _STATS},
        "gc": gc_pauses.summary(),
        "inflight_jobs_at_end": stats["inflight_jobs"],
    }


def _naive_run(
    cond: _Condition, rows: list[dict[str, Any]], cfg: LatencyConfig, queue: str
) -> dict[str, Any]:
    cond.naive_on()
    try:
        if cond.name == "redis_paused":
            budget, limit = cfg.pause_ms / 1000 + 0.5, cfg.naive_calls
        elif cond.name == "redis_refused":
            budget, limit = 5.0, 3  # each call retries for seconds
        else:
            budget, limit = 60.0, cfg.naive_calls
        return _naive_calls(cond.r.url, queue, rows, budget_s=budget, limit=limit)
    finally:
        cond.off()


def run_latency(
    tree: Tree,
    updates: list[PaneRecord],
    cfg: LatencyConfig,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Every condition of ``cfg``: the producer's calls, its wake-up lateness, the naive calls, ratios."""
    sessions = tree.session_of_pane()
    naive_rows = [naive_row(u, sessions[u.id], n + 1) for n, u in enumerate(updates[: cfg.naive_calls])]
    results: dict[str, Any] = {
        "setup": {
            "calls_per_condition": len(updates),
            "calls_per_second": cfg.per_tick * 1000,
            "working_set_panes": len(tree.panes),
            "flush_interval_s": Settings().flush_interval,
            "pause_ms": cfg.pause_ms,
            "gc": "records built first, then gc.freeze()",
        }
    }
    progress(f"latency: control: {len(updates):,} calls of a function that does nothing, no producer")
    control = paced_calls(_nothing, updates, cfg.per_tick)
    results["control"] = {
        "calls": percentiles(control.calls, 1000.0),
        "wakeup_lateness": percentiles(control.lateness, 1000.0),
        "gil_wait": {**percentiles(control.gil_wait, 1000.0), "corrected": control.corrected},
    }
    with ThrowawayRedis() as r, ThrowawayPostgres() as pg:
        store = Store(pg.url)
        try:
            store.init_db()
        finally:
            store.close()
        for n, name in enumerate(cfg.conditions):
            cond = _Condition(name, r, pg, cfg)
            progress(f"latency: {name}: {len(updates):,} write calls with the flusher running")
            producer = _producer_run(cond, tree, updates, cfg, f"perth-bench-latency-{n}")
            _flushall(r)
            progress(f"latency: {name}: naive Queue.enqueue per call")
            naive = _naive_run(cond, naive_rows, cfg, f"perth-bench-naive-{n}")
            _flushall(r)
            calls = producer["calls"]
            producer["naive"] = naive
            producer["naive_over_producer"] = {k: ratio(naive[k], calls[k]) for k in ("p50", "p99", "max")}
            results[name] = producer
    return results


def _nothing(record: Any) -> None:
    return None


def _flushall(r: ThrowawayRedis) -> None:
    client = r.client()
    try:
        client.flushall()
    finally:
        client.close()
