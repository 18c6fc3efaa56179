"""Case 2b: the workers alone: a queue filled beforehand, drained by N worker processes.

End to end counts the terminal's cost (write calls, encoding, enqueueing on the same cores)
together with the workers'. This case sees the workers apart: the worker processes start and
register, are stopped (SIGSTOP), the producer fills the queue with the batches of the whole tree
and closes, and the workers are let go (SIGCONT); the clock runs from there until the last
batch has finished. The CPU time the worker processes and their PostgreSQL backends spent in
that span (``/proc/PID/stat``, so both must run on this machine) is reported per row committed.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import redis
from rq import Queue
from rq.registry import FailedJobRegistry, FinishedJobRegistry

from perth_pipeline import PersistenceManager
from perth_pipeline.settings import Settings

from .backends import WorkerPool, count_rows, drop_queue, settings_for, truncate, unique_queue
from .cpu import CpuAccount
from .workload import Tree, write_tree

__all__ = ["run_drain"]

_DRAIN_TIMEOUT = 600.0


def _fill(settings: Settings, tree: Tree) -> int:
    """Every row of ``tree`` on the queue as batches; the number of jobs enqueued.

    Counted by the producer, not by the queue's length: a worker that was blocked in its pop
    when stopped is handed one job by Redis all the same (it runs it once let go).
    """
    manager = PersistenceManager(settings=settings)
    try:
        write_tree(manager, tree)
    finally:
        manager.close(timeout=_DRAIN_TIMEOUT)  # sends what is buffered to the queue, waits for no worker
    stats = manager.stats()
    if stats["dropped_jobs"] or stats["enqueued_ops"] != stats["submitted"] - stats["coalesced"]:
        raise RuntimeError(f"worker only: the queue was not filled with every write: {stats}")
    return int(stats["enqueued_jobs"])


def _wait_drained(settings: Settings, jobs: int) -> float:
    client = redis.Redis.from_url(settings.redis_url or "", socket_timeout=30)
    try:
        queue = Queue(settings.queue, connection=client)
        finished, failed = FinishedJobRegistry(queue=queue), FailedJobRegistry(queue=queue)
        deadline = time.monotonic() + _DRAIN_TIMEOUT
        while True:
            done = finished.count + failed.count
            if done >= jobs:
                if failed.count:
                    raise RuntimeError(f"worker only: {failed.count} batch(es) failed")
                return time.perf_counter()
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker only: {done} of {jobs} batches done in {_DRAIN_TIMEOUT:.0f} s")
            time.sleep(0.005)
    finally:
        client.close()


def run_drain(base: Settings, tree: Tree, workers: int, log_dir: Path) -> dict[str, Any]:
    """``tree``'s batches, enqueued beforehand, applied by ``workers`` worker processes."""
    database_url = base.database_url or ""
    truncate(database_url)
    settings = settings_for(base, unique_queue(f"drain{workers}"))
    try:
        with WorkerPool(settings, workers, log_dir=log_dir) as pool:
            pids = [p.pid for p in pool.procs]
            account = CpuAccount(database_url, settings.redis_url, worker_pids=pids)
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            try:
                jobs = _fill(settings, tree)
                account.start()
            finally:
                for pid in pids:
                    os.kill(pid, signal.SIGCONT)
            started = time.perf_counter()
            ended = _wait_drained(settings, jobs)
            account.stop()
    finally:
        drop_queue(settings.redis_url or "", settings.queue)
    rows = count_rows(database_url)
    expected = {"sessions": len(tree.sessions), "tabs": len(tree.tabs), "panes": len(tree.panes)}
    if rows != expected:
        raise RuntimeError(f"worker only with {workers} worker(s): rows {rows} != {expected}")
    total = sum(rows.values())
    elapsed = ended - started
    cpu = account.per_row(total)
    return {
        "workers": workers,
        "rows": total,
        "jobs": jobs,
        "seconds": round(elapsed, 3),
        "rows_per_s": round(total / elapsed, 1),
        "rows_per_s_per_worker": round(total / elapsed / workers, 1),
        "worker_cpu_us_per_row": cpu["workers"],
        "backend_cpu_us_per_row": cpu["backends"],
        "redis_cpu_us_per_row": cpu["redis"],
    }
