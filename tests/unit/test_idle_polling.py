"""The flusher's polling of Redis: about once a second when idle, every cycle while a batch is out.

A terminal that writes nothing must not cost Redis a round trip every flush interval (20 a
second by default); a terminal with a batch in flight must learn its fate at once. Each poll
is one pipeline that reads the queue's length (LLEN), so polls are counted as those.

These tests measure a rate, so they let the flusher run for a fixed window (paced by
``Event.wait``) rather than waiting for a condition.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest
from redis.client import Pipeline
from rq.job import Job

from perth_pipeline import PersistenceManager
from perth_pipeline.settings import Settings

from ..helpers import session, wait_for

QUEUE = "idle-polling"
#: Default flush interval: 20 cycles a second. Idle, one poll a second is expected.
DEFAULT_INTERVAL = Settings.model_fields["flush_interval"].default


class _CountingPipeline(Pipeline):  # type: ignore[misc]
    polls: list[float]

    def execute(self, raise_on_error: bool = True) -> Any:
        if any(args and str(args[0]).upper() == "LLEN" for args, _ in self.command_stack):
            self.polls.append(time.monotonic())
        return super().execute(raise_on_error)


class CountingRedis(fakeredis.FakeRedis):  # type: ignore[misc]
    """fakeredis that notes when the queue's length is read (once per poll of the flusher)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.polls: list[float] = []

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Pipeline:
        pipe = _CountingPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.polls = self.polls
        return pipe

    def llen(self, name: Any) -> Any:
        self.polls.append(time.monotonic())
        return super().llen(name)


def polls_during(client: CountingRedis, seconds: float) -> int:
    """How many polls the flusher makes in the next ``seconds`` (measured on the monotonic clock)."""
    start = time.monotonic()
    end = start + seconds
    pause = threading.Event()
    while (left := end - time.monotonic()) > 0:
        pause.wait(left)
    return sum(1 for at in client.polls if start <= at < end)


@pytest.fixture
def client() -> Iterator[CountingRedis]:
    c = CountingRedis()
    yield c
    c.close()


@pytest.fixture
def manager(client: CountingRedis) -> Iterator[PersistenceManager]:
    settings = Settings(redis_url=None, database_url=None, queue=QUEUE)
    assert settings.flush_interval == DEFAULT_INTERVAL == 0.05
    m = PersistenceManager(settings=settings, redis_client=client)
    yield m
    m.close(timeout=1)


def test_an_idle_manager_polls_redis_about_once_a_second(
    manager: PersistenceManager, client: CountingRedis
) -> None:
    # right after the start: one poll at once (is_available() must not wait a second), then idle
    wait_for(lambda: client.polls, timeout=5, what="the first poll")
    assert manager.is_available()
    polls = polls_during(client, 2.5)
    # one a second (2 or 3 in 2.5 s), not one per 50 ms cycle (50)
    assert 1 <= polls <= 4, polls
    # the flusher is alive and idle, not stuck: a write goes out at the next cycle
    manager.create_session(session())
    wait_for(lambda: manager.stats()["enqueued_jobs"] == 1, timeout=5, what="the write to be sent")


def test_a_batch_in_flight_is_polled_every_cycle_until_it_settles(
    manager: PersistenceManager, client: CountingRedis
) -> None:
    wait_for(lambda: client.polls, timeout=5, what="the first poll")
    manager.create_session(session())
    wait_for(lambda: manager.stats()["inflight_jobs"] == 1, timeout=5, what="the batch to be in flight")
    (job_id,) = (j.decode() for j in client.lrange(f"rq:queue:{QUEUE}", 0, -1))

    busy = polls_during(client, 1.0)
    # every 50 ms cycle (about 20 in a second); far more than the idle rate of one a second
    assert busy >= 8, busy

    # a worker commits it: the next poll sees it, and the flusher is idle again
    client.hset(Job.key_for(job_id), "status", "finished")
    wait_for(lambda: manager.stats()["committed_jobs"] == 1, timeout=5, what="the batch to settle")
    assert manager.stats()["inflight_jobs"] == 0
    idle = polls_during(client, 2.5)
    assert idle <= 4, idle


class _InfoCountingRedis(fakeredis.FakeRedis):
    """Counts INFO asked outside a pipeline (RQ asks it at a queue's first enqueue if it must)."""

    infos = 0

    def info(self, *args: Any, **kwargs: Any) -> Any:
        self.infos += 1
        return super().info(*args, **kwargs)


def test_the_first_batch_sent_asks_the_server_nothing_more_than_the_later_ones() -> None:
    client = _InfoCountingRedis()
    manager = PersistenceManager(settings=Settings(queue=QUEUE), redis_client=client)
    try:
        # the flusher's first poll learns the server's version, in its own round trip
        wait_for(lambda: manager._flusher.queue.redis_server_version, what="the first poll")
        manager.create_session(session("first"))
        wait_for(lambda: manager.stats()["enqueued_jobs"] == 1, what="the first batch to be sent")
        assert client.infos == 0  # RQ did not stop the first enqueue for an INFO round trip
    finally:
        manager.close(timeout=1)


class _PipelineSizes(fakeredis.FakeRedis):
    """Notes how many job-state reads (HMGET) each pipeline of the flusher carries."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sizes: list[int] = []

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Pipeline:
        sizes = self.sizes

        class Sized(Pipeline):  # type: ignore[misc]
            def execute(self, raise_on_error: bool = True) -> Any:
                sizes.append(sum(1 for args, _ in self.command_stack if str(args[0]).upper() == "HMGET"))
                return super().execute(raise_on_error)

        return Sized(self.connection_pool, self.response_callbacks, transaction, shard_hint)


def test_many_batches_in_flight_are_read_in_small_pipelines_and_all_settle() -> None:
    from perth_pipeline import tasks

    client = _PipelineSizes()
    settings = Settings(queue=QUEUE, batch_max_ops=1, flush_interval=0.01)
    manager = PersistenceManager(settings=settings, redis_client=client)
    try:
        for n in range(2 * tasks._POLL_CHUNK + 20):
            manager.create_session(session(f"s{n}"))
        total = 2 * tasks._POLL_CHUNK + 20
        wait_for(lambda: manager.stats()["inflight_jobs"] == total, what="every batch in flight")
        assert max(client.sizes) <= tasks._POLL_CHUNK
        for raw in client.lrange(f"rq:queue:{QUEUE}", 0, -1):
            client.hset(Job.key_for(raw.decode()), "status", "finished")
        wait_for(lambda: manager.stats()["committed_jobs"] == total, what="every batch to settle")
        assert max(client.sizes) <= tasks._POLL_CHUNK
        assert manager.flush(timeout=1)
    finally:
        manager.close(timeout=1)
