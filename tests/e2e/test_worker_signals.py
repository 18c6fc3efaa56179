"""Workers killed, stopped and timed out in the middle of a batch: rolled back, run again.

To land a signal inside an open transaction for certain, the test holds a row
lock on a tab: the batch first rewrites its session (uncommitted), then waits
on that lock, which ``pg_stat_activity`` shows (a transaction with an xid,
waiting on a Lock). A worker's backend is found by its application_name.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from rq import Queue, Retry, Worker
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer
from rq.utils import utcparse

from perth_pipeline.batch import JOB_FUNCTION
from perth_pipeline.broker import Keys, read_db_health
from perth_pipeline.operations import Batch, SessionUpsert, TabUpsert
from perth_pipeline.settings import Settings
from perth_pipeline.store import connect
from workers.applier import Applier
from workers.context import JobContext

from ..helpers import now, session, tab, wait_for
from .procs import WorkerProcs, backend_of

ORIGINAL, CHANGED = "original", "changed by the batch"


@pytest.fixture
def procs(
    settings: Settings, tmp_path: Path, rconn: redis.Redis
) -> Iterator[Callable[[Settings], WorkerProcs]]:
    made: list[WorkerProcs] = []

    def make(for_settings: Settings) -> WorkerProcs:
        made.append(WorkerProcs(for_settings, tmp_path, rconn))
        return made[-1]

    yield make
    for group in made:
        group.close()
        print(group.logs())  # shown when the test failed


class Scene:
    """A stored session and tab, a batch that changes both, and a lock that holds it mid-transaction."""

    def __init__(self, settings: Settings, rconn: redis.Redis, pg: psycopg.Connection[Any]) -> None:
        self.settings = settings
        self.redis = rconn
        self.pg = pg
        self.queue = Queue(settings.queue, connection=rconn, serializer=JSONSerializer)
        self.session = session(ORIGINAL)
        self.tab = tab(self.session.id, name=ORIGINAL)
        stored = Batch(
            id=uuid.uuid4(),
            origin="signals",
            created_at=now(),
            ops=[SessionUpsert(version=1, record=self.session), TabUpsert(version=2, record=self.tab)],
        )
        with connect(settings.database_url or "") as conn:
            Applier().apply(conn, stored)
        self._lock: psycopg.Connection[Any] | None = None

    def enqueue_change(self) -> Job:
        change = Batch(
            id=uuid.uuid4(),
            origin="signals",
            created_at=now(),
            ops=[
                SessionUpsert(version=10, record=self.session.model_copy(update={"name": CHANGED})),
                TabUpsert(version=11, record=self.tab.model_copy(update={"name": CHANGED})),
            ],
        )
        return self.enqueue(change)

    def enqueue(self, batch: Batch) -> Job:
        s = self.settings
        job = self.queue.create_job(
            JOB_FUNCTION,
            args=[batch.model_dump(mode="json")],
            job_id=str(batch.id),
            timeout=s.job_timeout,
            failure_ttl=s.failed_ttl,
            retry=Retry(max=len(s.retry_intervals), interval=list(s.retry_intervals)),
        )
        return self.queue.enqueue_job(job)

    def lock_tab(self) -> None:
        self._lock = psycopg.connect(self.settings.database_url or "")  # a transaction, held open
        self._lock.execute("SELECT 1 FROM tabs WHERE id = %s FOR UPDATE", (self.tab.id,))

    def release(self) -> None:
        if self._lock is not None:
            self._lock.rollback()
            self._lock.close()
            self._lock = None

    def blocked_mid_transaction(self, proc: Any) -> bool:
        b = backend_of(self.pg, proc.pid)
        return b is not None and b["waiting_on"] == "Lock" and b["has_written"] and b["in_transaction"]

    def names(self) -> tuple[str, str]:
        row = self.pg.execute(
            "SELECT s.name, t.name FROM sessions s JOIN tabs t ON t.session_id = s.id WHERE s.id = %s",
            (self.session.id,),
        ).fetchone()
        assert row is not None
        return row[0], row[1]

    def status(self, job: Job) -> JobStatus:
        return Job.fetch(job.id, connection=self.redis, serializer=JSONSerializer).get_status()

    def fetch(self, job: Job) -> Job:
        return Job.fetch(job.id, connection=self.redis, serializer=JSONSerializer)


@pytest.fixture
def scene(settings: Settings, rconn: redis.Redis, pg: psycopg.Connection[Any]) -> Iterator[Scene]:
    s = Scene(settings, rconn, pg)
    yield s
    s.release()


def worker_named(procs: WorkerProcs, proc: Any) -> str:
    w = procs.worker(proc)
    assert w is not None
    return str(w.name)


@pytest.mark.timeout(180)
def test_sigkill_mid_batch_rolls_back_and_another_worker_runs_it_within_60s(
    settings: Settings, scene: Scene, procs: Callable[[Settings], WorkerProcs], rconn: redis.Redis
) -> None:
    """With the default lease and maintenance interval, and with the killed worker's locks left behind."""
    defaults = Settings()
    s = settings.model_copy(
        update={"job_lease": defaults.job_lease, "maintenance_interval": defaults.maintenance_interval}
    )
    group = procs(s)
    first = group.start()  # starts first: it holds the scheduler lock
    job = None
    scene.lock_tab()
    job = scene.enqueue_change()
    wait_for(
        lambda: scene.blocked_mid_transaction(first), timeout=30, what="the batch to wait mid-transaction"
    )
    second = group.start()
    first_name, second_name = worker_named(group, first), worker_named(group, second)

    group.kill(first, group=True)  # the worker and its scheduler process, as a container kill would
    killed_at = time.monotonic()
    # as if it died inside its registry maintenance: RQ's 15-minute lock and our short one left behind
    rconn.set(f"rq:clean_registries:{s.queue}", first_name, ex=899)
    rconn.set(Keys(s.queue).maintenance_lock, first_name, ex=max(s.maintenance_interval, 5))

    # the server notices the vanished client while its statement still waits: the transaction is gone
    wait_for(
        lambda: backend_of(scene.pg, first.pid) is None, timeout=15, what="the killed worker's backend to end"
    )
    assert scene.names() == (ORIGINAL, ORIGINAL)
    scene.release()

    wait_for(lambda: scene.status(job) == JobStatus.FINISHED, timeout=60, what="the batch to run again")
    elapsed = time.monotonic() - killed_at
    assert elapsed < 60, elapsed
    assert scene.names() == (CHANGED, CHANGED)
    rerun = scene.fetch(job)
    assert rerun.worker_name == second_name
    assert rerun.retries_left == len(s.retry_intervals) - 1  # one retry spent on the abandoned run
    assert "abandoned by its worker" in group.log(second)


