"""Every use of RQ's private attributes, in one place, checked against one RQ version.

The producer and the workers lean on a few of RQ's internals where RQ has no public
way to do what they need. Each is reached through a function here, never directly,
so that an upgrade of RQ has one module to read, and ``tests/unit/test_rqcompat.py``
fails at once, naming the attribute, if an installed RQ lacks one of them
(:func:`missing`). Where RQ has a public hook, the callers use it instead.

Checked against RQ :data:`CHECKED_AGAINST` (``pyproject.toml`` pins ``rq>=2.12,<3``).
What each is for:

* ``Job._data``: the job data as stored, evaluated or not. :class:`~perth_pipeline.batch.PackedJob`
  hands RQ's ``Job.to_dict`` empty data to compress and then puts in the data it compressed
  beforehand (RQ compresses job data at zlib's default level each time a job is saved). The
  public ``Job.data`` setter would also forget the deserialized function and arguments.
* ``Queue._enqueue_job``: put an existing job (back) on a queue, at its head, in a pipeline.
  The public ``Queue.enqueue_job`` first sets up the job's dependencies (watching keys).
* ``Job._handle_failure``: file a job in the failed registry, in a pipeline, as RQ's worker
  does (an abandoned job with no retries left).
* ``Worker._exc_handlers``: the exception handlers registered with the public
  ``push_exc_handler``; the worker walks them itself (RQ's ``handle_exception`` would log the
  job's arguments, the user's data) with RQ's semantics (:func:`run_exception_handlers`), and
  hands them to ``rq.registry.clean_registries`` as RQ's own maintenance does.
* ``Worker._stop_requested``: whether a (warm) shutdown was requested, to stop waiting; and
  set (:func:`request_stop`) to stop a worker that runs in a thread, where no signal reaches it.
* ``Worker._install_signal_handlers``: overridden by the worker that runs in a thread
  (``workers/inprocess.py``): only the main thread may install signal handlers.
* ``Worker._shutdown_requested_date``: when, in memory (the public ``shutdown_requested_date``
  reads Redis, which a signal handler must not wait for).
* ``Worker._pubsub_exception_handler``: the handler RQ gives its command-channel thread.
* ``Job._success_callback_name`` and its two siblings: the callback names a job carries, read
  without importing them (the public ``success_callback`` imports the named function).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from rq.job import Job
from rq.queue import Queue
from rq.worker import BaseWorker

__all__ = [
    "CHECKED_AGAINST",
    "callback_names",
    "data_withheld",
    "enqueue_job",
    "exception_handlers",
    "fail_job",
    "missing",
    "pubsub_exception_handler",
    "request_stop",
    "run_exception_handlers",
    "shutdown_requested_at",
    "stop_requested",
    "stored_data",
]

#: The RQ version whose internals this module was checked against (``rq.__version__``).
CHECKED_AGAINST = "2.12.0"

#: Methods: looked up on the class.
_METHODS: dict[type, tuple[str, ...]] = {
    Queue: ("_enqueue_job",),
    Job: ("_handle_failure",),
    BaseWorker: ("_pubsub_exception_handler", "_install_signal_handlers"),
}
#: Attributes that RQ sets on each instance in ``__init__``.
_ATTRIBUTES: dict[type, tuple[str, ...]] = {
    Job: ("_data", "_success_callback_name", "_failure_callback_name", "_stopped_callback_name"),
    BaseWorker: ("_exc_handlers", "_stop_requested", "_shutdown_requested_date"),
}


def missing(job: Job, worker: BaseWorker) -> list[str]:
    """The private attributes used here that the installed RQ lacks (``job``, ``worker``: new instances)."""
    out = [
        f"{cls.__name__}.{name}"
        for cls, names in _METHODS.items()
        for name in names
        if not hasattr(cls, name)
    ]
    for instance, cls in ((job, Job), (worker, BaseWorker)):
        out += [f"{cls.__name__}.{name}" for name in _ATTRIBUTES[cls] if not hasattr(instance, name)]
    return out


# --- jobs -------------------------------------------------------------------------------------


def stored_data(job: Job) -> object:
    """The job's data as it holds it: bytes, or RQ's marker of data not built yet."""
    return job._data


@contextlib.contextmanager
def data_withheld(job: Job) -> Iterator[None]:
    """Within the block the job holds empty data (its function and arguments are kept)."""
    data = job._data
    job._data = b""
    try:
        yield
    finally:
        job._data = data


def callback_names(job: Job) -> tuple[str | None, str | None, str | None]:
    """The names of the job's success, failure and stopped callbacks (nothing is imported)."""
    return job._success_callback_name, job._failure_callback_name, job._stopped_callback_name


def enqueue_job(queue: Queue, job: Job, *, pipeline: Any = None, at_front: bool = False) -> None:
    """Put ``job`` on ``queue`` as it is, dependencies unchecked (in ``pipeline`` if given)."""
    queue._enqueue_job(job, pipeline=pipeline, at_front=at_front)


def fail_job(job: Job, exc_string: str, *, pipeline: Any, worker_name: str = "") -> None:
    """Move ``job`` to its failed registry with ``exc_string``, in ``pipeline``, as RQ's worker does."""
    job._handle_failure(exc_string, pipeline, worker_name=worker_name)


# --- workers ----------------------------------------------------------------------------------


def exception_handlers(worker: BaseWorker) -> list[Callable[..., Any]]:
    """The handlers registered with ``worker.push_exc_handler``, in order (RQ's own list)."""
    handlers: list[Callable[..., Any]] = worker._exc_handlers
    return handlers


def run_exception_handlers(handlers: list[Callable[..., Any]], job: Job, *exc_info: Any) -> None:
    """Call the handlers in order as RQ's ``Worker.handle_exception`` does: a handler that returns a
    false value other than None stops the chain; None (no explicit value) falls through to the next."""
    for handler in handlers:
        fallthrough = handler(job, *exc_info)
        if fallthrough is not None and not fallthrough:
            break


def stop_requested(worker: BaseWorker) -> bool:
    """Whether a shutdown of ``worker`` was requested (a first SIGTERM, or SIGINT)."""
    return bool(worker._stop_requested)


def request_stop(worker: BaseWorker) -> None:
    """Ask ``worker`` to stop after its current job (a warm shutdown), as a first SIGTERM does."""
    worker._stop_requested = True


def shutdown_requested_at(worker: BaseWorker) -> datetime | None:
    """When the last shutdown of ``worker`` was requested, as RQ keeps it in memory."""
    value: datetime | None = worker._shutdown_requested_date
    return value


def pubsub_exception_handler(worker: BaseWorker) -> Callable[..., None]:
    """The handler RQ gives the thread that listens on the worker's command channel."""
    handler: Callable[..., None] = worker._pubsub_exception_handler
    return handler
