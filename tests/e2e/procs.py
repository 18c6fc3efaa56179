"""Worker processes for end-to-end tests: ``python -m workers``, started, watched, killed.

Each worker runs in a process group of its own (with the scheduler process RQ
forks from it), logs to a file of the test's, and is identified in
``pg_stat_activity`` by ``application_name = 'perth-worker pid=<pid>'``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psycopg
import redis
from rq import Worker

from perth_pipeline.broker import make_queue
from perth_pipeline.settings import Settings

from ..helpers import wait_for

__all__ = ["WorkerProcs", "backend_of", "worker_env"]

_ENV_FIELDS = (
    "queue",
    "job_lease",
    "maintenance_interval",
    "statement_timeout",
    "job_timeout",
    "health_ttl",
    "history_retention_bytes",
    "retry_intervals",
    "db_connect_timeout",
)


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERTH_")}
    env["REDIS_URL"] = settings.redis_url or ""
    env["DATABASE_URL"] = settings.database_url or ""
    for name in _ENV_FIELDS:
        value = getattr(settings, name)
        env[f"PERTH_{name.upper()}"] = json.dumps(list(value)) if isinstance(value, tuple) else str(value)
    env["PERTH_LOG_LEVEL"] = "INFO"
    env.update(extra)
    return env


def backend_of(conn: psycopg.Connection[Any], pid: int) -> dict[str, Any] | None:
    """The worker's PostgreSQL backend: its state, what it waits on, whether it is in a transaction."""
    row = conn.execute(
        "SELECT pid, state, wait_event_type, backend_xid IS NOT NULL, xact_start IS NOT NULL "
        "FROM pg_stat_activity WHERE application_name = %s",
        (f"perth-worker pid={pid}",),
    ).fetchone()
    if row is None:
        return None
    keys = ("backend", "state", "waiting_on", "has_written", "in_transaction")
    return dict(zip(keys, row, strict=True))


class WorkerProcs:
    def __init__(self, settings: Settings, folder: Path, rconn: redis.Redis) -> None:
        self.settings = settings
        self.folder = folder
        self.redis = rconn
        self.procs: list[subprocess.Popen[bytes]] = []
        self._logs: dict[int, Path] = {}

    def start(self, *, scheduler: bool = True, wait: bool = True, **env: str) -> subprocess.Popen[bytes]:
        n = len(self.procs)
        log = self.folder / f"worker-{n}-{uuid.uuid4().hex[:6]}.log"
        args = [sys.executable, "-m", "workers"] + ([] if scheduler else ["--no-scheduler"])
        with log.open("ab") as out:
            proc = subprocess.Popen(
                args,
                env=worker_env(self.settings, **env),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.procs.append(proc)
        self._logs[proc.pid] = log
        if wait:
            wait_for(lambda: self.registered(proc), timeout=60, what=f"worker {n} to register")
        return proc

    def registered(self, proc: subprocess.Popen[bytes]) -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"worker exited with {proc.returncode}:\n{self.log(proc)}")
        return self.worker(proc) is not None

    def worker(self, proc: subprocess.Popen[bytes]) -> Worker | None:
        queue = make_queue(self.settings.queue, self.redis)
        for w in Worker.all(queue=queue):
            if w.pid == proc.pid:
                return w
        return None

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        return self._logs[proc.pid].read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(
            f"--- worker pid {pid}\n{path.read_text(errors='replace')}" for pid, path in self._logs.items()
        )

    def kill(self, proc: subprocess.Popen[bytes], *, group: bool = False) -> None:
        """SIGKILL the worker (with ``group``, its scheduler process too, as a container kill would)."""
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        proc.wait(timeout=30)

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
