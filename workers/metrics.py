"""Prometheus metrics of the workers: ``perth-pipeline worker --metrics-port [HOST:]PORT``.

What a worker process counts as it applies batches:

* ``perth_batches_applied_total``, ``perth_operations_applied_total``, ``perth_rows_written_total``
* ``perth_apply_duration_seconds``: a histogram of the time one batch took to apply
* ``perth_batch_retries_total{reason}``: ``deadlock`` (the transaction was run again inside
  the job), ``database`` (the job failed on an outage and RQ retries it later) or
  ``abandoned`` (its worker died mid-batch and it was put back on the queue)
* ``perth_batch_failures_total{reason}``: batches that ended in the failed registry,
  ``refused`` (not a valid batch, not an allowed job) or ``error``

and what the endpoint reads from Redis when it is scraped (the same for every worker of a
queue: aggregate them with ``max``, not ``sum``):

* ``perth_queue_depth``, ``perth_queue_lag_seconds`` (age of the oldest queued batch),
  ``perth_queue_started``, ``perth_queue_scheduled``, ``perth_queue_failed``
* ``perth_producers_live`` and ``perth_producers_<counter>``: the counters that every live
  producer publishes (``dropped_jobs``, ``dropped_entities``, ``coalesced``, ``resynced``...),
  summed over the producers
* ``perth_redis_up``: 0 when the scrape could not read Redis

With ``--processes N`` the worker processes share one endpoint, served by the supervising
process: prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, a temporary
directory made here and removed at exit). One scrape target per host, whatever N is, and
counters keep counting across a restarted child.

prometheus-client is the ``metrics`` extra: without it, recording is a no-op and
``--metrics-port`` fails with a clear message.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import redis
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry

from perth_pipeline.broker import Keys, make_queue, make_redis
from perth_pipeline.masking import masked_logger
from perth_pipeline.settings import Settings, mask_url
from perth_pipeline.status import producer_totals, queue_lag

__all__ = ["parse_address", "record_batch", "record_failure", "serve_metrics"]

logger = masked_logger("workers.metrics")

#: Apply latency buckets (seconds): a small batch takes a few ms, a 1000-op one tens of ms.
_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_REFUSALS = ("PoisonBatch", "UnknownJobFunction")


class _Metrics:
    """The worker's own metrics, made on first use (after PROMETHEUS_MULTIPROC_DIR is known)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.batches = Counter("perth_batches_applied", "Batches applied and committed.", registry=r)
        self.operations = Counter("perth_operations_applied", "Operations in applied batches.", registry=r)
        self.rows = Counter("perth_rows_written", "Rows written by applied batches.", registry=r)
        self.latency = Histogram(
            "perth_apply_duration_seconds",
            "Time to apply one batch (one transaction, retries included).",
            buckets=_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "perth_batch_retries", "Batches run again, by reason.", labelnames=("reason",), registry=r
        )
        self.failures = Counter(
            "perth_batch_failures",
            "Batches that ended in the failed registry, by reason.",
            labelnames=("reason",),
            registry=r,
        )
        # every label value exists from the start: rate() over a series that appears late misses a step
        for reason in ("deadlock", "database", "abandoned"):
            self.retries.labels(reason=reason)
        for reason in ("refused", "error"):
            self.failures.labels(reason=reason)


class _Process:
    """This process's metrics: made once, on first use; None without prometheus-client."""

    metrics: _Metrics | None = None
    tried = False
    lock = threading.Lock()


def _metrics() -> _Metrics | None:
    if not _Process.tried:
        with _Process.lock:
            if not _Process.tried:
                try:
                    _Process.metrics = _Metrics()
                except ImportError:  # the `metrics` extra is not installed: record nothing
                    _Process.metrics = None
                _Process.tried = True
    return _Process.metrics


def record_batch(result: Any) -> None:
    """A batch was applied (``result``: the applier's ``ApplyResult``)."""
    m = _metrics()
    if m is None:
        return
    m.batches.inc()
    m.operations.inc(result.ops)
    m.rows.inc(result.rows_written)
    m.latency.observe(result.ms / 1000.0)
    if result.attempts > 1:
        m.retries.labels(reason="deadlock").inc(result.attempts - 1)


