"""``perth-pipeline requeue-failed``: failed batches back on the queue, minus what could resurrect rows."""

from __future__ import annotations

import subprocess
import time
import uuid
import zlib
from typing import Any

import psycopg
import pytest
import redis
from rq import Queue, Retry
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from perth_pipeline.batch import JOB_FUNCTION
from perth_pipeline.broker import Keys
from perth_pipeline.operations import Batch, SessionUpsert
from perth_pipeline.settings import Settings

from ..helpers import drain, now, run_cli, session

DAY_NS = 86400 * 10**9


def cli(
    settings: Settings, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_cli(settings, "requeue-failed", *args, env=env)


class Failed:
    """Puts jobs in the failed registry as workers leave them."""

    def __init__(self, settings: Settings, rconn: redis.Redis) -> None:
        self.settings = settings
        self.redis = rconn
        self.queue = Queue(settings.queue, connection=rconn, serializer=JSONSerializer)
        self.registry = FailedJobRegistry(queue=self.queue)

    def batch(
        self, *versions_and_names: tuple[int, str], meta: dict[str, Any] | None = None
    ) -> tuple[Job, list[uuid.UUID]]:
        records = [session(name) for _, name in versions_and_names]
        batch = Batch(
            id=uuid.uuid4(),
            origin="requeue-test",
            created_at=now(),
            ops=[
                SessionUpsert(version=v, record=r)
                for (v, _), r in zip(versions_and_names, records, strict=True)
            ],
        )
        return self.add(JOB_FUNCTION, [batch.model_dump(mode="json")], meta=meta), [r.id for r in records]

    def add(self, func: str, args: list[Any], meta: dict[str, Any] | None = None) -> Job:
        job = self.queue.create_job(func, args=args, retry=Retry(max=2, interval=[1, 1]))
        job.retries_left = 0  # spent
        job.meta.update(meta or {})
        job.set_status(JobStatus.FAILED)
        job.save()
        self.registry.add(job, ttl=3600, exc_string="TransientFailure: PostgreSQL unavailable: ...")
        return job

    def fetch(self, job: Job) -> Job:
        return Job.fetch(job.id, connection=self.redis, serializer=JSONSerializer)

    def ops_of(self, job: Job) -> list[dict[str, Any]]:
        ops: list[dict[str, Any]] = self.fetch(job).args[0]["ops"]
        return ops


@pytest.fixture
def failed(settings: Settings, rconn: redis.Redis) -> Failed:
    return Failed(settings, rconn)


def test_a_failed_batch_is_requeued_without_operations_older_than_the_tombstone_retention(
    settings: Settings, failed: Failed, pg: psycopg.Connection[Any], rconn: redis.Redis
) -> None:
    fresh, old = time.time_ns(), time.time_ns() - 40 * DAY_NS  # older than the 30-day retention
    job, (new_id, old_id, newer_id) = failed.batch(
        (fresh, "new"), (old, "long deleted"), (fresh + 1, "newer")
    )
    result = cli(settings)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"requeued {job.id}: 2 operations (1 older than the tombstone retention of 30d dropped)",
        "1 failed job(s): 1 requeued, 0 discarded, 0 deleted, 0 left in the failed registry",
    ]
    back = failed.fetch(job)
    assert back.get_status() == JobStatus.QUEUED and job.id in failed.queue.get_job_ids()
    assert failed.registry.get_job_ids() == []
    assert back.retries_left == len(settings.retry_intervals)  # a full set of retries again
    assert [op["version"] for op in failed.ops_of(job)] == [fresh, fresh + 1]
    assert "2 ops" in (back.description or "")
    # restores of its sessions wait for it again
    assert rconn.zscore(Keys(settings.queue).outstanding(new_id), job.id) is not None
    assert drain(settings)
    stored = {r[0] for r in pg.execute("SELECT id FROM sessions").fetchall()}
    assert stored == {new_id, newer_id}  # the old write, whose tombstone may be purged, never applied
    assert old_id not in stored


def test_a_batch_with_only_old_operations_is_discarded(
    settings: Settings, failed: Failed, rconn: redis.Redis
) -> None:
    job, _ = failed.batch((time.time_ns() - 31 * DAY_NS, "old"), (time.time_ns() - 60 * DAY_NS, "older"))
    result = cli(settings)
    assert result.returncode == 0, result.stderr
    assert (
        f"discarded {job.id}: its 2 operations are older than the tombstone retention (30d)" in result.stdout
    )
    assert failed.registry.get_job_ids() == [] and failed.queue.count == 0
    assert not rconn.exists(Job.key_for(job.id))


def test_refused_batches_and_foreign_jobs_are_left_unless_asked(
    settings: Settings, failed: Failed, rconn: redis.Redis
) -> None:
    refused, _ = failed.batch((time.time_ns(), "s"), meta={"perth_refused": "ops[0].record.name: too long"})
    foreign = failed.add("os.system", ["touch /tmp/x"])
    result = cli(settings)
    assert result.returncode == 0, result.stderr
    assert f"skipped {refused.id}: refused by the workers (ops[0].record.name: too long)" in result.stdout
    assert f"skipped {foreign.id}: not a batch of this project: it runs 'os.system'" in result.stdout
    assert "0 requeued, 0 discarded, 0 deleted, 2 left in the failed registry" in result.stdout
    assert sorted(failed.registry.get_job_ids()) == sorted([refused.id, foreign.id])

    result = cli(settings, "--include-refused")
    assert result.returncode == 0, result.stderr
    assert f"requeued {refused.id}: 1 operations" in result.stdout
    assert "perth_refused" not in failed.fetch(refused).meta
    assert failed.registry.get_job_ids() == [foreign.id]

    result = cli(settings, "--delete-skipped")
    assert result.returncode == 0, result.stderr
    assert f"deleted {foreign.id}: not a batch of this project" in result.stdout
    assert failed.registry.get_job_ids() == [] and not rconn.exists(Job.key_for(foreign.id))


def test_a_dry_run_changes_nothing(settings: Settings, failed: Failed) -> None:
    job, _ = failed.batch((time.time_ns(), "s"), (time.time_ns() - 40 * DAY_NS, "old"))
    gone, _ = failed.batch((time.time_ns() - 40 * DAY_NS, "old"))
    result = cli(settings, "--dry-run", "--delete-skipped")
    assert result.returncode == 0, result.stderr
    assert f"requeued {job.id}: 1 operations" in result.stdout
    assert f"discarded {gone.id}" in result.stdout
    assert result.stdout.rstrip().endswith("(dry run: nothing changed)")
    assert sorted(failed.registry.get_job_ids()) == sorted([job.id, gone.id])
    assert len(failed.ops_of(job)) == 2 and failed.queue.count == 0


def test_an_unreachable_redis_is_one_clear_line_without_the_password(settings: Settings) -> None:
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = cli(settings, env={"REDIS_URL": f"redis://:hunter2-secret@127.0.0.1:{port}/0"})
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "Redis unreachable" in result.stderr and "Traceback" not in result.stderr
    assert "hunter2-secret" not in result.stderr + result.stdout


def test_a_deeply_nested_job_in_the_failed_registry_is_skipped_not_a_crash(
    settings: Settings, failed: Failed, rconn: redis.Redis
) -> None:
    job = failed.add(JOB_FUNCTION, [{}])
    rconn.hset(Job.key_for(job.id), "data", zlib.compress(b"[" * 200_000 + b"]" * 200_000))
    result = cli(settings)
    assert result.returncode in (0, 1), result.stderr
    assert "Traceback" not in result.stderr and "RecursionError" not in result.stderr
    assert "nested too deeply" in result.stdout + result.stderr
