"""Backpressure: a deep queue makes the producer flush less often; past the hard depth it holds
its state (dirty, nothing dropped) until the queue drains. stats() and status show depth and lag.

The depth is made by putting job ids on the queue's list (the producer only reads its length);
they are removed to let the queue "drain".
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import psycopg
import redis

from perth_pipeline import PersistenceManager
from perth_pipeline.settings import Settings
from perth_pipeline.status import gather_status

from ..helpers import drain, pane, session, settle, tab, wait_for


def _fill(rconn: redis.Redis, settings: Settings, depth: int) -> str:
    key = f"rq:queue:{settings.queue}"
    rconn.rpush(key, *[f"placeholder-{uuid.uuid4().hex}" for _ in range(depth)])
    return key


def _jobs_while_writing(manager: PersistenceManager, seconds: float) -> int:
    """Enqueued jobs while one pane is updated every few milliseconds for ``seconds``."""
    s = session()
    t = tab(s.id)
    p = pane(t.id)
    manager.create_session(s)
    manager.create_tab(t)
    before = manager.stats()["enqueued_jobs"]
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:  # a workload of this length, not a wait for a condition
        manager.update_pane(p.model_copy(update={"title": f"t{n}"}))
        n += 1
        time.sleep(0.002)
    return int(manager.stats()["enqueued_jobs"] - before)


def test_a_deep_queue_makes_the_producer_flush_less_often(settings: Settings, rconn: redis.Redis) -> None:
    base = settings.model_copy(update={"flush_interval": 0.05, "queue_soft_depth": 10})
    with PersistenceManager(settings=base) as manager:
        free = _jobs_while_writing(manager, 1.5)
    deep = base.model_copy(update={"queue": f"{settings.queue}-deep"})
    key = _fill(rconn, deep, 1000)  # 100 times the soft depth: the interval grows eightfold (the cap)
    try:
        with PersistenceManager(settings=deep) as manager:
            wait_for(
                lambda: manager.stats()["queue_depth"] >= 1000, 10.0, what="the producer to see the depth"
            )
            slowed = _jobs_while_writing(manager, 1.5)
            stats = manager.stats()
    finally:
        rconn.delete(key)
    # 1.5 s at 50 ms is about 30 flushes; at 400 ms, about 4
    assert free >= 12, free
    assert slowed <= 8, slowed
    assert stats["coalesced"] > 0 and stats["held_back"] == 0


def test_past_the_hard_depth_the_state_stays_dirty_until_the_queue_drains(
    settings: Settings, rconn: redis.Redis, pg: psycopg.Connection[Any]
) -> None:
    s = settings.model_copy(update={"queue_soft_depth": 5, "queue_hard_depth": 20})
    key = _fill(rconn, s, 25)
    with PersistenceManager(settings=s) as manager:
        wait_for(lambda: manager.stats()["queue_depth"] >= 25, 10.0, what="the producer to see the depth")
        sess = session("held")
        t = tab(sess.id)
        panes = [pane(t.id, n) for n in range(3)]
        manager.create_session(sess)
        manager.create_tab(t)
        for p in panes:
            manager.create_pane(p)
        # flush() keeps the flusher cycling every few ms: every cycle holds back
        assert not manager.flush(timeout=1.0)
        held = manager.stats()
        assert held["enqueued_jobs"] == 0
        assert held["held_back"] > 0 and held["dropped_jobs"] == 0
        assert held["dirty"] == 5  # a session, a tab, three panes: all kept
        assert rconn.llen(key) == 25

        rconn.delete(key)  # the queue drains
        wait_for(lambda: manager.stats()["enqueued_jobs"] > 0, 10.0, what="the held state to be sent")
        settle(manager, s)
        stats = manager.stats()
        assert stats["dirty"] == 0 and stats["dropped_jobs"] == 0
    rows = pg.execute("SELECT id FROM panes WHERE tab_id = %s", (t.id,)).fetchall()
    assert sorted(r[0] for r in rows) == sorted(p.id for p in panes)


def test_stats_and_status_show_depth_and_lag(settings: Settings) -> None:
    with PersistenceManager(settings=settings) as manager:
        sess = session("lagging")
        manager.create_session(sess)
        manager.create_tab(tab(sess.id))
        # no worker: the batches wait on the queue and grow older
        wait_for(lambda: manager.stats()["queue_depth"] >= 1, 10.0, what="a batch on the queue")
        wait_for(lambda: manager.stats()["lag_seconds"] >= 0.2, 10.0, what="the lag to grow")
        report = gather_status(settings)
        assert report["queue"]["depth"] >= 1
        assert report["queue"]["lag_seconds"] is not None and report["queue"]["lag_seconds"] > 0
        drain(settings)
        assert manager.flush(timeout=10.0)
        wait_for(lambda: manager.stats()["lag_seconds"] == 0.0, 10.0, what="the lag to clear")
        assert gather_status(settings)["queue"]["depth"] == 0
