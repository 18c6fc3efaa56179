"""PostgreSQL's health as the workers see it: one report per worker, and the readers' verdict.

One worker cut off from PostgreSQL must not make producers hold their batches back while
another applies them; reports of workers that died must not count. Against fakeredis.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import fakeredis
import pytest

from perth_pipeline import PersistenceManager
from perth_pipeline.broker import (
    PRUNE_AFTER_TTLS,
    DbHealth,
    Keys,
    clear_db_health,
    db_health_verdict,
    prune_db_health,
    read_db_health,
    write_db_health,
)
from perth_pipeline.settings import Settings
from workers.context import JobContext

from ..helpers import session, wait_for

QUEUE = "health"
TTL = 15
NOW = 1_800_000_000.0


def report(ok: bool, age: float, error: str | None = None, source: str = "w") -> bytes:
    return json.dumps({"ok": ok, "at": NOW - age, "source": source, "error": error}).encode()


def verdict(fields: dict[Any, Any] | None) -> DbHealth:
    return db_health_verdict(fields, ttl=TTL, now=NOW)


@pytest.fixture
def client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


def test_no_report_is_no_verdict() -> None:
    cases: tuple[dict[bytes, bytes] | None, ...] = ({}, None)
    for fields in cases:
        health = verdict(fields)
        assert health.ok is None and health.error is None
        assert health.up == health.down == []


def test_reports_older_than_the_ttl_are_ignored() -> None:
    health = verdict({b"gone": report(True, TTL + 1), b"also-gone": report(False, 3 * TTL, "refused")})
    assert health.ok is None
    assert list(health.stale) == ["gone", "also-gone"]  # newest first
    # a stale "up" does not outweigh a fresh "down"
    health = verdict({b"gone": report(True, TTL + 1), b"cut-off": report(False, 1, "no route to host")})
    assert health.ok is False and health.error == "no route to host"
    assert health.down == ["cut-off"] and list(health.stale) == ["gone"]


def test_one_worker_up_among_workers_down_means_up() -> None:
    health = verdict(
        {
            b"a": report(False, 0.5, "no route to host"),
            b"b": report(True, 10),
            b"c": report(False, 2, "timeout"),
        }
    )
    assert health.ok is True and health.error is None
    assert health.up == ["b"] and health.down == ["a", "c"]


def test_all_workers_down_means_down_with_the_newest_error() -> None:
    health = verdict(
        {
            "old": report(False, 9, "the database system is starting up"),
            "new": report(False, 1, "the database system is shutting down"),
            "mid": report(False, 5, None),
        }
    )
    assert health.ok is False
    assert health.error == "the database system is shutting down"
    assert health.down == ["new", "mid", "old"]
    # a down report without an error still yields a message
    assert verdict({b"x": report(False, 1)}).error


def test_what_is_not_a_report_is_ignored() -> None:
    health = verdict(
        {
            b"junk": b"not json",
            b"list": b"[1, 2]",
            b"no-ok": json.dumps({"at": NOW}).encode(),
            b"no-at": json.dumps({"ok": True}).encode(),
            b"bool-at": json.dumps({"ok": True, "at": True}).encode(),
        }
    )
    assert health.ok is None and not health.fresh and not health.stale


def test_the_json_view_counts_and_names_the_workers() -> None:
    health = verdict({b"up": report(True, 1), b"down": report(False, 2, "refused"), b"old": report(True, 60)})
    view = health.as_dict(now=NOW)
    assert json.loads(json.dumps(view)) == view
    assert (view["ok"], view["up"], view["down"], view["stale"]) == (True, 1, 1, 1)
    assert view["workers"] == [
        {"worker": "up", "ok": True, "fresh": True, "age_seconds": 1.0, "error": None},
        {"worker": "down", "ok": False, "fresh": True, "age_seconds": 2.0, "error": "refused"},
        {"worker": "old", "ok": True, "fresh": False, "age_seconds": 60.0, "error": None},
    ]


def test_each_worker_writes_its_own_field_and_the_key_expires(client: fakeredis.FakeRedis) -> None:
    keys = Keys(QUEUE)
    write_db_health(client, keys, ok=False, source="w1", ttl=TTL, error="no route to host")
    write_db_health(client, keys, ok=True, source="w2", ttl=TTL)
    assert sorted(client.hgetall(keys.db_health)) == [b"w1", b"w2"]
    assert 0 < client.ttl(keys.db_health) <= TTL
    health = read_db_health(client, keys, ttl=TTL)
    assert health.ok is True and health.up == ["w2"] and health.down == ["w1"]
    # w1 writes again: the newest report, but w2's still counts
    write_db_health(client, keys, ok=False, source="w1", ttl=TTL, error="no route to host")
    assert read_db_health(client, keys, ttl=TTL).ok is True
    clear_db_health(client, keys, "w2")
    health = read_db_health(client, keys, ttl=TTL)
    assert health.ok is False and health.error == "no route to host"
    assert list(health.fresh) == ["w1"]


def test_pruning_removes_only_the_reports_of_long_gone_workers(client: fakeredis.FakeRedis) -> None:
    keys = Keys(QUEUE)
    now = time.time()
    client.hset(keys.db_health, "dead", json.dumps({"ok": True, "at": now - PRUNE_AFTER_TTLS * TTL - 1}))
    client.hset(keys.db_health, "junk", "not a report")
    client.hset(keys.db_health, "stopped-lately", json.dumps({"ok": True, "at": now - 2 * TTL}))
    write_db_health(client, keys, ok=True, source="live", ttl=TTL)
    assert prune_db_health(client, keys, ttl=TTL) == 2
    assert sorted(client.hgetall(keys.db_health)) == [b"live", b"stopped-lately"]
    assert prune_db_health(client, keys, ttl=TTL) == 0


def test_the_report_of_version_0_1_is_at_another_key_and_ignored(client: fakeredis.FakeRedis) -> None:
    keys = Keys(QUEUE)
    # what a worker of version 0.1 wrote: one string for all workers
    old_key = f"{keys.prefix}health:db"
    assert keys.db_health != old_key
    client.set(old_key, json.dumps({"ok": False, "at": time.time(), "error": "refused"}), ex=TTL)
    assert read_db_health(client, keys, ttl=TTL).ok is None
    write_db_health(client, keys, ok=True, source="w1", ttl=TTL)
    assert read_db_health(client, keys, ttl=TTL).up == ["w1"]


def context(client: fakeredis.FakeRedis, name: str) -> JobContext:
    settings = Settings(queue=QUEUE, database_url="postgresql://perth@127.0.0.1:1/perth", health_ttl=TTL)
    return JobContext(settings, client, name=name)


def test_a_worker_reports_under_its_name_prunes_the_dead_and_withdraws_when_it_stops(
    client: fakeredis.FakeRedis,
) -> None:
    keys = Keys(QUEUE)
    client.hset(keys.db_health, "dead", json.dumps({"ok": True, "at": time.time() - 10 * TTL}))
    one, two = context(client, "worker-1"), context(client, "worker-2")
    one.database_failed(OSError("no route to host"))
    two.database_ok()
    health = read_db_health(client, keys, ttl=TTL)
    assert health.down == ["worker-1"] and health.up == ["worker-2"]
    assert health.fresh["worker-1"]["error"] == "no route to host"
    assert "dead" not in health.stale  # pruned by the first report
    assert sorted(client.hgetall(keys.db_health)) == [b"worker-1", b"worker-2"]
    two.close()
    assert read_db_health(client, keys, ttl=TTL).ok is False
    one.close()
    assert client.hgetall(keys.db_health) == {}


def test_a_worker_without_a_name_reports_per_process() -> None:
    ctx = context(fakeredis.FakeRedis(), "")
    assert ctx.name == f"{socket.gethostname()}:{os.getpid()}"


def test_a_producer_ignores_the_down_report_of_a_version_0_1_worker() -> None:
    client = fakeredis.FakeRedis()
    keys = Keys(QUEUE)
    old = {"ok": False, "at": time.time(), "source": "old-worker", "error": "refused"}
    client.set(f"{keys.prefix}health:db", json.dumps(old), ex=60)  # version 0.1's key
    settings = Settings(queue=QUEUE, flush_interval=0.01)
    manager = PersistenceManager(settings=settings, redis_client=client)
    try:
        for i in range(5):
            manager.create_session(session(f"s{i}"))
            manager.flush(timeout=0.05)
            wait_for(lambda: not manager.buffer.has_dirty(), what="the batch to be enqueued")
        stats = manager.stats()
        assert not stats["redis_down"] and not stats["database_down"]
        assert stats["dropped_jobs"] == 0 and stats["enqueued_jobs"] >= 5
        assert client.llen(f"rq:queue:{QUEUE}") == stats["enqueued_jobs"]
    finally:
        manager.close(timeout=1)
