"""Cases 2 and 3: rows committed per second, beside the ceiling and the naive design, in one run.

* End to end: from the first write call to the last row committed (the producer's
  ``flush()`` returning True: every batch FINISHED), with 1 and 2 worker processes
  started (and registered) beforehand.
* Hot key: updates of a few panes, many times each; coalescing decides the rows written.
* The ceiling: the same pane rows as PostgreSQL takes them fastest from one Python
  connection: ``COPY`` into a temporary table and one ``INSERT ... SELECT ... ON
  CONFLICT`` merge, in one transaction.
* The naive design: one RQ job per operation, one statement per row, a stock
  ``SimpleWorker`` (``perth_pipeline.bench.naive``), on a sample.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import redis
from rq import Queue
from rq.serializers import JSONSerializer

from perth_pipeline import PaneRecord, PersistenceManager
from perth_pipeline.settings import Settings

from .backends import WorkerPool, count_rows, drop_queue, queries, settings_for, truncate, unique_queue
from .cpu import CpuAccount
from .naive import FUNCTION as NAIVE_FUNCTION
from .naive import naive_row
from .workload import Tree, write_tree

__all__ = ["run_ceiling", "run_end_to_end", "run_hot_key", "run_naive"]

_STATS = ("submitted", "coalesced", "enqueued_jobs", "enqueued_ops", "committed_jobs", "dropped_jobs")
_COMMIT_TIMEOUT = 600.0
_CEILING_APP = "perth-bench-ceiling"


def run_end_to_end(base: Settings, tree: Tree, workers: int, log_dir: Path) -> dict[str, Any]:
    """``tree`` written through the producer and committed by ``workers`` worker processes."""
    database_url = base.database_url or ""
    truncate(database_url)
    settings = settings_for(base, unique_queue(f"e2e{workers}"))
    try:
        with WorkerPool(settings, workers, log_dir=log_dir) as pool:
            account = CpuAccount(database_url, settings.redis_url, worker_pids=[p.pid for p in pool.procs])
            manager = PersistenceManager(settings=settings)
            try:
                account.start()
                started = time.perf_counter()
                write_tree(manager, tree)
                calls_done = time.perf_counter()
                committed = manager.flush(timeout=_COMMIT_TIMEOUT)
                elapsed = time.perf_counter() - started
                account.stop()
                stats = manager.stats()
            finally:
                manager.close(timeout=5.0)
    finally:
        drop_queue(settings.redis_url or "", settings.queue)
    rows = count_rows(database_url)
    expected = {"sessions": len(tree.sessions), "tabs": len(tree.tabs), "panes": len(tree.panes)}
    if not committed or rows != expected:
        raise RuntimeError(
            f"end to end with {workers} worker(s): committed={committed}, rows {rows} != {expected}"
        )
    total = sum(rows.values())
    return {
        "workers": workers,
        "rows": total,
        "seconds": round(elapsed, 3),
        "rows_per_s": round(total / elapsed, 1),
        "write_calls_s": round(calls_done - started, 3),
        "stats": {k: stats[k] for k in _STATS},
        # producer: this process (the caller's write calls and the flusher thread)
        "cpu_us_per_row": account.per_row(total),
    }


def run_hot_key(base: Settings, tree: Tree, updates: list[PaneRecord], log_dir: Path) -> dict[str, Any]:
    """Many updates of a few panes (created and committed first): what coalescing saves."""
    database_url = base.database_url or ""
    truncate(database_url)
    settings = settings_for(base, unique_queue("hot"))
    try:
        with WorkerPool(settings, 1, log_dir=log_dir):
            manager = PersistenceManager(settings=settings)
            try:
                write_tree(manager, tree)
                if not manager.flush(timeout=_COMMIT_TIMEOUT):
                    raise RuntimeError("hot key: the panes were not committed")
                before = manager.stats()
                started = time.perf_counter()
                for record in updates:
                    manager.update_pane(record)
                calls_done = time.perf_counter()
                committed = manager.flush(timeout=_COMMIT_TIMEOUT)
                elapsed = time.perf_counter() - started
                after = manager.stats()
            finally:
                manager.close(timeout=5.0)
    finally:
        drop_queue(settings.redis_url or "", settings.queue)
    latest = {u.id: u.title for u in updates}
    with psycopg.connect(database_url, autocommit=True) as conn:
        stored: dict[Any, Any] = dict(conn.execute("SELECT id, title FROM panes").fetchall())
    if not committed or any(stored.get(k) != v for k, v in latest.items()):
        raise RuntimeError("hot key: the stored titles are not the latest ones written")
    ops = after["enqueued_ops"] - before["enqueued_ops"]
    return {
        "updates": len(updates),
        "panes": len(latest),
        "workers": 1,
        "seconds": round(elapsed, 3),
        "updates_per_s": round(len(updates) / elapsed, 1),
        "write_calls_s": round(calls_done - started, 3),
        "ops_enqueued": ops,
        "coalesced": after["coalesced"] - before["coalesced"],
        "jobs": after["enqueued_jobs"] - before["enqueued_jobs"],
        "rows_written_per_update": round(ops / len(updates), 4),
    }


def _ceiling_rows(tree: Tree) -> list[tuple[Any, ...]]:
    session_of = tree.session_of_pane()
    return [
        (
            p.id,
            p.tab_id,
            p.pane_id,
            p.pane_type,
            json.dumps(p.component_state),
            p.title,
            p.cwd,
            p.command,
            session_of[p.id],
            n + 1,
            "ceiling",
        )
        for n, p in enumerate(tree.panes)
    ]


def run_ceiling(database_url: str, tree: Tree) -> dict[str, Any]:
    """The same pane rows through one connection: COPY into a temporary table, one merge, one commit."""
    truncate(database_url)
    rows = _ceiling_rows(tree)
    q = queries()
    account = CpuAccount(database_url, None, application_name=_CEILING_APP)
    with psycopg.connect(database_url, application_name=_CEILING_APP) as conn:
        conn.execute(q["ceiling_stage"].encode())
        conn.commit()
        account.start()
        started = time.perf_counter()
        with conn.transaction(), conn.cursor() as cur:
            with cur.copy(q["ceiling_copy"].encode()) as copy:
                for row in rows:
                    copy.write_row(row)
            cur.execute(q["ceiling_merge"].encode())
            merged = cur.rowcount
        elapsed = time.perf_counter() - started
        account.stop()
    if merged != len(rows):
        raise RuntimeError(f"ceiling: merged {merged} of {len(rows)} rows")
    cpu = account.per_row(len(rows))
    return {
        "rows": len(rows),
        "seconds": round(elapsed, 3),
        "rows_per_s": round(len(rows) / elapsed, 1),
        # the client (this process) and its backend
        "cpu_us_per_row": {"client": cpu["producer"], "backend": cpu["backends"]},
    }


def run_naive(base: Settings, tree: Tree, sample: int, log_dir: Path) -> dict[str, Any]:
    """One RQ job per pane (stock ``SimpleWorker``, JSON), one statement per row, on ``sample`` panes."""
    database_url = base.database_url or ""
    truncate(database_url)
    settings = settings_for(base, unique_queue("naive"))
    session_of = tree.session_of_pane()
    rows = [naive_row(p, session_of[p.id], n + 1) for n, p in enumerate(tree.panes[:sample])]
    command = [sys.executable, "-m", "perth_pipeline.bench.naive", settings.queue]
    client = redis.Redis.from_url(settings.redis_url or "")
    try:
        with WorkerPool(settings, 1, log_dir=log_dir, command=command):
            queue = Queue(settings.queue, connection=client, serializer=JSONSerializer)
            started = time.perf_counter()
            for row in rows:
                queue.enqueue(NAIVE_FUNCTION, row)
            enqueued = time.perf_counter()
            _wait_for_count(database_url, len(rows), timeout=max(120.0, sample * 0.1))
            elapsed = time.perf_counter() - started
    finally:
        client.close()
        drop_queue(settings.redis_url or "", settings.queue)
    return {
        "ops": len(rows),
        "seconds": round(elapsed, 3),
        "ops_per_s": round(len(rows) / elapsed, 1),
        "enqueue_s": round(enqueued - started, 3),
    }


def _wait_for_count(database_url: str, expected: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with psycopg.connect(database_url, autocommit=True) as conn:
        count_panes = queries()["count_panes"].encode()
        while True:
            row = conn.execute(count_panes).fetchone()
            if row is not None and int(row[0]) >= expected:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"naive: {row} of {expected} rows after {timeout:.0f} s")
            time.sleep(0.02)
