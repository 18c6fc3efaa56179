"""An outage does not flood the terminal's log: one warning when a backend goes down, one info
when it is back, and no line per write call or per batch."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest

from perth_pipeline import PersistenceManager
from perth_pipeline import inflight as inflight_module
from perth_pipeline.broker import Keys, write_db_health
from perth_pipeline.settings import Settings

from ..helpers import pane, session, tab, wait_for

QUEUE = "logging"


def all_sent(manager: PersistenceManager) -> bool:
    """Nothing dirty and nothing in transit: every write so far is on the queue."""
    return not manager.buffer.has_dirty() and not manager.stats()["sending"]


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def manager(server: fakeredis.FakeServer) -> Iterator[PersistenceManager]:
    settings = Settings(
        redis_url=None,
        database_url=None,
        queue=QUEUE,
        flush_interval=0.01,
        breaker_base=0.02,
        breaker_max=0.1,
    )
    m = PersistenceManager(settings=settings, redis_client=fakeredis.FakeRedis(server=server))
    yield m
    m.close(timeout=1)


def lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and r.name.startswith("perth")]


def sent(manager: PersistenceManager) -> None:
    manager.flush(timeout=0.05)
    wait_for(lambda: all_sent(manager), what="the buffer to be sent")


def test_redis_down_then_back_logs_one_warning_and_one_info(
    manager: PersistenceManager, server: fakeredis.FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="perth_pipeline")
    s = session()
    t = tab(s.id)
    manager.create_session(s)
    manager.create_tab(t)
    sent(manager)
    caplog.clear()
    server.connected = False
    for i in range(1000):  # a thousand write calls during the outage
        manager.update_pane(pane(t.id, i % 20).model_copy(update={"title": f"t{i}"}))
    wait_for(lambda: manager.stats()["dropped_jobs"] >= 20, what="20 failed flushes")
    assert len(lines(caplog, logging.WARNING)) == 1
    (warning,) = lines(caplog, logging.WARNING)
    assert "Redis unreachable" in warning
    assert lines(caplog, logging.INFO) == lines(caplog, logging.DEBUG) == []  # nothing per call
    server.connected = True
    sent(manager)
    wait_for(lambda: lines(caplog, logging.INFO), what="the info line")
    (info,) = lines(caplog, logging.INFO)
    assert "Redis reachable again" in info
    assert len(lines(caplog, logging.WARNING)) == 1
    assert lines(caplog, logging.ERROR) == []


def test_postgresql_down_then_back_logs_one_warning_and_one_info(
    manager: PersistenceManager, server: fakeredis.FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="perth_pipeline")
    client = fakeredis.FakeRedis(server=server)
    keys = Keys(QUEUE)
    write_db_health(client, keys, ok=False, source="w1", ttl=30, error="the database system is shutting down")
    wait_for(lambda: manager.stats()["database_down"], what="PostgreSQL down")
    s = session()
    manager.create_session(s)
    for i in range(200):
        manager.update_session(s.model_copy(update={"name": f"n{i}"}))
    wait_for(lambda: manager.stats()["dropped_jobs"] >= 20, what="20 flushes held")
    (warning,) = lines(caplog, logging.WARNING)
    assert "PostgreSQL unreachable" in warning and "shutting down" in warning
    write_db_health(client, keys, ok=True, source="w1", ttl=30)
    sent(manager)
    (info,) = lines(caplog, logging.INFO)
    assert "PostgreSQL reachable again" in info
    assert len(lines(caplog, logging.WARNING)) == 1


def counted(caplog: pytest.LogCaptureFixture, level: int) -> int:
    """Batches counted by the summary lines at ``level`` so far ("50 batches sent again: ...")."""
    return sum(int(line.split()[0]) for line in lines(caplog, level))


@pytest.fixture
def summary_every(monkeypatch: pytest.MonkeyPatch) -> float:
    # the summaries come at most every 30 s; half a second here, so that the test sees them all
    monkeypatch.setattr(inflight_module, "LOG_EVERY", 0.5)
    return 0.5


def test_many_lost_batches_make_one_line(
    server: fakeredis.FakeServer, caplog: pytest.LogCaptureFixture, summary_every: float
) -> None:
    caplog.set_level(logging.DEBUG, logger="perth_pipeline")
    settings = Settings(redis_url=None, database_url=None, queue=QUEUE, flush_interval=0.01, batch_max_ops=1)
    m = PersistenceManager(settings=settings, redis_client=fakeredis.FakeRedis(server=server))
    try:
        for _ in range(50):
            m.create_session(session())
        sent(m)
        assert m.stats()["enqueued_jobs"] == 50
        client = fakeredis.FakeRedis(server=server)
        with client.pipeline(transaction=True) as pipe:  # all at once, as a restart would
            for job_id in client.lrange(f"rq:queue:{QUEUE}", 0, -1):
                pipe.hset(b"rq:job:" + job_id, "status", "failed")
            pipe.delete(f"rq:queue:{QUEUE}")
            pipe.execute()
        wait_for(lambda: counted(caplog, logging.INFO) == 50, what="the summaries of 50 batches")
        resent = lines(caplog, logging.INFO)
        # one line; two if a poll came while the statuses were being changed
        assert 1 <= len(resent) <= 2, resent
        assert all("batches sent again" in line and "ended failed" in line for line in resent)
    finally:
        m.close(timeout=1)


def test_many_refused_batches_make_one_warning(
    server: fakeredis.FakeServer, caplog: pytest.LogCaptureFixture, summary_every: float
) -> None:
    caplog.set_level(logging.DEBUG, logger="perth_pipeline")
    settings = Settings(redis_url=None, database_url=None, queue=QUEUE, flush_interval=0.01, batch_max_ops=1)
    m = PersistenceManager(settings=settings, redis_client=fakeredis.FakeRedis(server=server))
    try:
        for _ in range(30):
            m.create_session(session())
        sent(m)
        client = fakeredis.FakeRedis(server=server)
        meta: dict[str, Any] = {"perth_refused": "format 9 is not supported"}
        with client.pipeline(transaction=True) as pipe:
            for job_id in client.lrange(f"rq:queue:{QUEUE}", 0, -1):
                pipe.hset(b"rq:job:" + job_id, mapping={"status": "failed", "meta": json.dumps(meta)})
            pipe.execute()
        wait_for(lambda: counted(caplog, logging.WARNING) == 30, what="the summaries of 30 refusals")
        warnings = lines(caplog, logging.WARNING)
        assert 1 <= len(warnings) <= 2, warnings
        assert all("refused by the workers" in w and "format 9" in w for w in warnings)
    finally:
        m.close(timeout=1)
