"""Case 4: at a steady rate of write calls, how long until each write is visible in PostgreSQL.

A session of ``panes`` panes is created and committed first. Then the caller
updates them round robin at ``rate`` calls a second (each update carries its
sequence number in the title) while a reader thread polls the session's panes
every ``poll`` seconds. A write is visible once its pane shows that write or a
later one (coalescing may skip the intermediate ones); its freshness is the start
of the first poll that saw it minus the moment of the write call, so polling adds
up to one poll interval.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg

from perth_pipeline import PaneRecord, PersistenceManager
from perth_pipeline.settings import Settings

from .backends import WorkerPool, drop_queue, queries, settings_for, truncate, unique_queue
from .stats import percentiles
from .workload import Tree, write_tree

__all__ = ["freshness_updates", "run_freshness"]

_PREFIX = "fresh-"


def freshness_updates(tree: Tree, count: int) -> list[PaneRecord]:
    """``count`` updates of the tree's panes, round robin, each titled with its sequence number."""
    return [
        tree.panes[n % len(tree.panes)].model_copy(update={"title": f"{_PREFIX}{n}"}) for n in range(count)
    ]


class _Reader(threading.Thread):
    """Polls the panes of one session; records when each write first became visible."""

    def __init__(self, database_url: str, session_id: UUID, updates: list[PaneRecord], poll: float) -> None:
        super().__init__(name="perth-bench-freshness-reader", daemon=True)
        self.database_url, self.session_id, self.poll = database_url, session_id, poll
        self.pending: dict[UUID, deque[int]] = {}
        for n, u in enumerate(updates):
            self.pending.setdefault(u.id, deque()).append(n)
        self.visible_at: dict[int, float] = {}
        self.remaining = len(updates)
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.database_url, autocommit=True) as conn:
                statement = queries()["visible_titles"].encode()
                while not self.stop.is_set() and self.remaining:
                    started = time.perf_counter()
                    for pane_id, title in conn.execute(statement, {"session_id": self.session_id}):
                        if title.startswith(_PREFIX):
                            self._seen(pane_id, int(title[len(_PREFIX) :]), started)
                    time.sleep(max(0.0, self.poll - (time.perf_counter() - started)))
        except BaseException as exc:  # reported by the case, not lost in a thread
            self.error = exc

    def _seen(self, pane_id: UUID, upto: int, at: float) -> None:
        waiting = self.pending.get(pane_id)
        while waiting and waiting[0] <= upto:
            self.visible_at[waiting.popleft()] = at
            self.remaining -= 1


def run_freshness(
    base: Settings, tree: Tree, updates: list[PaneRecord], *, rate: int, log_dir: Path, poll: float = 0.005
) -> dict[str, Any]:
    """``updates`` at ``rate`` calls a second through the producer (default flush interval), 1 worker."""
    database_url = base.database_url or ""
    truncate(database_url)
    settings = settings_for(base, unique_queue("fresh"))
    written_at: list[float] = [0.0] * len(updates)
    try:
        with WorkerPool(settings, 1, log_dir=log_dir):
            manager = PersistenceManager(settings=settings)
            try:
                write_tree(manager, tree)
                if not manager.flush(timeout=60.0):
                    raise RuntimeError("freshness: the panes were not committed")
                reader = _Reader(database_url, tree.sessions[0].id, updates, poll)
                reader.start()
                interval = 1.0 / rate
                started = time.perf_counter()
                for n, record in enumerate(updates):
                    target = started + n * interval
                    now = time.perf_counter()
                    if now < target:
                        time.sleep(target - now)
                    written_at[n] = time.perf_counter()
                    manager.update_pane(record)
                elapsed = time.perf_counter() - started
                reader.join(timeout=60.0)
                reader.stop.set()
                reader.join(timeout=5.0)
            finally:
                manager.close(timeout=5.0)
    finally:
        drop_queue(settings.redis_url or "", settings.queue)
    if reader.error is not None:
        raise RuntimeError(f"freshness reader failed: {reader.error}") from reader.error
    if reader.remaining:
        raise RuntimeError(f"freshness: {reader.remaining} writes never became visible")
    delays = [reader.visible_at[n] - written_at[n] for n in range(len(updates))]
    return {
        "rate_per_s": rate,
        "achieved_rate_per_s": round(len(updates) / elapsed, 1),
        "writes": len(updates),
        "flush_interval_s": settings.flush_interval,
        "poll_s": poll,
        "workers": 1,
        "ms": percentiles(delays, 0.001),
    }
