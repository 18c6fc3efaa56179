"""A worker's report of PostgreSQL's health, against real Redis and PostgreSQL: written under the
worker's name, renewed while the worker idles, removed when it stops; ``status`` shows each one."""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest
import redis

from perth_pipeline.broker import Keys, make_queue, make_redis, read_db_health, write_db_health
from perth_pipeline.settings import Settings
from perth_pipeline.status import gather_status, render_status
from workers.worker import PerthJob, PerthWorker

from ..helpers import wait_for


@pytest.mark.timeout(60)
def test_an_idle_worker_renews_its_report_and_removes_it_when_it_stops(
    settings: Settings, rconn: redis.Redis, pg: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    s = settings.model_copy(update={"health_ttl": 3})
    keys = Keys(s.queue)
    write_db_health(rconn, keys, ok=True, source="another-worker", ttl=60)
    connection = make_redis(s.redis_url or "", connect_timeout=2.0, socket_timeout=30.0)
    worker = PerthWorker(
        [make_queue(s.queue, connection, job_class=PerthJob)], settings=s, connection=connection
    )
    monkeypatch.setattr(worker, "_install_signal_handlers", lambda: None)  # signals: main thread only
    thread = threading.Thread(
        target=worker.work, kwargs={"with_scheduler": False, "logging_level": "WARNING"}, daemon=True
    )
    thread.start()
    try:

        def own() -> dict[str, Any] | None:
            return read_db_health(rconn, keys, ttl=s.health_ttl).fresh.get(worker.name)

        first = wait_for(own, timeout=15, what="the worker's report")
        assert first is not None and first["ok"] and first["source"] == worker.name
        # the queue stays empty: only the idle worker's own checks can renew its report
        wait_for(
            lambda: (r := own()) and r["at"] > first["at"] + s.health_ttl,
            timeout=15,
            what="the idle worker to renew its report",
        )
        assert 0 < rconn.ttl(keys.db_health) <= s.health_ttl
    finally:
        worker._stop_requested = True
        thread.join(timeout=15)
        connection.close()
    assert not thread.is_alive()
    assert sorted(rconn.hgetall(keys.db_health)) == [b"another-worker"]  # its own field only


def test_status_shows_each_workers_view_of_postgres(settings: Settings, rconn: redis.Redis) -> None:
    keys = Keys(settings.queue)
    write_db_health(rconn, keys, ok=True, source="worker-app1", ttl=settings.health_ttl)
    write_db_health(
        rconn, keys, ok=False, source="worker-app2", ttl=settings.health_ttl, error="no route to host"
    )
    report = gather_status(settings)
    view = report["worker_view_of_postgres"]
    assert (view["ok"], view["up"], view["down"], view["stale"]) == (True, 1, 1, 0)
    assert {w["worker"]: (w["ok"], w["error"]) for w in view["workers"]} == {
        "worker-app1": (True, None),
        "worker-app2": (False, "no route to host"),
    }
    (warning,) = [w for w in report["warnings"] if "PostgreSQL unreachable" in w]
    assert "1 of 2 worker(s)" in warning and "worker-app2: no route to host" in warning
    text = render_status(report)
    assert "db reports up: 1 worker(s) up, 1 down, 0 stale" in text
    assert "worker-app2" in text and "no route to host" in text
    rconn.hdel(keys.db_health, "worker-app1", "worker-app2")
    report = gather_status(settings)
    assert report["worker_view_of_postgres"]["ok"] is None
    assert "db reports none fresh" in render_status(report)
    assert not [w for w in report["warnings"] if "PostgreSQL unreachable" in w]