@pytest.mark.timeout(120)
def test_the_heartbeat_keeps_a_long_batch_leased(
    settings: Settings, scene: Scene, procs: Callable[[Settings], WorkerProcs]
) -> None:
    s = settings.model_copy(update={"job_lease": 3, "maintenance_interval": 1})
    group = procs(s)
    first = group.start()
    scene.lock_tab()
    job = scene.enqueue_change()
    wait_for(
        lambda: scene.blocked_mid_transaction(first), timeout=30, what="the batch to wait mid-transaction"
    )
    second = group.start()  # runs maintenance every second: it would take over a lapsed lease
    started = time.monotonic()
    wait_for(lambda: time.monotonic() - started > 4 * s.job_lease, timeout=30, what="four leases to pass")
    assert scene.status(job) == JobStatus.STARTED
    assert backend_of(scene.pg, second.pid) is None or not backend_of(scene.pg, second.pid)["in_transaction"]
    scene.release()
    wait_for(lambda: scene.status(job) == JobStatus.FINISHED, timeout=30, what="the batch to finish")
    done = scene.fetch(job)
    assert done.worker_name == worker_named(group, first)
    assert done.retries_left == len(s.retry_intervals)  # never abandoned, never retried
    assert "abandoned" not in group.logs()


def shutdown_requested_at(rconn: redis.Redis, name: str) -> datetime | None:
    raw = rconn.hget(Worker.redis_worker_namespace_prefix + name, "shutdown_requested_date")
    return utcparse(raw.decode()) if raw else None


