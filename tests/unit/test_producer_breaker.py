"""The circuit breaker: a dead backend costs one connection attempt per back-off, not one per flush."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Iterator

import pytest

from perth_pipeline import PersistenceManager
from perth_pipeline import breaker as breaker_module
from perth_pipeline.breaker import CircuitBreaker
from perth_pipeline.settings import Settings

from ..helpers import ClosingServer, pane, session, tab, wait_for


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(breaker_module.time, "monotonic", fake)
    return fake


def test_the_back_off_grows_is_capped_and_jittered(clock: FakeClock) -> None:
    b = CircuitBreaker("Redis", base=0.5, cap=30.0)
    delays = [b.failure(ConnectionError("refused")) for _ in range(12)]
    below_cap = delays[:6]  # 0.5 to 16 s, less jitter; then 30 s, less jitter
    assert 0.375 <= delays[0] <= 0.5
    assert all(later > earlier for earlier, later in itertools.pairwise(below_cap)), delays
    assert max(delays) <= 30.0  # jitter never goes past the cap
    capped = [b.failure(ConnectionError("refused")) for _ in range(50)]
    assert all(22.5 <= d <= 30.0 for d in capped)
    assert statistics.pstdev(capped) > 0.5  # terminals do not come back in step


def test_while_open_no_attempt_until_the_back_off_is_over(clock: FakeClock) -> None:
    b = CircuitBreaker("Redis", base=1.0, cap=8.0)
    assert b.allow()
    delay = b.failure("refused")
    assert b.is_down
    assert not b.allow()
    clock.now += delay * 0.99
    assert not b.allow()
    clock.now += delay * 0.02
    assert b.allow()  # half-open: one try
    second = b.failure("refused")
    assert second > delay
    assert not b.allow()
    clock.now += second
    assert b.allow()
    b.success()
    assert not b.is_down and b.allow()
    assert b.failure("refused") <= 1.0  # a new outage starts from the base again


@pytest.fixture
def broken_redis() -> Iterator[ClosingServer]:
    server = ClosingServer("redis://127.0.0.1:{port}/0")  # a broken Redis
    yield server
    server.close()


def test_no_connection_attempt_on_every_flush_while_the_breaker_is_open(
    broken_redis: ClosingServer,
) -> None:
    settings = Settings(
        redis_url=broken_redis.url,
        database_url=None,
        queue="breaker",
        flush_interval=0.01,
        breaker_base=0.2,
        breaker_max=1.0,
    )
    manager = PersistenceManager(settings=settings)
    try:
        s = session()
        t = tab(s.id)
        manager.create_session(s)
        manager.create_tab(t)
        manager.create_pane(pane(t.id))
        # about 100 flush intervals, each with something to send and no Redis to send it to
        wait_for(lambda: manager.stats()["dropped_jobs"] >= 100, timeout=60, what="100 flushes")
        attempts = broken_redis.accepted
        assert manager.stats()["redis_down"]
        assert 1 <= attempts <= 10, (attempts, manager.stats())  # not one knock per flush
    finally:
        manager.close(timeout=0.5)