def record_failure(job: Any, exc_type: type[BaseException] | None) -> None:
    """A job failed; called before RQ decides, so ``job.should_retry`` tells what happens next."""
    m = _metrics()
    if m is None:
        return
    name = exc_type.__name__ if exc_type is not None else ""
    if job.should_retry:
        m.retries.labels(reason="abandoned" if name == "AbandonedJobError" else "database").inc()
        return
    m.failures.labels(reason="refused" if name in _REFUSALS else "error").inc()


# --- the endpoint ------------------------------------------------------------------------------


class QueueCollector:
    """Queue and producer figures, read from Redis at each scrape (short timeouts: a scrape never hangs)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = Keys(settings.queue)
        self._client = make_redis(settings.redis_url or "", connect_timeout=0.5, socket_timeout=2.0)

    def describe(self) -> list[Any]:
        return []  # figures are read at scrape time only, never at registration

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("perth_redis_up", "1 if this scrape could read the queue from Redis.")
        try:
            families = list(self._read(GaugeMetricFamily))
        except redis.RedisError as exc:
            logger.warning(
                "metrics: cannot read the queue from Redis (%s)",
                exc,
                extra={"redis": mask_url(self.settings.redis_url)},
            )
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _read(self, gauge: Any) -> Iterator[Any]:
        queue = make_queue(self.settings.queue, self._client)
        label = [self.settings.queue]

        def one(name: str, doc: str, value: float | None) -> Any:
            family = gauge(name, doc, labels=["queue"])
            if value is not None:
                family.add_metric(label, value)
            return family

        yield one("perth_queue_depth", "Batches waiting on the queue.", queue.count)
        yield one("perth_queue_lag_seconds", "Age of the oldest batch on the queue.", queue_lag(queue) or 0.0)
        yield one("perth_queue_started", "Batches being applied.", StartedJobRegistry(queue=queue).count)
        yield one(
            "perth_queue_scheduled",
            "Batches waiting for a retry.",
            ScheduledJobRegistry(queue=queue).count,  # type: ignore[no-untyped-call]
        )
        yield one(
            "perth_queue_failed", "Batches in the failed registry.", FailedJobRegistry(queue=queue).count
        )
        producers = producer_totals(self._client, self.keys)
        yield one("perth_producers_live", "Producers that published their counters.", producers["live"])
        for name, value in producers["totals"].items():
            metric = "perth_producers_" + re.sub(r"[^a-zA-Z0-9_]", "_", name)
            yield one(metric, f"Sum over live producers of their {name!r} counter.", value)


def parse_address(text: str) -> tuple[str, int]:
    """``"9100"`` (loopback), ``"0.0.0.0:9100"`` or ``"[::]:9100"`` as (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host = "127.0.0.1"
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"--metrics-port {text!r}: expected PORT or HOST:PORT") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"--metrics-port {text!r}: port out of range")
    return host, number


def serve_metrics(settings: Settings, address: str, *, processes: int = 1) -> tuple[str, int]:
    """Start the endpoint in a daemon thread of this process; returns where it listens.

    With ``processes > 1`` this process supervises the workers: it sets
    ``PROMETHEUS_MULTIPROC_DIR`` for the children it is about to start (they inherit
    ``os.environ``) and serves what they record.
    """
    host, port = parse_address(address)
    try:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector
    except ImportError:
        raise SystemExit(
            "--metrics-port needs prometheus-client: pip install 'perth-pipeline[metrics]'"
        ) from None
    if processes > 1:
        folder = tempfile.mkdtemp(prefix="perth-metrics-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=folder)  # type: ignore[no-untyped-call]
    else:
        from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

        m = _metrics()
        assert m is not None
        registry = m.registry
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    registry.register(QueueCollector(settings))
    server, _ = start_http_server(port, addr=host, registry=registry)
    bound = server.server_address
    logger.info(
        "serving Prometheus metrics on http://%s:%d/metrics",
        host,
        bound[1],
        extra={"processes": processes},
    )
    return host, int(bound[1])
