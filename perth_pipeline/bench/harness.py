"""The benchmark behind ``perth-pipeline bench``: every case in one process run, one table, JSON.

The backends come from ``REDIS_URL`` and ``DATABASE_URL``, or embedded servers
when neither is set (``CliState.backends``); the benchmark works in a database
of its own on that server and in queues of its own. The latency case runs on
throwaway servers that it starts, pauses and stops itself.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import redis

from perth_pipeline import PaneHistoryChunk, PaneRecord
from perth_pipeline.settings import Settings

from .backends import bench_database
from .drain import run_drain
from .freshness import freshness_updates, run_freshness
from .latency import CONDITIONS, LatencyConfig, run_latency
from .report import evaluate
from .restore import run_restore
from .throughput import run_ceiling, run_end_to_end, run_hot_key, run_naive
from .workload import Tree, build_tree, scrollback, title_updates

__all__ = ["CASES", "QUICK", "Sizes", "run_bench"]

CASES = ("latency", "end-to-end", "workers-only", "hot-key", "ceiling", "naive", "freshness", "restore")


@dataclass(frozen=True, slots=True)
class Sizes:
    """The sizes of every case; the defaults are issue 5's and issue 3's."""

    calls: int = 100_000
    calls_per_ms: int = 20
    latency_panes: int = 10_000
    naive_calls: int = 5_000
    pause_ms: int = 3_000
    sessions: int = 10
    tabs: int = 1_000
    panes: int = 100_000
    workers: tuple[int, ...] = (1, 2)
    hot_updates: int = 100_000
    hot_panes: int = 1_000
    naive_sample: int = 1_000
    fresh_rate: int = 1_000
    fresh_seconds: float = 10.0
    restore_runs: int = 50
    restore_bytes: int = 1 << 20


#: ``--quick``: a smoke test of every case in about a minute (numbers not comparable with the targets).
QUICK = Sizes(
    calls=10_000,
    latency_panes=1_000,
    naive_calls=200,
    pause_ms=1_000,
    sessions=2,
    tabs=20,
    panes=2_000,
    hot_updates=5_000,
    hot_panes=100,
    naive_sample=50,
    fresh_seconds=2.0,
    restore_runs=5,
    restore_bytes=64 << 10,
)


def _machine(settings: Settings | None) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    if settings is not None:
        info["backends"] = "embedded" if os.environ.get("REDIS_URL") is None else "REDIS_URL/DATABASE_URL"
        with psycopg.connect(settings.database_url or "", autocommit=True) as conn:
            info["postgresql"] = conn.info.parameter_status("server_version")
        client = redis.Redis.from_url(settings.redis_url or "", socket_timeout=5)
        try:
            info["redis"] = client.info("server").get("redis_version")
        finally:
            client.close()
    return info


@dataclass(slots=True)
class _Workloads:
    """Every record the run writes, built before any timing and then frozen (``gc.freeze()``)."""

    latency_tree: Tree
    latency_updates: list[PaneRecord]
    tree: Tree
    hot_tree: Tree
    hot_updates: list[PaneRecord]
    fresh_tree: Tree
    fresh_updates: list[PaneRecord]
    restore_tree: Tree
    history: list[PaneHistoryChunk]

    @classmethod
    def build(cls, cases: tuple[str, ...], sizes: Sizes) -> _Workloads:
        latency_tree = build_tree(10, 100, sizes.latency_panes, name="latency")
        hot_tree = build_tree(1, 10, sizes.hot_panes, name="hot", seed=4)
        fresh_tree = build_tree(1, 10, 100, name="fresh", seed=5)
        restore_tree = build_tree(1, 10, 100, name="restore", seed=6)
        per_pane = sizes.restore_bytes // len(restore_tree.panes)
        return cls(
            latency_tree=latency_tree,
            latency_updates=title_updates(latency_tree.panes, sizes.calls) if "latency" in cases else [],
            tree=build_tree(sizes.sessions, sizes.tabs, sizes.panes),
            hot_tree=hot_tree,
            hot_updates=title_updates(hot_tree.panes, sizes.hot_updates) if "hot-key" in cases else [],
            fresh_tree=fresh_tree,
            fresh_updates=freshness_updates(fresh_tree, int(sizes.fresh_rate * sizes.fresh_seconds)),
            restore_tree=restore_tree,
            history=[
                chunk
                for n, pane in enumerate(restore_tree.panes)
                for chunk in scrollback(pane.id, per_pane, 4096, seed=n)
            ],
        )


def run_bench(
    cases: tuple[str, ...],
    sizes: Sizes,
    settings: Settings | None,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Run ``cases``; ``settings`` (with both URLs) is needed by every case but ``latency``."""
    result: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": _machine(settings),
        "sizes": dataclasses.asdict(sizes),
        "flush_interval_s": Settings().flush_interval,
        "cases": list(cases),
    }
    log_dir = Path(tempfile.mkdtemp(prefix="perth-bench-logs-"))
    progress("building records (before any timing), then gc.freeze()")
    w = _Workloads.build(cases, sizes)
    gc.collect()
    gc.freeze()
    started = time.perf_counter()
    if "latency" in cases:
        cfg = LatencyConfig(
            calls=sizes.calls,
            per_tick=sizes.calls_per_ms,
            naive_calls=sizes.naive_calls,
            pause_ms=sizes.pause_ms,
            conditions=CONDITIONS,
        )
        result["latency"] = run_latency(w.latency_tree, w.latency_updates, cfg, progress)
    if settings is not None and set(cases) - {"latency"}:
        with bench_database(settings.database_url or "") as database_url:
            base = settings.with_urls(settings.redis_url, database_url)
            _run_database_cases(result, cases, sizes, base, w, log_dir=log_dir, progress=progress)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["worker_logs"] = str(log_dir)
    result["targets"] = evaluate(result)
    return result


