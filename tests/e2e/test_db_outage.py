"""PostgreSQL down, restarting, or refusing work for a while: workers wait, batches are retried.

Outages use a throwaway PostgreSQL of the test's own (perth_pipeline/testing.py); the
shared server is never stopped.
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from rq import Queue, Retry
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from perth_pipeline import PersistenceManager
from perth_pipeline.batch import JOB_FUNCTION
from perth_pipeline.broker import DbHealth, Keys, read_db_health
from perth_pipeline.operations import Batch, SessionUpsert, TabUpsert
from perth_pipeline.settings import Settings
from perth_pipeline.store import connect
from perth_pipeline.testing import ThrowawayPostgres, free_port
from workers.applier import Applier

from ..helpers import drain, now, session, tab, wait_for
from .procs import WorkerProcs, backend_of


def enqueue(settings: Settings, rconn: redis.Redis, batch: Batch, retry: Retry | None = None) -> Job:
    queue = Queue(settings.queue, connection=rconn, serializer=JSONSerializer)
    s = settings
    job = queue.create_job(
        JOB_FUNCTION,
        args=[batch.model_dump(mode="json")],
        timeout=s.job_timeout,
        retry=retry or Retry(max=len(s.retry_intervals), interval=list(s.retry_intervals)),
    )
    return queue.enqueue_job(job)


def fetch(rconn: redis.Redis, job: Job) -> Job:
    return Job.fetch(job.id, connection=rconn, serializer=JSONSerializer)


def health(settings: Settings, rconn: redis.Redis) -> DbHealth:
    return read_db_health(rconn, Keys(settings.queue), ttl=settings.health_ttl)


def newest(settings: Settings, rconn: redis.Redis) -> dict[str, Any] | None:
    """The newest fresh report of any worker."""
    return next(iter(health(settings, rconn).fresh.values()), None)


def one_session_batch(name: str = "s") -> tuple[Batch, uuid.UUID]:
    record = session(name)
    batch = Batch(
        id=uuid.uuid4(), origin="outage", created_at=now(), ops=[SessionUpsert(version=1, record=record)]
    )
    return batch, record.id


def test_retry_intervals_ride_out_a_database_restart() -> None:
    # the default back-off covers a quarter of an hour before a batch is given up
    assert sum(Settings().retry_intervals) > 15 * 60


@pytest.mark.timeout(120)
def test_a_worker_that_cannot_reach_postgres_takes_no_jobs_and_says_so(
    settings: Settings, rconn: redis.Redis, tmp_path: Path, throwaway_pg: ThrowawayPostgres
) -> None:
    s = settings.model_copy(update={"database_url": throwaway_pg.url})
    throwaway_pg.stop()
    workers = WorkerProcs(s, tmp_path, rconn)
    try:
        workers.start()
        batch, sid = one_session_batch()
        job = enqueue(s, rconn, batch)
        first = wait_for(
            lambda: (h := newest(s, rconn)) and not h["ok"] and h, timeout=30, what="a down report"
        )
        assert first and first["error"] and health(s, rconn).ok is False
        # it goes on checking and reporting, and leaves the batch (and its retries) alone
        wait_for(
            lambda: (h := newest(s, rconn)) and h["at"] > first["at"], timeout=30, what="a second report"
        )
        stored = fetch(rconn, job)
        assert stored.get_status() == JobStatus.QUEUED
        assert stored.retries_left == len(s.retry_intervals)
        throwaway_pg.start()
        wait_for(lambda: fetch(rconn, job).get_status() == JobStatus.FINISHED, timeout=60, what="the batch")
        assert health(s, rconn).ok
        assert fetch(rconn, job).retries_left == len(s.retry_intervals)
        with psycopg.connect(throwaway_pg.url) as conn:
            assert conn.execute("SELECT count(*) FROM sessions WHERE id = %s", (sid,)).fetchone() == (1,)
        assert "PostgreSQL unreachable" in workers.logs() and "reachable again" in workers.logs()
    finally:
        workers.close()


@pytest.mark.timeout(120)
def test_a_worker_cut_off_from_postgres_does_not_stop_the_producers(
    settings: Settings, rconn: redis.Redis, tmp_path: Path, pg: psycopg.Connection[Any]
) -> None:
    """Two hosts: one's network to PostgreSQL is broken, the other's is fine. The producers go on
    sending, and the batches are applied by the worker that can."""
    s = settings.model_copy(update={"health_ttl": 3})
    workers = WorkerProcs(s, tmp_path, rconn)
    try:
        fine = workers.start()
        workers.start(DATABASE_URL=f"postgresql://perth@127.0.0.1:{free_port()}/perth")
        both = wait_for(
            lambda: (h := health(s, rconn)) and len(h.up) == len(h.down) == 1 and h,
            timeout=30,
            what="one report up and one down",
        )
        assert both
        (name,) = both.up
        assert name == workers.worker(fine).name  # type: ignore[union-attr]
        assert both.ok is True
        first_at = both.fresh[name]["at"]
        # idle, the fine worker renews its report: else the cut-off one would soon be the only fresh one
        wait_for(
            lambda: health(s, rconn).fresh.get(name, {}).get("at", 0) > first_at + s.health_ttl,
            timeout=30,
            what="the idle worker to renew its report",
        )
        manager = PersistenceManager(settings=s)
        try:
            record = session("applied")
            manager.create_session(record)
            assert manager.flush(timeout=30)
            assert manager.stats()["dropped_jobs"] == 0 and not manager.stats()["database_down"]
        finally:
            manager.close()
        assert pg.execute("SELECT name FROM sessions WHERE id = %s", (record.id,)).fetchone() == ("applied",)
        # a worker that stops cleanly takes its report with it: the cut-off one is all that is left
        fine.send_signal(signal.SIGTERM)
        fine.wait(timeout=30)
        assert name.encode() not in rconn.hgetall(Keys(s.queue).db_health)
        assert health(s, rconn).ok is False
    finally:
        workers.close()


@pytest.mark.timeout(150)
def test_a_restart_mid_transaction_is_ridden_out(
    settings: Settings, rconn: redis.Redis, tmp_path: Path, throwaway_pg: ThrowawayPostgres
) -> None:
    s = settings.model_copy(update={"database_url": throwaway_pg.url})
    record = session("before")
    t = tab(record.id, name="before")
    with connect(throwaway_pg.url) as conn:
        Applier().apply(
            conn,
            Batch(
                id=uuid.uuid4(),
                origin="outage",
                created_at=now(),
                ops=[SessionUpsert(version=1, record=record), TabUpsert(version=2, record=t)],
            ),
        )
    change = Batch(
        id=uuid.uuid4(),
        origin="outage",
        created_at=now(),
        ops=[
            SessionUpsert(version=10, record=record.model_copy(update={"name": "after"})),
            TabUpsert(version=11, record=t.model_copy(update={"name": "after"})),
        ],
    )
    workers = WorkerProcs(s, tmp_path, rconn)
    lock = psycopg.connect(throwaway_pg.url)
    try:
        worker = workers.start()
        lock.execute("SELECT 1 FROM tabs WHERE id = %s FOR UPDATE", (t.id,))
        job = enqueue(s, rconn, change)
        with psycopg.connect(throwaway_pg.url, autocommit=True) as watcher:

            def mid_transaction() -> bool:
                b = backend_of(watcher, worker.pid)
                return bool(b and b["waiting_on"] == "Lock" and b["has_written"])

            wait_for(mid_transaction, timeout=30, what="the batch to wait mid-transaction")
        throwaway_pg.restart()
        wait_for(lambda: fetch(rconn, job).get_status() == JobStatus.FINISHED, timeout=90, what="the batch")
        with psycopg.connect(throwaway_pg.url) as conn:
            names = conn.execute(
                "SELECT s.name, t.name FROM sessions s JOIN tabs t ON t.session_id = s.id"
            ).fetchall()
        assert names == [("after", "after")]
        assert fetch(rconn, job).retries_left == len(s.retry_intervals) - 1  # the attempt the restart cut
    finally:
        with contextlib.suppress(psycopg.Error):
            lock.close()
        workers.close()


@pytest.mark.timeout(120)
def test_transient_failures_back_off_then_fail_with_the_reason(
    settings: Settings, rconn: redis.Redis, tmp_path: Path, pg: psycopg.Connection[Any]
) -> None:
    """A batch that keeps failing (here: a statement timeout against a held lock) is retried with
    growing intervals, then lands in the failed registry with the reason, not refused."""
    s = settings.model_copy(update={"statement_timeout": 1.0})
    record = session("held")
    with connect(settings.database_url or "") as conn:
        Applier().apply(
            conn,
            Batch(
                id=uuid.uuid4(), origin="o", created_at=now(), ops=[SessionUpsert(version=1, record=record)]
            ),
        )
    lock = psycopg.connect(settings.database_url or "")
    lock.execute("SELECT 1 FROM sessions WHERE id = %s FOR UPDATE", (record.id,))
    workers = WorkerProcs(s, tmp_path, rconn)
    intervals = [1, 3, 6]
    try:
        workers.start()
        batch = Batch(
            id=uuid.uuid4(),
            origin="o",
            created_at=now(),
            ops=[SessionUpsert(version=2, record=record.model_copy(update={"name": "never"}))],
        )
        job = enqueue(s, rconn, batch, retry=Retry(max=len(intervals), interval=intervals))
        attempts: dict[int, Any] = {}  # retries left -> when that attempt started

        def attempts_until_failed() -> bool:
            stored = fetch(rconn, job)
            status = stored.get_status(refresh=False)
            if status == JobStatus.STARTED and stored.started_at is not None:
                attempts.setdefault(stored.retries_left or 0, stored.started_at)
            return status == JobStatus.FAILED

        wait_for(attempts_until_failed, timeout=90, interval=0.01, what="the retries to run out")
        starts = [attempts[k] for k in sorted(attempts, reverse=True)]
        assert len(starts) == len(intervals) + 1, attempts
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(starts)]
        # each gap is the 1 s statement timeout plus the interval (and up to ~1 s of scheduler polling)
        for gap, interval in zip(gaps, intervals, strict=True):
            assert interval + 0.5 <= gap <= interval + 6, (gaps, intervals)
        assert gaps == sorted(gaps)
        failed = fetch(rconn, job)
        assert job.id in FailedJobRegistry(s.queue, connection=rconn).get_job_ids()
        result = failed.latest_result()
        assert result is not None and "QueryCanceled" in (result.exc_string or "")
        assert "statement timeout" in (result.exc_string or "")
        assert not failed.meta.get("perth_refused")  # not refused: the producer sends its entities again
    finally:
        lock.close()
        workers.close()


def test_an_overdue_retry_runs_without_a_scheduler_process(
    settings: Settings, rconn: redis.Redis, pg: psycopg.Connection[Any]
) -> None:
    """A retry waits in the scheduled registry for RQ's scheduler; if none runs, maintenance takes it."""
    batch, sid = one_session_batch("retried")
    queue = Queue(settings.queue, connection=rconn, serializer=JSONSerializer)
    job = queue.create_job(
        JOB_FUNCTION, args=[batch.model_dump(mode="json")], retry=Retry(max=3, interval=[1])
    )
    queue.schedule_job(job, now() - timedelta(seconds=30))  # as a retry whose scheduler died left it
    assert drain(settings)  # a worker without a scheduler
    assert fetch(rconn, job).get_status() == JobStatus.FINISHED
    assert pg.execute("SELECT name FROM sessions WHERE id = %s", (sid,)).fetchone() == ("retried",)
