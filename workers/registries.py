"""Keeping RQ's registries moving when workers die: what maintenance does besides RQ's own cleaning.

* :func:`requeue_abandoned`: a job whose lease ran out (its worker was killed, or
  lost Redis) goes back to the head of the queue at once, one retry spent. RQ
  would retry it through the scheduler after the retry interval, and a scheduler
  killed with its worker keeps its lock for a minute.
* :func:`enqueue_overdue`: retries long past their time are enqueued, should RQ's
  scheduler process (one, in one worker) be gone.
* :func:`quarantine`: a job hash RQ cannot even read goes to the failed registry
  with the reason, instead of stopping every worker that dequeues it.

None of these imports or runs anything named by a job (they handle
:class:`~workers.vetting.PerthJob`, whose callbacks are never imported).
"""

from __future__ import annotations

import zlib
from typing import Any

import redis
from rq.exceptions import AbandonedJobError, NoSuchJobError, StopRequested
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.utils import current_timestamp, now, utcformat

from perth_pipeline import rqcompat
from perth_pipeline.masking import masked_logger
from perth_pipeline.settings import Settings

from . import metrics
from .vetting import PerthJob, short

__all__ = ["enqueue_overdue", "quarantine", "requeue_abandoned"]

logger = masked_logger("workers.registries")

_FINAL = (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED)
#: seconds past due after which maintenance takes a scheduled retry (RQ's scheduler polls each second)
OVERDUE = 5


def _fetch(connection: redis.Redis, queue: Any, job_id: str, settings: Settings) -> Job | None:
    try:
        return PerthJob.fetch(job_id, connection=connection, serializer=JSONSerializer)
    except NoSuchJobError:
        return None
    except StopRequested:
        raise  # a signal arrived during the read: the job is fine, the worker is stopping
    except Exception as exc:  # a hash RQ cannot read
        reason = f"unreadable job: {type(exc).__name__}: {short(str(exc))}"
        quarantine(connection, queue, job_id, reason, settings)
        return None


def requeue_abandoned(connection: redis.Redis, queue: Any, settings: Settings) -> None:
    """Jobs whose lease expired: back at the head of the queue, one retry spent (or failed, if none)."""
    registry = StartedJobRegistry(
        queue.name, connection=connection, job_class=PerthJob, serializer=JSONSerializer
    )
    entries: list[Any] = connection.zrangebyscore(registry.key, 0, current_timestamp())
    for entry in entries:
        job_id = registry.parse_job_id(entry.decode() if isinstance(entry, bytes) else str(entry))
        job = _fetch(connection, queue, job_id, settings)
        if job is None or job.get_status(refresh=False) in _FINAL:
            connection.zrem(registry.key, entry)  # gone, or it ended after all: only its lease was left
        else:
            _put_back_abandoned(connection, queue, settings, job, lease=(registry.key, entry))


def _put_back_abandoned(
    connection: redis.Redis, queue: Any, settings: Settings, job: Job, *, lease: tuple[str, Any]
) -> None:
    with connection.pipeline() as pipe:
        pipe.zrem(*lease)
        metrics.record_failure(job, AbandonedJobError)
        if job.retries_left is not None and job.retries_left > 0:
            job.retries_left -= 1
            job.started_at = None
            rqcompat.enqueue_job(queue, job, pipeline=pipe, at_front=True)
            outcome = f"put back at the head of the queue ({job.retries_left} retries left)"
        else:
            if job.failure_ttl is None or not 0 <= job.failure_ttl <= settings.failed_ttl:
                job.failure_ttl = settings.failed_ttl
            job.set_status(JobStatus.FAILED, pipeline=pipe)
            rqcompat.fail_job(
                job,
                "AbandonedJobError: its worker stopped heart-beating (killed?) and no retries are left",
                pipeline=pipe,
                worker_name="",
            )
            outcome = "moved to the failed registry (no retries left)"
        pipe.execute()
    logger.warning(
        "batch %s abandoned by its worker (no heartbeat for %d s); %s",
        job.id,
        settings.job_lease,
        outcome,
        extra={"job_id": job.id, "queue": queue.name},
    )


def enqueue_overdue(connection: redis.Redis, queue: Any, settings: Settings) -> None:
    """Scheduled retries long past due, enqueued; each is claimed by removing it from the registry."""
    registry = ScheduledJobRegistry(  # type: ignore[no-untyped-call]
        queue.name, connection=connection, job_class=PerthJob, serializer=JSONSerializer
    )
    for job_id in registry.get_jobs_to_schedule(current_timestamp() - OVERDUE):
        if not connection.zrem(registry.key, job_id):
            continue  # the scheduler took it meanwhile
        job = _fetch(connection, queue, job_id, settings)
        if job is None:
            continue
        rqcompat.enqueue_job(queue, job, at_front=job.should_enqueue_at_front())
        logger.info(
            "batch %s was due for a retry and no scheduler took it: enqueued",
            job_id,
            extra={"job_id": job_id, "queue": queue.name},
        )


def quarantine(connection: redis.Redis, queue: Any, job_id: str, reason: str, settings: Settings) -> None:
    """A job hash RQ cannot read: to the failed registry with the reason, off the queue."""
    key = Job.key_for(job_id)
    with connection.pipeline() as pipe:
        pipe.hset(
            key,
            mapping={
                "status": JobStatus.FAILED.value,
                "exc_info": zlib.compress(reason.encode()),
                "ended_at": utcformat(now()),
            },
        )
        pipe.expire(key, settings.failed_ttl)
        failed = FailedJobRegistry(queue.name, connection=connection)
        pipe.zadd(failed.key, {job_id: current_timestamp() + settings.failed_ttl})
        pipe.lrem(queue.intermediate_queue_key, 0, job_id)
        pipe.execute()
    logger.warning("job %s refused: %s", job_id, reason, extra={"job_id": job_id, "queue": queue.name})
