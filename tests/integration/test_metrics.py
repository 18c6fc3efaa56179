"""Prometheus metrics of the workers, scraped from `perth-pipeline worker --metrics-port`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis

from perth_pipeline import PersistenceManager
from perth_pipeline.batch import JOB_FUNCTION, describe
from perth_pipeline.broker import make_queue
from perth_pipeline.settings import Settings
from perth_pipeline.testing import free_port
from workers import metrics

from ..helpers import pane, require, require_module, session, tab, wait_for

prometheus_client = require_module("prometheus_client")  # the `metrics` extra (part of `dev`)
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def answers(port: int) -> Samples | None:
    try:
        return scrape(port)
    except (urllib.error.URLError, ConnectionError):
        return None


@pytest.fixture
def start_worker(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start `perth-pipeline worker ARGS...` on the test's queue; stopped (and its children) at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "REDIS_URL": settings.redis_url or "",
            "DATABASE_URL": settings.database_url or "",
            "PERTH_QUEUE": settings.queue,
            "TMPDIR": str(tmp_path),  # where the multiprocess directory goes
        }
        log = (tmp_path / f"worker-{len(started)}.log").open("wb")
        with log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "perth_pipeline.cli", "worker", *args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # a warm shutdown: the worker leaves the registry
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def write_batches(manager: PersistenceManager, sessions: int) -> None:
    for n in range(sessions):
        s = session(f"s{n}")
        t = tab(s.id)
        manager.create_session(s)
        manager.create_tab(t)
        for i in range(3):
            manager.create_pane(pane(t.id, i))


def enqueue_poison(settings: Settings, rconn: redis.Redis) -> None:
    queue = make_queue(settings.queue, rconn)
    payload = {"format": 999, "id": str(uuid.uuid4()), "origin": "x", "created_at": "x", "ops": [{}]}
    job = queue.create_job(JOB_FUNCTION, args=(payload,), description=describe(1, [uuid.uuid4()]))
    queue.enqueue_job(job)


def refused_and_listed(port: int, queue: str) -> Samples | None:
    """The scrape once the worker has counted the refused batch and it is in the failed registry."""
    samples = scrape(port)
    refused = value(samples, "perth_batch_failures_total", reason="refused")
    return samples if refused and value(samples, "perth_queue_failed", queue=queue) else None


def test_a_worker_exposes_batches_operations_latency_failures_and_the_queue(
    settings: Settings, rconn: redis.Redis, start_worker: Callable[..., subprocess.Popen[bytes]]
) -> None:
    port = free_port()
    start_worker("--metrics-port", f"127.0.0.1:{port}")
    before = wait_for(lambda: answers(port), timeout=60, what="the metrics endpoint")
    assert value(before, "perth_batches_applied_total") == 0
    assert value(before, "perth_batch_failures_total", reason="refused") == 0
    assert value(before, "perth_redis_up") == 1

    small = settings.model_copy(update={"batch_max_ops": 4})
    with PersistenceManager(settings=small) as manager:
        write_batches(manager, 3)
        assert manager.flush(timeout=60), manager.stats()  # committed by the worker under test
        stats = manager.stats()
        # the producer's counters reach the metrics through Redis (it publishes every few seconds)
        wait_for(
            lambda: (
                value(scrape(port), "perth_producers_enqueued_ops", queue=settings.queue)
                == stats["enqueued_ops"]
            ),
            timeout=30,
            what="the producer's counters in the metrics",
        )
        enqueue_poison(settings, rconn)
        after = wait_for(lambda: refused_and_listed(port, settings.queue), timeout=60, what="the refusal")
    batches = stats["committed_jobs"]
    assert batches >= 3  # 4 operations per batch at most
    assert value(after, "perth_batches_applied_total") == batches
    assert value(after, "perth_operations_applied_total") == stats["enqueued_ops"] == 15
    assert value(after, "perth_rows_written_total") == 15
    assert value(after, "perth_apply_duration_seconds_count") == batches
    assert 0 < (value(after, "perth_apply_duration_seconds_sum") or 0) < 60
    assert value(after, "perth_apply_duration_seconds_bucket", le="+Inf") == batches
    assert value(after, "perth_batch_failures_total", reason="refused") == 1
    assert value(after, "perth_batch_failures_total", reason="error") == 0
    assert value(after, "perth_queue_depth", queue=settings.queue) == 0
    assert value(after, "perth_queue_failed", queue=settings.queue) == 1
    assert (value(after, "perth_producers_live", queue=settings.queue) or 0) >= 1
    assert value(after, "perth_producers_dropped_jobs", queue=settings.queue) == 0
    assert value(after, "process_resident_memory_bytes") is not None  # the usual process metrics too


def test_worker_processes_share_one_endpoint(
    settings: Settings, tmp_path: Path, start_worker: Callable[..., subprocess.Popen[bytes]]
) -> None:
    port = free_port()
    supervisor = start_worker("--processes", "2", "--metrics-port", f"127.0.0.1:{port}")
    wait_for(lambda: answers(port), timeout=60, what="the metrics endpoint")
    small = settings.model_copy(update={"batch_max_ops": 3})
    with PersistenceManager(settings=small) as manager:
        write_batches(manager, 4)
        assert manager.flush(timeout=60), manager.stats()
        stats = manager.stats()
    samples = scrape(port)
    # what both children applied, summed by the supervisor's endpoint
    assert value(samples, "perth_batches_applied_total") == stats["committed_jobs"]
    assert value(samples, "perth_operations_applied_total") == stats["enqueued_ops"] == 20
    assert value(samples, "perth_apply_duration_seconds_count") == stats["committed_jobs"]
    assert len(list(tmp_path.glob("perth-metrics-*"))) == 1

    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=60) == 0
    assert not list(tmp_path.glob("perth-metrics-*")), "the multiprocess directory is removed at exit"


def test_retries_and_failures_are_counted_by_reason() -> None:
    m = metrics._metrics()
    require(m is not None, "prometheus-client is not installed")
    assert m is not None

    def sample(name: str, reason: str) -> float:
        return m.registry.get_sample_value(name, {"reason": reason}) or 0.0

    before = {
        key: sample(*key)
        for key in [
            ("perth_batch_retries_total", "deadlock"),
            ("perth_batch_retries_total", "database"),
            ("perth_batch_retries_total", "abandoned"),
            ("perth_batch_failures_total", "refused"),
            ("perth_batch_failures_total", "error"),
        ]
    }
    metrics.record_batch(SimpleNamespace(ops=2, rows_written=2, ms=3.0, attempts=3))
    metrics.record_failure(SimpleNamespace(should_retry=True), ConnectionError)
    metrics.record_failure(SimpleNamespace(should_retry=False), ConnectionError)

    class PoisonBatch(Exception):
        pass

    metrics.record_failure(SimpleNamespace(should_retry=False), PoisonBatch)

    class AbandonedJobError(Exception):
        pass

    metrics.record_failure(SimpleNamespace(should_retry=True), AbandonedJobError)
    assert (
        sample("perth_batch_retries_total", "abandoned") - before[("perth_batch_retries_total", "abandoned")]
        == 1
    )
    assert (
        sample("perth_batch_retries_total", "deadlock") - before[("perth_batch_retries_total", "deadlock")]
        == 2
    )
    assert (
        sample("perth_batch_retries_total", "database") - before[("perth_batch_retries_total", "database")]
        == 1
    )
    assert (
        sample("perth_batch_failures_total", "error") - before[("perth_batch_failures_total", "error")] == 1
    )
    assert (
        sample("perth_batch_failures_total", "refused") - before[("perth_batch_failures_total", "refused")]
        == 1
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [("9100", ("127.0.0.1", 9100)), ("0.0.0.0:9100", ("0.0.0.0", 9100)), ("[::]:9100", ("::", 9100))],
)
def test_metrics_address(text: str, expected: tuple[str, int]) -> None:
    assert metrics.parse_address(text) == expected
    with pytest.raises(ValueError, match="metrics-port"):
        metrics.parse_address("host:http")
