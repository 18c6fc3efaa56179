"""The naive design the pipeline replaces: one RQ job per operation, one statement per row.

``upsert_pane`` is the job; ``python -m perth_pipeline.bench.naive QUEUE`` runs a stock
``rq.SimpleWorker`` on it, with ``REDIS_URL`` and ``DATABASE_URL`` from the environment.
The worker process keeps one connection (the naive design at its most generous: no
connection per job).

The benchmark may run against the user's own Redis (``REDIS_URL``): a stock worker there
would unpickle, import and call whatever anyone who can write to that Redis puts on its
queue. So the naive jobs are JSON (``JSONSerializer``, never pickle), on a queue of the
benchmark's own, and the worker runs this one function and refuses any other by name,
before anything is imported (:class:`OnlyUpsertPane`).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any
from uuid import UUID

import psycopg
import redis
from rq import Queue, SimpleWorker
from rq.job import Job
from rq.serializers import JSONSerializer

from perth_pipeline import PaneRecord

from .backends import queries

__all__ = ["FUNCTION", "OnlyUpsertPane", "naive_row", "upsert_pane"]

FUNCTION = "perth_pipeline.bench.naive.upsert_pane"


class OnlyUpsertPane(Job):
    """The naive worker's jobs: :func:`upsert_pane`, and nothing else, is ever imported or run."""

    @property
    def func(self) -> Any:
        if self.func_name != FUNCTION:
            raise ValueError(f"the naive benchmark worker runs only {FUNCTION}, not {self.func_name!r}")
        return upsert_pane


def naive_row(pane: PaneRecord, session_id: UUID, version: int) -> dict[str, Any]:
    """The arguments of one naive job: the pane's fields, its session and a version."""
    return {**pane.model_dump(mode="json"), "session_id": str(session_id), "version": version}


class _Connection:
    conn: psycopg.Connection[Any] | None = None


def upsert_pane(row: dict[str, Any]) -> None:
    """One pane row, one statement, its own transaction."""
    if _Connection.conn is None or _Connection.conn.closed:
        _Connection.conn = psycopg.connect(os.environ["DATABASE_URL"], autocommit=True)
    params = {**row, "component_state": json.dumps(row["component_state"])}
    _Connection.conn.execute(queries()["naive_upsert_pane"].encode(), params)


def main(argv: list[str]) -> int:
    connection = redis.Redis.from_url(os.environ["REDIS_URL"])
    queue = Queue(argv[0], connection=connection, serializer=JSONSerializer, job_class=OnlyUpsertPane)
    worker = SimpleWorker([queue], connection=connection, serializer=JSONSerializer, job_class=OnlyUpsertPane)
    worker.work(logging_level="WARNING")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
