"""The shipped enqueue script (``perth_pipeline/lua/enqueue.lua``): how any client enqueues one batch.

A producer in another language runs the script with ``EVALSHA`` (docs/protocol.md); this module
gives Python the same script and the keys and arguments it takes, for tests and for tools that
would rather not go through RQ. The Python producer itself enqueues through RQ
(:mod:`perth_pipeline.flusher`); a test holds the two to the same job layout.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import cache
from importlib import resources
from typing import Any
from uuid import UUID

from .broker import Keys

__all__ = ["ENQUEUE_SCRIPT", "enqueue_args", "enqueue_keys", "enqueue_script", "run_enqueue"]

#: Where the script lives inside the package.
ENQUEUE_SCRIPT = "lua/enqueue.lua"


@cache
def enqueue_script() -> str:
    """The text of ``perth_pipeline/lua/enqueue.lua``."""
    return resources.files("perth_pipeline").joinpath(ENQUEUE_SCRIPT).read_text(encoding="utf-8")


def enqueue_keys(queue: str, job_id: str, sessions: Iterable[UUID | str]) -> list[str]:
    """The script's KEYS for the batch ``job_id`` touching ``sessions`` on ``queue``."""
    keys = Keys(queue)
    return [
        f"rq:queue:{queue}",
        f"rq:job:{job_id}",
        "rq:queues",
        *(keys.outstanding(s) for s in sorted({str(s) for s in sessions})),
    ]


def enqueue_args(
    queue: str,
    job_id: str,
    data: bytes,
    description: str,
    *,
    timeout: int,
    result_ttl: int,
    failure_ttl: int,
    retry_intervals: Iterable[int],
) -> list[Any]:
    """The script's ARGV (``data``: RQ's job data, zlib-compressed or as it is)."""
    return [
        job_id,
        queue,
        data,
        description,
        timeout,
        result_ttl,
        failure_ttl,
        json.dumps(list(retry_intervals)),
    ]


def run_enqueue(client: Any, keys: list[str], args: list[Any]) -> int:
    """Run the script on ``client`` (a redis-py client): EVALSHA, loading it on NOSCRIPT. 1 if enqueued,
    0 if a job with this id exists already."""
    script = client.register_script(enqueue_script())
    return int(script(keys=keys, args=args))
