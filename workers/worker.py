"""The worker class: an ``rq.SimpleWorker`` that runs only this project's jobs.

* No fork per job; one PostgreSQL connection per process (``JobContext``).
* Allowlist: before anything runs, a job is vetted (:meth:`PerthJob.refusal`): its
  function is looked up by name in ``workers.jobs.ALLOWED`` (nothing is imported),
  its data must be JSON of RQ's job format and of bounded size, its arguments must
  fit the function, and it may carry no callbacks or webhooks. A refused job goes
  to the failed registry with the reason, without retries; the worker goes on.
  A job hash that RQ cannot even read is moved there too instead of stopping the worker; a job
  is filed under the queue it was taken from, whatever origin its hash names (RQ files the
  failure of a hash without ``origin`` under a queue named ""). An id whose key is not a hash
  at all is dropped from the queue with a warning (RQ drops the id of a missing job silently).
* A short started-job lease kept alive by a heartbeat thread while a job runs,
  and a short maintenance interval under a short lock of our own: a batch whose
  worker was SIGKILLed is put back at the head of the queue by another worker
  within a minute (RQ's defaults: no heartbeat during a SimpleWorker job, job
  timeout + 60 s lease, maintenance every 600 s under a 899 s lock, and an
  abandoned job retried through the scheduler). Maintenance also enqueues
  retries that are overdue, should RQ's scheduler process be gone.
* SIGTERM: the current batch is finished, then the worker exits. A second SIGTERM
  (a cold shutdown) cancels the statement, rolls the batch back and puts it back
  at the head of the queue.
* While PostgreSQL is unreachable the worker takes no jobs (and says so in its
  field of the health hash) instead of burning the retries of the jobs on the queue.
  An idle worker checks PostgreSQL and renews its report every ``health_ttl / 3``
  seconds, so that producers keep hearing from a worker that is up while another,
  cut off from PostgreSQL, reports it down. A worker that stops removes its report.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from datetime import timedelta
from types import FrameType
from typing import Any

import redis
from rq import SimpleWorker
from rq.exceptions import StopRequested
from rq.job import Job
from rq.registry import clean_registries
from rq.utils import now
from rq.worker_registration import clean_worker_registry

from perth_pipeline import rqcompat
from perth_pipeline.broker import Keys
from perth_pipeline.masking import masked_logger
from perth_pipeline.settings import Settings

from . import context, jobs, metrics, registries
from .context import JobContext
from .serializer import JobSerializer
from .vetting import MAX_JOB_BYTES, PerthJob, UnknownJobFunction, UnreadableJobHash, short

__all__ = ["MAX_JOB_BYTES", "PerthJob", "PerthWorker", "UnknownJobFunction"]

logger = masked_logger("workers.worker")


#: How often the worker's command-channel thread wakes (RQ: 60 s; see PerthWorker.subscribe).
_PUBSUB_WAKE = 1.0


class PerthWorker(SimpleWorker):
    job_class = PerthJob

    def __init__(self, queues: Any, *, settings: Settings, connection: Any, name: str | None = None) -> None:
        self.settings = settings
        super().__init__(
            queues,
            name=name,
            connection=connection,
            serializer=JobSerializer,
            job_class=PerthJob,
            maintenance_interval=settings.maintenance_interval,
            worker_ttl=20,
            log_job_description=False,
            default_result_ttl=settings.result_ttl,
        )
        self.context = JobContext(settings, connection, name=self.name)
        context.bind(self.context)
        self._beat_stop = threading.Event()
        self._cold_shutdown = False
        self.log_result_lifespan = False

    def handle_exception(self, job: Job, *exc_info: Any) -> None:
        """One line with the reason; never the job's arguments (they are the user's data)."""
        exc_type, exc = exc_info[0], exc_info[1]
        if self._cold_shutdown and isinstance(exc, SystemExit):
            logger.warning(
                "batch %s interrupted by a cold shutdown: rolled back, put back on the queue",
                job.id,
                extra={"job_id": job.id, "queue": job.origin},
            )
            return
        expected = isinstance(exc, jobs.PoisonBatch | jobs.TransientFailure | UnknownJobFunction)
        logger.log(
            logging.WARNING if expected else logging.ERROR,
            "batch %s failed: %s: %s",
            job.id,
            exc_type.__name__,
            exc,
            exc_info=None if expected else exc_info,
            extra={"job_id": job.id, "queue": job.origin},
        )
        metrics.record_failure(job, exc_type)
        # the handlers pushed with push_exc_handler, walked as RQ walks them (its handle_exception
        # would also log the job's arguments): only an explicit false value stops the chain
        rqcompat.run_exception_handlers(rqcompat.exception_handlers(self), job, *exc_info)

    def handle_job_failure(
        self, job: Job, queue: Any, started_job_registry: Any = None, exc_string: str = ""
    ) -> None:
        if self._cold_shutdown:
            self._put_back(job, queue)
            return
        # RQ keeps a failed job a year unless told otherwise, and a refused job that someone else
        # enqueued says nothing: bound every failed job's stay (and its arguments) by the setting
        if job.failure_ttl is None or not 0 <= job.failure_ttl <= self.settings.failed_ttl:
            job.failure_ttl = self.settings.failed_ttl
        super().handle_job_failure(
            job, queue, started_job_registry=started_job_registry, exc_string=exc_string
        )

    # --- signals: a second SIGTERM rolls the batch back and puts it back ------------------------

    def request_force_stop(self, signum: int, frame: FrameType | None) -> None:
        requested = rqcompat.shutdown_requested_at(self)
        if requested is None or now() - requested >= timedelta(seconds=1):
            # RQ ignores a repeat within a second (the same signal, sent twice by a pool)
            self._cold_shutdown = True
        super().request_force_stop(signum, frame)

    def _put_back(self, job: Job, queue: Any) -> None:
        """The job was interrupted (its transaction rolled back): at the head of the queue, no retry used."""
        try:
            with self.connection.pipeline() as pipe:
                self.cleanup_execution(job, pipeline=pipe)
                job.started_at = None
                job.ended_at = None
                rqcompat.enqueue_job(queue, job, pipeline=pipe, at_front=True)
                pipe.execute()
        except redis.RedisError:
            logger.warning("could not put batch %s back; it is run again once its lease expires", job.id)

    # --- the lease: short, and kept alive while a job runs ---------------------------------

    def get_heartbeat_ttl(self, job: Job) -> int:
        return int(self.settings.job_lease)

    def execute_job(self, job: Job, queue: Any) -> None:
        self._beat_stop.clear()
        beat = threading.Thread(
            target=self._heartbeat_loop, args=(job,), name="perth-job-heartbeat", daemon=True
        )
        beat.start()
        try:
            super().execute_job(job, queue)
        finally:
            self._beat_stop.set()
            beat.join(timeout=5)

    def _heartbeat_loop(self, job: Job) -> None:
        interval = max(1.0, self.settings.job_lease / 3)
        while not self._beat_stop.wait(interval):
            try:
                if self.execution is not None:
                    self.maintain_heartbeats(job)
            except Exception:  # a missed beat only shortens the lease; the job goes on
                logger.debug("job heartbeat failed", exc_info=True)

    # --- maintenance under a short lock of our own ----------------------------------------

    def clean_registries(self) -> None:
        lock_ttl = max(self.settings.maintenance_interval, 5)
        for queue in self.queues:
            key = Keys(queue.name).maintenance_lock
            if not self.connection.set(key, self.name, nx=True, ex=lock_ttl):
                continue
            try:
                for step in (self._requeue_abandoned, self._enqueue_overdue, self._clean_rq_registries):
                    try:
                        step(queue)
                    except (redis.RedisError, StopRequested):
                        raise  # Redis failed, or a signal asked this worker to stop: not one job's fault
                    except Exception:  # one unreadable job must not stop the maintenance of the rest
                        logger.exception("registry maintenance of queue %s failed", queue.name)
            finally:
                if self.connection.get(key) == self.name.encode():
                    self.connection.delete(key)
        self.last_cleaned_at = now()  # type: ignore[assignment]

    def _clean_rq_registries(self, queue: Any) -> None:
        clean_registries(queue, rqcompat.exception_handlers(self))
        clean_worker_registry(queue)
        queue.intermediate_queue.cleanup(self, queue)

    def _requeue_abandoned(self, queue: Any) -> None:
        registries.requeue_abandoned(self.connection, queue, self.settings)

    def _enqueue_overdue(self, queue: Any) -> None:
        registries.enqueue_overdue(self.connection, queue, self.settings)

    # --- taking jobs: not while PostgreSQL is down; never stopped by an unreadable job ---------

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        idle_until = None if max_idle_time is None else time.monotonic() + max_idle_time
        while True:
            if not self._wait_for_database(burst=timeout is None):
                return None
            # waiting in slices: between two, PostgreSQL is checked and this worker's report renewed
            idle_slice = max(1, math.floor(self.settings.health_ttl / 3))
            if idle_until is not None:
                left = math.ceil(idle_until - time.monotonic())
                if left <= 0:
                    return None
                idle_slice = min(idle_slice, left)
            try:
                result = super().dequeue_job_and_maintain_ttl(timeout, idle_slice)
            except Exception as exc:
                job_id = getattr(exc, "job_id", None)  # set by RQ when it could not read a job
                if job_id is None or (isinstance(exc, redis.RedisError) and not _not_a_hash(exc)):
                    raise  # Redis failed (a timeout, a lost connection), not the job: nothing to refuse
                queue = getattr(exc, "queue", None) or self.queues[0]
                if _not_a_hash(exc):
                    self._drop_foreign(queue, str(job_id))
                else:
                    # an UnreadableJobHash names the field; anything else RQ raised, by its type and message
                    what = (
                        str(exc)
                        if isinstance(exc, UnreadableJobHash)
                        else f"{type(exc).__name__}: {short(str(exc))}"
                    )
                    reason = f"unreadable job: {what}"
                    registries.quarantine(self.connection, queue, str(job_id), reason, self.settings)
                continue
            if result is not None:
                job, queue = result
                if isinstance(job, PerthJob):
                    job.taken_from(queue.name)
            if result is not None or timeout is None or rqcompat.stop_requested(self):
                return result

    def _drop_foreign(self, queue: Any, job_id: str) -> None:
        """The id names a key that is not a hash: no job, and nothing to file it under (a failed
        registry entry would break its readers). Dropped from the queue as RQ drops the id of a
        job that does not exist, but said, and the key is left alone."""
        key = Job.key_for(job_id)
        kind = self.connection.type(key)
        for name in (queue.key, queue.intermediate_queue_key):
            self.connection.lrem(name, 0, job_id)
        logger.warning(
            "job %s dropped from queue %s: its key %s is a Redis %s, not a job hash",
            job_id,
            queue.name,
            key,
            kind.decode() if isinstance(kind, bytes) else kind,
            extra={"job_id": job_id, "queue": queue.name},
        )

    def _wait_for_database(self, *, burst: bool) -> bool:
        """Wait (with back-off) until PostgreSQL takes writes; False when stopping, or in burst mode."""
        delay = 1.0
        while not self.context.check_database():
            if rqcompat.stop_requested(self) or burst:
                return False
            self.heartbeat()
            self.procline(f"PostgreSQL unreachable; retrying in {delay:.0f}s")  # type: ignore[no-untyped-call]
            _interruptible_sleep(self, delay)
            delay = min(delay * 2, 10.0)
        return True

    def subscribe(self) -> None:
        # RQ's own (rq/worker/base.py, checked against RQ 2.12 and redis-py 8.2): the same channel
        # and handler, but its listening thread wakes every second instead of every 60. redis-py
        # 8.2's PubSubWorkerThread.stop() waits for the thread, which, once unsubscribed, sleeps
        # out its whole interval: every worker's stop (a burst worker's end, a SIGTERM) took a minute.
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(  # type: ignore[assignment]
            sleep_time=_PUBSUB_WAKE, daemon=True, exception_handler=rqcompat.pubsub_exception_handler(self)
        )

    def teardown(self) -> None:
        try:
            super().teardown()  # type: ignore[no-untyped-call]
        finally:
            self.context.close()
            context.bind(None)


def _not_a_hash(exc: BaseException) -> bool:
    """Whether reading a job failed because its key holds another type (a string, a list...)."""
    return isinstance(exc, redis.ResponseError) and str(exc).startswith("WRONGTYPE")


def _interruptible_sleep(worker: PerthWorker, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not rqcompat.stop_requested(worker):
        time.sleep(min(0.2, deadline - time.monotonic()))
