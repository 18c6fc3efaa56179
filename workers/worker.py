"""The worker class: an ``rq.SimpleWorker`` that runs only this project's jobs.

* No fork per job; one PostgreSQL connection per process (``JobContext``).
* Allowlist: a job's function is looked up by name in ``workers.jobs.ALLOWED``
  before anything is imported; any other name (``os.system``...) and any
  callback is refused, and the job goes to the failed registry with the reason.
* A short started-job lease kept alive by a heartbeat thread while a job runs,
  and a short maintenance interval under a short lock of our own: a batch whose
  worker was SIGKILLed is run again by another worker within a minute (RQ's
  defaults: no heartbeat during a SimpleWorker job, job timeout + 60 s lease,
  maintenance every 600 s under a 899 s lock).
* While PostgreSQL is unreachable the worker takes no jobs (and says so in the
  health key) instead of burning the retries of the jobs on the queue.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from rq import SimpleWorker
from rq.exceptions import DeserializationError
from rq.job import Job
from rq.registry import clean_registries
from rq.serializers import JSONSerializer
from rq.worker_registration import clean_worker_registry

from perth_pipeline.settings import Settings

from . import jobs
from .context import JobContext

__all__ = ["PerthJob", "PerthWorker", "UnknownJobFunction"]

logger = logging.getLogger("workers.worker")


class UnknownJobFunction(Exception):
    """A job names a function this project does not define: refused, never imported."""


class PerthJob(Job):
    """A job whose function is resolved through the allowlist only."""

    @property
    def func(self) -> Any:
        try:
            name = self.func_name
        except DeserializationError:
            self.retries_left = 0
            raise UnknownJobFunction("job data is not valid JSON of this project's format") from None
        function = jobs.ALLOWED.get(name or "")
        if function is None or self.instance is not None:
            self.retries_left = 0
            raise UnknownJobFunction(
                f"refused job function {name!r}: this worker runs only {sorted(jobs.ALLOWED)}"
            )
        return function

    # Callbacks are function names stored in Redis: refuse them rather than import them.
    @property
    def success_callback(self) -> Any:
        return self._refuse_callback(self._success_callback_name)

    @property
    def failure_callback(self) -> Any:
        return self._refuse_callback(self._failure_callback_name)

    @property
    def stopped_callback(self) -> Any:
        return self._refuse_callback(self._stopped_callback_name)

    def _refuse_callback(self, name: str | None) -> None:
        if name:
            self.retries_left = 0
            raise UnknownJobFunction(f"refused callback {name!r}: callbacks are not allowed")


class PerthWorker(SimpleWorker):
    job_class = PerthJob

    def __init__(self, queues: Any, *, settings: Settings, connection: Any, name: str | None = None) -> None:
        self.settings = settings
        super().__init__(
            queues,
            name=name,
            connection=connection,
            serializer=JSONSerializer,
            job_class=PerthJob,
            maintenance_interval=settings.maintenance_interval,
            worker_ttl=20,
            log_job_description=False,
            default_result_ttl=settings.result_ttl,
        )
        self.context = JobContext(settings, connection, name=self.name)
        jobs.bind(self.context)
        self._beat_stop = threading.Event()
        self.log_result_lifespan = False

    def handle_exception(self, job: Job, *exc_info: Any) -> None:
        """One line with the reason; never the job's arguments (they are the user's data)."""
        exc_type, exc = exc_info[0], exc_info[1]
        expected = isinstance(exc, jobs.PoisonBatch | UnknownJobFunction)
        logger.log(
            logging.WARNING if expected else logging.ERROR,
            "batch %s failed: %s: %s",
            job.id,
            exc_type.__name__,
            exc,
            exc_info=None if expected else exc_info,
            extra={"job_id": job.id, "queue": job.origin},
        )
        for handler in self._exc_handlers:
            if not handler(job, *exc_info):
                break

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
            key = f"perth:{queue.name}:maintenance:lock"
            if self.connection.set(key, self.name, nx=True, ex=lock_ttl):
                try:
                    clean_registries(queue, self._exc_handlers)
                    clean_worker_registry(queue)
                    queue.intermediate_queue.cleanup(self, queue)
                finally:
                    self.connection.delete(key)
        self.last_cleaned_at = _utcnow()

    # --- PostgreSQL down: take no jobs ---------------------------------------------------------

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None) -> Any:
        delay = 1.0
        while not self.context.check_database():
            if self._stop_requested:
                return None
            self.heartbeat()
            self.procline(f"PostgreSQL unreachable; retrying in {delay:.0f}s")  # type: ignore[no-untyped-call]
            _interruptible_sleep(self, delay)
            delay = min(delay * 2, 10.0)
            if timeout is not None and timeout <= 0:
                return None
        return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)

    def teardown(self) -> None:
        try:
            super().teardown()  # type: ignore[no-untyped-call]
        finally:
            self.context.close()
            jobs.bind(None)


def _interruptible_sleep(worker: PerthWorker, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not worker._stop_requested:
        time.sleep(min(0.2, deadline - time.monotonic()))


def _utcnow() -> Any:
    from rq.utils import now

    return now()