def _run_database_cases(
    result: dict[str, Any],
    cases: tuple[str, ...],
    sizes: Sizes,
    base: Settings,
    w: _Workloads,
    *,
    log_dir: Path,
    progress: Callable[[str], None],
) -> None:
    throughput: dict[str, Any] = {}
    if "end-to-end" in cases:
        for workers in sizes.workers:
            progress(f"end to end: {w.tree.rows:,} rows, {workers} worker process(es)")
            throughput[f"end_to_end_{workers}"] = run_end_to_end(base, w.tree, workers, log_dir)
    if "workers-only" in cases:
        for workers in sizes.workers:
            progress(f"workers only: {w.tree.rows:,} rows queued beforehand, {workers} worker process(es)")
            throughput[f"drain_{workers}"] = run_drain(base, w.tree, workers, log_dir)
    if "ceiling" in cases:
        progress(f"ceiling: {len(w.tree.panes):,} pane rows, COPY + one merge, one connection")
        throughput["ceiling"] = run_ceiling(base.database_url or "", w.tree)
    if "naive" in cases:
        progress(f"naive: {sizes.naive_sample:,} jobs, one per operation, SimpleWorker")
        throughput["naive"] = run_naive(base, w.tree, sizes.naive_sample, log_dir)
    if "hot-key" in cases:
        progress(f"hot key: {len(w.hot_updates):,} updates to {len(w.hot_tree.panes):,} panes")
        throughput["hot_key"] = run_hot_key(base, w.hot_tree, w.hot_updates, log_dir)
    if throughput:
        result["throughput"] = throughput
    if "freshness" in cases:
        progress(f"freshness: {len(w.fresh_updates):,} writes at {sizes.fresh_rate:,}/s")
        result["freshness"] = run_freshness(
            base, w.fresh_tree, w.fresh_updates, rate=sizes.fresh_rate, log_dir=log_dir
        )
    if "restore" in cases:
        progress(f"restore: 1 session, 100 panes, {sizes.restore_bytes:,} bytes of scrollback")
        result["restore"] = run_restore(base, w.restore_tree, w.history, sizes.restore_runs, log_dir)
