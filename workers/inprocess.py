"""A worker in a thread of the caller's process: the quick-try stack of ``PersistenceManager.embedded()``.

Production runs workers as processes (``perth-pipeline worker``, ``workers/runner.py``). A
script or a notebook trying the library wants its writes applied without a second terminal:
:class:`ThreadWorker` runs one :class:`~workers.worker.PerthWorker` (an ``rq.SimpleWorker``)
in a daemon thread, with no scheduler process (overdue retries are enqueued by the worker's
own maintenance) and no signal handlers (only the main thread may install them; the caller's
stay as they are): a job's time limit is kept by a timer instead of SIGALRM.
:meth:`ThreadWorker.stop` asks it to stop after the batch in hand, as a first SIGTERM does,
and waits for it.

The terminal's side never imports this package by name (docs/design.md, "Layering"):
``perth_pipeline/localstack.py`` loads this module by its name when a script asks for it.
"""

from __future__ import annotations

import threading

from rq.timeouts import TimerDeathPenalty

from perth_pipeline import rqcompat
from perth_pipeline.broker import make_queue, make_redis
from perth_pipeline.masking import masked_logger
from perth_pipeline.settings import Settings

from .worker import PerthJob, PerthWorker

__all__ = ["ThreadWorker"]

logger = masked_logger("workers.inprocess")

#: The health report's lifetime of a worker in a thread: renewed every second (health_ttl / 3),
#: and so the longest an idle worker blocks on the queue before it sees a stop request.
_HEALTH_TTL = 3


class _WorkerInThread(PerthWorker):
    # a job's time limit by a timer, not SIGALRM: only the main thread may set a signal handler
    death_penalty_class = TimerDeathPenalty

    def _install_signal_handlers(self) -> None:
        """Install none: signal handlers belong to the main thread (and are the caller's)."""


class ThreadWorker:
    """One worker applying batches in a daemon thread of this process until :meth:`stop`."""

    def __init__(self, settings: Settings) -> None:
        if not settings.redis_url or not settings.database_url:
            raise ValueError("a worker needs both a Redis URL and a database URL")
        self.settings = settings.model_copy(update={"health_ttl": _HEALTH_TTL})
        # it blocks on the queue for a second at a time: its read timeout is longer than that
        self._connection = make_redis(self.settings.redis_url or "", connect_timeout=5.0, socket_timeout=30.0)
        queue = make_queue(self.settings.queue, self._connection, job_class=PerthJob)
        self._worker = _WorkerInThread([queue], settings=self.settings, connection=self._connection)
        self._thread = threading.Thread(target=self._run, name="perth-worker-thread", daemon=True)

    def start(self) -> ThreadWorker:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self._worker.work(burst=False, with_scheduler=False, logging_level="WARNING")
        except Exception:
            logger.exception("the worker thread stopped")
        finally:
            self._connection.close()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop after the batch in hand; True once the thread has ended (within ``timeout``)."""
        rqcompat.request_stop(self._worker)
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return not self._thread.is_alive()
