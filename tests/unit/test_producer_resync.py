"""Nothing of the live state is lost to an outage (docs/design.md, rule 3), against fakeredis.

A batch that could not be enqueued, or whose job vanished from Redis or ended in the
failed registry, leaves its entities dirty, and they are sent again; while
PostgreSQL is down nothing piles up on the queue. The workers are played by the
test: it reads the jobs and sets their status as a worker (or a Redis restart) would.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import fakeredis
import pytest
import redis

from perth_pipeline import PersistenceManager
from perth_pipeline.broker import Keys, write_db_health
from perth_pipeline.operations import BATCH_ADAPTER
from perth_pipeline.settings import Settings

from ..helpers import ClosingServer, pane, session, tab, wait_for

QUEUE = "resync"
BOUND = 0.05  # seconds a write call may take, generously (they take microseconds)


def all_sent(manager: PersistenceManager) -> bool:
    """Nothing dirty and nothing in transit: every write so far is on the queue."""
    return not manager.buffer.has_dirty() and not manager.stats()["sending"]


class Harness:
    """A manager on fakeredis, the jobs it enqueued, and every write call timed."""

    def __init__(self, **overrides: Any) -> None:
        self.server = fakeredis.FakeServer()
        self.client = fakeredis.FakeRedis(server=self.server)
        values: dict[str, Any] = {
            "redis_url": None,
            "database_url": None,
            "queue": QUEUE,
            "flush_interval": 0.01,
            "breaker_base": 0.02,
            "breaker_max": 0.1,
        }
        values.update(overrides)
        self.manager = PersistenceManager(
            settings=Settings(**values), redis_client=fakeredis.FakeRedis(server=self.server)
        )
        self.slowest = 0.0

    def call(self, fn: Callable[..., None], *args: Any) -> None:
        started = time.perf_counter()
        fn(*args)
        self.slowest = max(self.slowest, time.perf_counter() - started)

    def sent(self) -> None:
        """Wait until the manager holds nothing unsent (its jobs are on the queue)."""
        self.manager.flush(timeout=0.05)
        wait_for(lambda: all_sent(self.manager), what="the buffer to be sent")

    def job_ids(self) -> list[str]:
        return [j.decode() for j in self.client.lrange(f"rq:queue:{QUEUE}", 0, -1)]

    def ops(self, job_ids: list[str] | None = None) -> list[Any]:
        out = []
        for job_id in self.job_ids() if job_ids is None else job_ids:
            data = self.client.hget(f"rq:job:{job_id}", "data")
            _, _, args, _ = json.loads(zlib.decompress(data))
            out += BATCH_ADAPTER.validate_python(args[0]).ops
        return out

    def finish(
        self, job_ids: list[str], status: str = "finished", meta: dict[str, Any] | None = None
    ) -> None:
        """What a worker leaves behind, without running the job."""
        for job_id in job_ids:
            self.client.lrem(f"rq:queue:{QUEUE}", 0, job_id)
            self.client.hset(f"rq:job:{job_id}", "status", status)
            if meta is not None:
                self.client.hset(f"rq:job:{job_id}", "meta", json.dumps(meta))

    def committed(self) -> bool:
        return self.manager.stats()["inflight_jobs"] == 0

    def close(self) -> None:
        self.manager.close(timeout=1)


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    harness.close()


def latest(ops: list[Any]) -> dict[tuple[str, Any], Any]:
    """The last operation sent per entity (a later job supersedes an earlier one)."""
    out: dict[tuple[str, Any], Any] = {}
    for op in ops:
        kind = op.op.split(".")[0]
        key = op.record.id if hasattr(op, "record") else getattr(op, "id", None)
        out[(kind, key)] = op
    return out


def test_a_batch_that_cannot_be_enqueued_stays_dirty_and_goes_when_redis_answers(h: Harness) -> None:
    s = session()
    tabs = [tab(s.id, i) for i in range(3)]
    h.call(h.manager.create_session, s)
    for t in tabs:
        h.call(h.manager.create_tab, t)
    h.sent()
    h.finish(h.job_ids())
    wait_for(h.committed, what="the first batch to be settled")
    h.server.connected = False
    for i in range(50):  # updates and deletes during the outage
        h.call(h.manager.update_tab, tabs[0].model_copy(update={"name": f"renamed {i}"}))
    h.call(h.manager.delete_tab, tabs[1].id)
    h.call(h.manager.create_pane, pane(tabs[2].id))
    wait_for(lambda: h.manager.stats()["dropped_jobs"] >= 3, what="flushes to fail")
    assert h.manager.stats()["redis_down"]
    h.server.connected = True
    h.sent()
    ops = latest(h.ops())
    assert ops[("tab", tabs[0].id)].record.name == "renamed 49"
    assert ops[("tab", tabs[1].id)].op == "tab.delete"
    assert {op.op for op in ops.values()} >= {"pane.upsert"}
    assert not h.manager.stats()["redis_down"]
    assert h.slowest < BOUND


@pytest.mark.parametrize("how", ["vanished", "failed"])
def test_the_entities_of_a_job_that_vanished_or_failed_are_sent_again(h: Harness, how: str) -> None:
    s = session()
    t = tab(s.id)
    p = pane(t.id)
    h.manager.create_session(s)
    h.manager.create_tab(t)
    h.manager.create_pane(p)
    h.manager.delete_session(uuid.uuid4())  # a delete too
    h.sent()
    first = h.job_ids()
    sent_first = latest(h.ops(first))
    if how == "vanished":
        h.client.flushall()  # Redis restarted without persistence
    else:
        h.finish(first, status="failed")
    wait_for(lambda: h.manager.stats()[f"{how}_jobs"] == len(first), what="the loss to be seen")
    h.sent()
    again = latest(h.ops())
    assert again.keys() == sent_first.keys()
    assert again[("pane", p.id)].record == p
    assert h.manager.stats()["resynced"] == 4
    h.finish(h.job_ids())
    wait_for(h.committed, what="the batch sent again to be settled")
    assert h.manager.flush(timeout=5)


def test_a_refused_job_is_not_sent_again(h: Harness) -> None:
    h.manager.create_session(session())
    h.sent()
    h.finish(h.job_ids(), status="failed", meta={"perth_refused": "not a valid batch"})
    wait_for(lambda: h.manager.stats()["refused_jobs"] == 1, what="the refusal to be seen")
    assert h.manager.flush(timeout=1)  # nothing is waiting any more
    assert h.job_ids() == []


def test_a_committed_delete_is_forgotten(h: Harness) -> None:
    s = session()
    h.manager.create_session(s)
    h.manager.delete_session(s.id)
    h.sent()
    assert h.manager.stats()["held_entries"] == 1  # the delete, until it is committed
    jobs = h.job_ids()
    h.finish(jobs)
    wait_for(lambda: h.manager.stats()["held_entries"] == 0, what="the delete to be forgotten")
    assert h.manager.stats()["committed_jobs"] == len(jobs)


def test_while_postgresql_is_down_no_job_piles_up_and_the_state_is_sent_after(h: Harness) -> None:
    keys = Keys(QUEUE)
    s = session()
    t = tab(s.id)
    h.manager.create_session(s)
    h.sent()
    write_db_health(h.client, keys, ok=False, source="worker-1", ttl=30, error="connection refused")
    wait_for(lambda: h.manager.stats()["database_down"], what="the producer to see PostgreSQL down")
    enqueued = h.manager.stats()["enqueued_jobs"]
    held = h.manager.stats()["dropped_jobs"]
    h.call(h.manager.create_tab, t)
    for i in range(20):
        h.call(h.manager.update_pane, pane(t.id, i))
    h.call(h.manager.delete_session, uuid.uuid4())
    wait_for(lambda: h.manager.stats()["dropped_jobs"] >= held + 20, what="20 flushes while down")
    assert h.manager.stats()["enqueued_jobs"] == enqueued  # nothing piled into Redis
    write_db_health(h.client, keys, ok=True, source="worker-1", ttl=30)
    h.sent()
    kinds = sorted(op.op for op in h.ops() if op.op != "session.upsert")
    assert kinds == ["pane.upsert"] * 20 + ["session.delete", "tab.upsert"]
    assert not h.manager.stats()["database_down"]
    assert h.slowest < BOUND


def test_one_worker_cut_off_from_postgresql_does_not_hold_back_what_another_applies(h: Harness) -> None:
    keys = Keys(QUEUE)

    def cut_off() -> None:
        write_db_health(h.client, keys, ok=False, source="worker-cut-off", ttl=30, error="no route to host")

    cut_off()
    wait_for(lambda: h.manager.stats()["database_down"], what="the only report to say down")
    write_db_health(h.client, keys, ok=True, source="worker-fine", ttl=30)
    wait_for(lambda: not h.manager.stats()["database_down"], what="a worker that reaches PostgreSQL")
    # the cut-off worker reports again: the newest report, but not the only fresh one
    cut_off()
    held = h.manager.stats()["dropped_jobs"]
    enqueued = h.manager.stats()["enqueued_jobs"]
    s = session()
    h.call(h.manager.create_session, s)
    for i in range(20):  # twenty sends, each after a poll that read both reports
        h.call(h.manager.update_session, s.model_copy(update={"name": f"n{i}"}))
        h.sent()
    assert h.manager.stats()["dropped_jobs"] == held
    assert h.manager.stats()["enqueued_jobs"] >= enqueued + 20
    assert not h.manager.stats()["database_down"]
    # the fine worker's report goes stale (it died without removing it): the cut-off one is believed
    stale = {"ok": True, "at": time.time() - 60, "source": "worker-fine", "error": None}
    h.client.hset(keys.db_health, "worker-fine", json.dumps(stale))
    wait_for(lambda: h.manager.stats()["database_down"], what="only the down report to count")
    h.call(h.manager.update_session, s.model_copy(update={"name": "held"}))
    wait_for(lambda: h.manager.stats()["dropped_jobs"] > held, what="a flush held back")


def test_without_a_worker_report_the_producer_checks_postgresql_itself_now_and_then() -> None:
    pg = ClosingServer("postgresql://perth@127.0.0.1:{port}/perth")  # refusing everyone
    harness = Harness(database_url=pg.url, health_ttl=2)
    try:
        harness.call(harness.manager.create_session, session())
        wait_for(lambda: harness.manager.stats()["database_down"], what="the direct check to fail")
        held = harness.manager.stats()["dropped_jobs"]
        wait_for(lambda: harness.manager.stats()["dropped_jobs"] >= held + 50, what="50 more flushes")
        assert pg.accepted <= 2  # one check every few seconds, not one per flush
        assert harness.manager.stats()["enqueued_jobs"] == 0
        # a worker reports PostgreSQL back: that is fresher than the producer's own check
        write_db_health(harness.client, Keys(QUEUE), ok=True, source="worker-1", ttl=30)
        harness.sent()
        assert [op.op for op in harness.ops()] == ["session.upsert"]
        assert harness.slowest < BOUND
    finally:
        harness.close()
        pg.close()


class RefusesWrites(fakeredis.FakeRedis):
    """A Redis at maxmemory (or a read-only replica): it answers the flusher's polls, and
    refuses the transactions that enqueue batches."""

    refusing = True

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        if transaction and self.refusing:

            def refuse(raise_on_error: bool = True) -> list[Any]:
                pipe.reset()
                raise redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'")

            pipe.execute = refuse  # type: ignore[method-assign]
        return pipe


def test_a_batch_redis_refuses_to_store_stays_dirty_and_goes_when_it_accepts_writes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="perth_pipeline")
    server = fakeredis.FakeServer()
    client = RefusesWrites(server=server)
    settings = Settings(
        redis_url=None,
        database_url=None,
        queue=QUEUE,
        flush_interval=0.01,
        breaker_base=0.02,
        breaker_max=0.1,
    )
    manager = PersistenceManager(settings=settings, redis_client=client)
    try:
        s = session()
        t = tab(s.id)
        manager.create_session(s)
        manager.create_tab(t)
        manager.delete_session(uuid.uuid4())
        wait_for(lambda: manager.stats()["dropped_jobs"] >= 5, what="five refused enqueues")
        assert manager.stats()["enqueued_jobs"] == 0
        wait_for(lambda: manager.stats()["dirty"] == 3, what="all of it to be buffered still")
        assert manager.stats()["redis_down"]
        client.refusing = False
        wait_for(lambda: manager.stats()["enqueued_jobs"] > 0 and all_sent(manager), what="the send")
        queued = fakeredis.FakeRedis(server=server).llen(f"rq:queue:{QUEUE}")
        assert queued == manager.stats()["enqueued_jobs"]
        # the polls that answered in between did not make it flap: one warning, one info
        messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name.startswith("perth")]
        assert [level for level, _ in messages] == [logging.WARNING, logging.INFO], messages
        assert "OutOfMemoryError" in messages[0][1]
    finally:
        manager.close(timeout=1)


def test_an_operation_the_encoder_cannot_take_does_not_block_the_others(
    monkeypatch: pytest.MonkeyPatch, h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    from perth_pipeline import batch

    real = batch.item_json

    def buggy(item: Any, ids: Any) -> str:  # a bug of the encoder, for one record
        if getattr(item.record, "title", None) == "poison":
            raise TypeError("cannot encode this")
        return real(item, ids)

    monkeypatch.setattr(batch, "item_json", buggy)
    s = session()
    t = tab(s.id)
    h.manager.create_session(s)
    h.manager.create_tab(t)
    h.manager.create_pane(pane(t.id, 1, title="poison"))
    h.manager.create_pane(pane(t.id, 2))
    h.sent()
    assert sorted(op.op for op in h.ops()) == ["pane.upsert", "session.upsert", "tab.upsert"]
    assert h.manager.stats()["unencodable"] == 1
    h.manager.update_pane(pane(t.id, 3))  # and the flusher goes on
    h.sent()
    assert len(h.ops()) == 4
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
