"""The CPU account of a timed span: CPU seconds per process, per row committed.

Each process of the pipeline is read where it keeps its own count: this process
(``time.process_time``: the caller's write calls and the producer's flusher thread, all
threads), the worker processes and their PostgreSQL backends (``/proc/PID/stat``, so they must
run on this machine: found by pid and by ``application_name``), and Redis (``INFO cpu``, which
counts the whole server, so the benchmark's own few commands are in it too). A part that cannot
be read is None, and so is the total then.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis

__all__ = ["CpuAccount", "backend_pids", "cpu_seconds"]

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of ``pid`` so far; None when it cannot be read (another host, gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS


def backend_pids(database_url: str, application_name: str = "perth-worker %") -> list[int]:
    """The PostgreSQL backends whose ``application_name`` is like ``application_name``."""
    with psycopg.connect(database_url, autocommit=True, connect_timeout=10) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE %s AND pid <> pg_backend_pid()",
            (application_name,),
        ).fetchall()
    return [int(r[0]) for r in rows]


def _redis_cpu(redis_url: str | None) -> float | None:
    if not redis_url:
        return None
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=5)
    try:
        info: dict[str, Any] = client.info("cpu")
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    except (redis.RedisError, KeyError, ValueError):
        return None
    finally:
        client.close()


@dataclass(slots=True)
class _Reading:
    here: float
    workers: dict[int, float | None]
    backends: dict[int, float | None]
    redis: float | None


@dataclass(slots=True)
class CpuAccount:
    """CPU of the processes of a span: :meth:`start` before it, :meth:`stop` after it."""

    database_url: str
    redis_url: str | None
    worker_pids: list[int] = field(default_factory=list)
    application_name: str = "perth-worker %"  # of the backends to count (LIKE)
    _start: _Reading | None = None
    _stop: _Reading | None = None

    def _read(self) -> _Reading:
        backends = {pid: cpu_seconds(pid) for pid in backend_pids(self.database_url, self.application_name)}
        return _Reading(
            here=time.process_time(),
            workers={pid: cpu_seconds(pid) for pid in self.worker_pids},
            backends=backends,
            redis=_redis_cpu(self.redis_url),
        )

    def start(self) -> None:
        self._start = self._read()

    def stop(self) -> None:
        self._stop = self._read()

    def per_row(self, rows: int) -> dict[str, float | None]:
        """Microseconds of CPU per row of each part (``producer`` is this process), and their total."""
        if self._start is None or self._stop is None or rows <= 0:
            raise RuntimeError("CpuAccount: start() and stop() first, and count some rows")
        a, b = self._start, self._stop
        # a backend that connected during the span counts from its start (its set-up is noise)
        parts: dict[str, float | None] = {
            "producer": b.here - a.here,
            "workers": _spent(a.workers, b.workers),
            "backends": _spent(a.backends, b.backends),
            "redis": None if a.redis is None or b.redis is None else b.redis - a.redis,
        }
        values = [v for v in parts.values() if v is not None]
        parts["total"] = sum(values) if len(values) == len(parts) else None
        return {k: None if v is None else round(v / rows * 1e6, 2) for k, v in parts.items()}


def _spent(before: dict[int, float | None], after: dict[int, float | None]) -> float | None:
    """CPU seconds the processes read at the end spent since the start (or since they started)."""
    total = 0.0
    for pid, end in after.items():
        if end is None:
            return None
        total += end - (before.get(pid) or 0.0)
    return total
