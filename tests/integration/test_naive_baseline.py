"""The benchmark's naive baseline never runs what someone else put on its queue (it may be your Redis)."""

from __future__ import annotations

from pathlib import Path

import redis
from rq import Queue, SimpleWorker
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from perth_pipeline.bench.naive import OnlyUpsertPane


def test_the_naive_worker_runs_only_its_own_function(
    rconn: redis.Redis, queue_name: str, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    queue = Queue(queue_name, connection=rconn, serializer=JSONSerializer, job_class=OnlyUpsertPane)
    foreign = queue.enqueue("os.system", f"touch {marker}")
    worker = SimpleWorker([queue], connection=rconn, serializer=JSONSerializer, job_class=OnlyUpsertPane)
    try:
        worker.work(burst=True, logging_level="WARNING")
        assert not marker.exists()
        assert foreign.id in FailedJobRegistry(queue=queue).get_job_ids()
    finally:
        queue.delete(delete_jobs=True)
