"""Refusing the current job: it goes to the failed registry at once, marked so that nobody sends it again.

Both job modules refuse (``workers.jobs`` a batch, ``workers.maintenance`` cleanup options), and
``workers.jobs`` imports ``workers.maintenance`` to allowlist its function: the refusal lives
here, below both, so that neither imports the other's private names (nor at call time).
"""

from __future__ import annotations

import contextlib

import redis
from rq import get_current_job

from perth_pipeline.wire import mark_refused

__all__ = ["PoisonBatch", "refuse"]


class PoisonBatch(Exception):
    """The job's payload cannot be applied, now or later: it goes to the failed registry."""

    # Its name in a failed job's exc_info, which operators read and search (docs/operations.md):
    # it has always been, and stays, workers.jobs.PoisonBatch (where it is exported).
    __module__ = "workers.jobs"


def refuse(reason: str) -> PoisonBatch:
    """Mark the current job refused, no retries left, and return the exception to raise."""
    job = get_current_job()
    if job is not None:
        job.retries_left = 0  # retrying cannot help: straight to the failed registry
        # tells the producer not to send the same entities again (it would be refused again)
        mark_refused(job.meta, reason)
        with contextlib.suppress(redis.RedisError):
            job.save_meta()  # type: ignore[no-untyped-call]
    return PoisonBatch(reason)
