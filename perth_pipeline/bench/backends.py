"""What the cases run against: a database of the benchmark's own, worker processes, queues.

The benchmark never touches data it did not make: it creates a database
``perth_bench_<hex>`` on the PostgreSQL server it is given (and drops it at the
end), and every case uses a queue of its own, whose keys are removed afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
import redis
from psycopg.conninfo import make_conninfo
from rq import Queue, Worker
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

from perth_pipeline.settings import Settings
from perth_pipeline.store import Store

__all__ = ["WorkerPool", "bench_database", "drop_queue", "queries", "unique_queue"]

_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


@functools.cache
def queries() -> dict[str, str]:
    """The named statements of ``perth_pipeline/bench/bench.sql``."""
    text = resources.files("perth_pipeline.bench").joinpath("bench.sql").read_text(encoding="utf-8")
    parts = _NAME.split(text)
    out: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [line for line in body.strip().splitlines() if not line.lstrip().startswith("--")]
        out[name] = "\n".join(lines).strip()
    return out


def unique_queue(case: str) -> str:
    return f"perth-bench-{case}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def bench_database(server_url: str) -> Iterator[str]:
    """A fresh database with the schema on the server of ``server_url``; dropped afterwards."""
    name = f"perth_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}".encode())
    url = make_conninfo(server_url, dbname=name)
    store = Store(url)
    try:
        store.init_db()
    finally:
        store.close()
    try:
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)".encode())


def truncate(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(queries()["truncate"].encode())


def count_rows(database_url: str) -> dict[str, int]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(queries()["count_rows"].encode()).fetchone()
    assert row is not None
    return {"sessions": int(row[0]), "tabs": int(row[1]), "panes": int(row[2])}


def drop_queue(redis_url: str, queue: str) -> None:
    """Remove what a case left in Redis: its jobs, registries and this project's keys for it."""
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=30)
    try:
        q = Queue(queue, connection=client)
        ids: set[str] = set(q.get_job_ids())
        for registry in (FinishedJobRegistry, FailedJobRegistry, StartedJobRegistry):
            ids.update(registry(queue=q).get_job_ids())
        keys = [f"rq:job:{i}" for i in ids] + [f"rq:results:{i}" for i in ids]
        keys += [k.decode() for k in client.scan_iter(match=f"rq:*:{queue}", count=1000)]
        keys += [k.decode() for k in client.scan_iter(match=f"perth:{queue}:*", count=1000)]
        keys.append(q.key)
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
    except redis.RedisError:
        pass  # a server that went away (a throwaway one) keeps nothing worth cleaning
    finally:
        client.close()


class WorkerPool:
    """``count`` worker processes (``python -m workers``, as the Supervisor runs them) on ``settings.queue``.

    Entering waits until every worker has registered with Redis, so that worker
    start-up is not counted by the cases; leaving stops them with SIGTERM.
    """

    def __init__(
        self,
        settings: Settings,
        count: int,
        *,
        log_dir: Path,
        command: list[str] | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.count = count
        self.log_dir = log_dir
        self.command = command or [sys.executable, "-m", "workers"]
        self.extra_env = extra_env or {}
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> WorkerPool:
        env = {
            **os.environ,
            "REDIS_URL": self.settings.redis_url or "",
            "DATABASE_URL": self.settings.database_url or "",
            "PERTH_QUEUE": self.settings.queue,
            "PERTH_LOG_LEVEL": "WARNING",
            **self.extra_env,
        }
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for n in range(self.count):
                log = (self.log_dir / f"{self.settings.queue}-{n}.log").open("ab")
                self.procs.append(
                    subprocess.Popen(self.command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
                )
                log.close()
            self._wait_registered()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_registered(self, timeout: float = 60.0) -> None:
        client = redis.Redis.from_url(self.settings.redis_url or "", socket_timeout=5)
        try:
            queue = Queue(self.settings.queue, connection=client)
            deadline = time.monotonic() + timeout
            while len(Worker.all(queue=queue)) < self.count:
                dead = [p.returncode for p in self.procs if p.poll() is not None]
                if dead:
                    raise RuntimeError(f"a worker exited at start-up ({dead}); see {self.log_dir}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"workers did not register within {timeout:.0f} s; see {self.log_dir}")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.procs = []

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def settings_for(base: Settings, queue: str, **overrides: Any) -> Settings:
    """``base`` (URLs, defaults) on a queue of the case's own."""
    return base.model_copy(update={"queue": queue, **overrides})