@pytest.mark.timeout(120)
def test_sigterm_finishes_the_current_batch_then_exits(
    settings: Settings, scene: Scene, procs: Callable[[Settings], WorkerProcs], rconn: redis.Redis
) -> None:
    group = procs(settings)
    worker = group.start()
    name = worker_named(group, worker)
    scene.lock_tab()
    job = scene.enqueue_change()
    wait_for(
        lambda: scene.blocked_mid_transaction(worker), timeout=30, what="the batch to wait mid-transaction"
    )
    other = session("queued behind")
    behind = scene.enqueue(
        Batch(
            id=uuid.uuid4(), origin="signals", created_at=now(), ops=[SessionUpsert(version=1, record=other)]
        )
    )
    worker.send_signal(signal.SIGTERM)
    wait_for(lambda: shutdown_requested_at(rconn, name) is not None, timeout=10, what="the stop request")
    assert worker.poll() is None  # still finishing its batch
    scene.release()
    assert worker.wait(timeout=60) == 0
    assert scene.status(job) == JobStatus.FINISHED
    assert scene.names() == (CHANGED, CHANGED)
    assert scene.status(behind) == JobStatus.QUEUED  # it took nothing more


@pytest.mark.timeout(120)
def test_a_second_sigterm_rolls_the_batch_back_and_puts_it_back(
    settings: Settings, scene: Scene, procs: Callable[[Settings], WorkerProcs], rconn: redis.Redis
) -> None:
    group = procs(settings)
    worker = group.start()
    name = worker_named(group, worker)
    scene.lock_tab()
    job = scene.enqueue_change()
    wait_for(
        lambda: scene.blocked_mid_transaction(worker), timeout=30, what="the batch to wait mid-transaction"
    )
    worker.send_signal(signal.SIGTERM)
    requested = wait_for(lambda: shutdown_requested_at(rconn, name), timeout=10, what="the stop request")
    # RQ takes a repeat within a second for the same signal sent twice: this one comes later
    wait_for(
        lambda: (datetime.now(UTC) - requested).total_seconds() > 1.2, timeout=10, what="a second to pass"
    )
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0  # gone while the lock is still held: the statement was cancelled
    assert backend_of(scene.pg, worker.pid) is None
    assert scene.names() == (ORIGINAL, ORIGINAL)
    put_back = scene.fetch(job)
    assert put_back.get_status() == JobStatus.QUEUED
    assert scene.queue.get_job_ids()[0] == job.id  # at the head of the queue
    assert put_back.retries_left == len(settings.retry_intervals)  # an interruption is not a failure
    assert "interrupted by a cold shutdown" in group.log(worker)
    scene.release()
    group.start()
    wait_for(lambda: scene.status(job) == JobStatus.FINISHED, timeout=30, what="another worker to run it")
    assert scene.names() == (CHANGED, CHANGED)


@pytest.mark.timeout(120)
def test_a_statement_timeout_is_retried_not_refused(
    settings: Settings, scene: Scene, procs: Callable[[Settings], WorkerProcs], rconn: redis.Redis
) -> None:
    s = settings.model_copy(update={"statement_timeout": 1.0})
    group = procs(s)
    worker = group.start()
    scene.lock_tab()
    job = scene.enqueue_change()
    retries = len(settings.retry_intervals)
    wait_for(lambda: scene.fetch(job).retries_left < retries, timeout=30, what="a timed-out attempt")
    health = read_db_health(rconn, Keys(s.queue), ttl=s.health_ttl)
    assert health.ok and not health.down, health  # a slow statement is not a database outage
    assert "QueryCanceled" in group.log(worker) and "statement timeout" in group.log(worker)
    scene.release()
    wait_for(lambda: scene.status(job) == JobStatus.FINISHED, timeout=30, what="a retry to apply it")
    assert scene.names() == (CHANGED, CHANGED)
    assert not scene.fetch(job).meta.get("perth_refused")


def test_statement_timeout_stays_below_the_job_timeout(settings: Settings, rconn: redis.Redis) -> None:
    for statement, job_timeout, expected in ((300.0, 60, "30s"), (5.0, 60, "5s")):
        s = settings.model_copy(update={"statement_timeout": statement, "job_timeout": job_timeout})
        context = JobContext(s, rconn)
        try:
            row = context.connection().execute("SHOW statement_timeout").fetchone()
            assert row == (expected,)
            name = context.connection().execute("SHOW application_name").fetchone()
            assert name == (f"perth-worker pid={os.getpid()}",)
        finally:
            context.close()
