"""Shared test helpers: records, waiting on conditions, running workers."""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest

from perth_pipeline import PaneRecord, SessionRecord, TabRecord
from perth_pipeline.settings import Settings

T = TypeVar("T")

IN_CI = os.environ.get("CI", "").lower() == "true"


def require(condition: bool, reason: str) -> None:
    """Skip on a laptop without the service; fail under CI=true (a green CI never means skipped)."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


def require_module(name: str) -> Any:
    """The module ``name``, imported; a skip on a laptop without it, a failure under CI=true."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if IN_CI:
            pytest.fail(f"required in CI: {name} ({exc})")
        pytest.skip(f"needs {name} ({exc})", allow_module_level=True)


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> T:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: T = predicate()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)
        last = predicate()
    return last


def now(offset: float = 0.0) -> datetime:
    return datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=offset)


def session(name: str = "main", **kw: Any) -> SessionRecord:
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "name": name,
        "template_name": None,
        "created_at": now(),
        "last_active": now(),
    }
    values.update(kw)
    return SessionRecord(**values)


def tab(session_id: uuid.UUID, position: int = 0, **kw: Any) -> TabRecord:
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "session_id": session_id,
        "position": position,
        "name": f"tab {position}",
        "layout_blob": {"direction": "vertical", "sizes": [50, 50]},
    }
    values.update(kw)
    return TabRecord(**values)


def pane(tab_id: uuid.UUID, n: int = 0, **kw: Any) -> PaneRecord:
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "tab_id": tab_id,
        "pane_id": f"terminal_{n}",
        "pane_type": "terminal",
        "component_state": {"scroll": n},
        "title": f"zsh {n}",
        "cwd": "/home/perth",
        "command": None,
    }
    values.update(kw)
    return PaneRecord(**values)


def test_settings(redis_url: str | None, database_url: str | None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "database_url": database_url,
        "queue": f"perth-test-{uuid.uuid4().hex[:10]}",
        "flush_interval": 0.01,
        "maintenance_interval": 2,
        "job_lease": 6,
    }
    values.update(overrides)
    return Settings(**values)


test_settings.__test__ = False  # type: ignore[attr-defined]


def drain(settings: Settings) -> bool:
    """Run one in-process worker in burst mode: applies everything queued now. True if it worked."""
    from perth_pipeline.broker import make_queue, make_redis
    from workers.worker import PerthJob, PerthWorker

    connection = make_redis(settings.redis_url or "", connect_timeout=2.0, socket_timeout=30.0)
    try:
        queue = make_queue(settings.queue, connection, job_class=PerthJob)
        worker = PerthWorker([queue], settings=settings, connection=connection)
        return bool(worker.work(burst=True, with_scheduler=False, logging_level="WARNING"))
    finally:
        connection.close()


def settle(manager: Any, settings: Settings, timeout: float = 20.0) -> None:
    """Deliver everything the manager holds: send, apply with burst workers, until flush() says committed."""
    deadline = time.monotonic() + timeout
    while not manager.flush(timeout=0.2):
        drain(settings)
        if time.monotonic() > deadline:
            raise AssertionError(f"writes not committed within {timeout}s: {manager.stats()}")


class ClosingServer:
    """Accepts TCP connections on a free local port, counts them and closes each at once.

    A server that answers nothing: a broken Redis, a PostgreSQL refusing everyone. ``url``
    is ``url_format`` with the port filled in.
    """

    def __init__(self, url_format: str) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.url = url_format.format(port=self.sock.getsockname()[1])
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def make_buffer(**bounds: int) -> Any:
    """A producer's buffer with small bounds (any of them overridden by keyword)."""
    from perth_pipeline.buffer import Buffer

    values = {
        "max_entities": 1000,
        "max_pending_history_bytes": 1 << 20,
        "max_json_bytes": 1 << 16,
        "max_chunk_bytes": 1 << 16,
        **bounds,
    }
    return Buffer(**values)


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a ``perth-pipeline`` subprocess that works on ``settings``' servers and queue."""
    return {
        **os.environ,
        "REDIS_URL": settings.redis_url or "",
        "DATABASE_URL": settings.database_url or "",
        "PERTH_QUEUE": settings.queue,
        **extra,
    }


def run_cli(
    settings: Settings,
    *args: str,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """``perth-pipeline ARGS`` in a subprocess, on ``settings``' servers and queue (``env`` added)."""
    return subprocess.run(
        [sys.executable, "-m", "perth_pipeline.cli", *args],
        env=cli_env(settings, **(env or {})),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def age_sessions(conn: Any, session_ids: Any, seconds: float) -> None:
    """Make every row stored under these sessions look written ``seconds`` ago (as time passing would).

    The cleanup reads when anything was last written under a session (``sessions.activity_at``,
    raised by the apply), so a test of it ages that (and the rows' own timestamps, which the
    orphan cleanup reads), not only ``last_active``.
    """
    ids = list(session_ids)
    interval = f"{float(seconds)} seconds"
    conn.execute(
        "UPDATE sessions SET updated_at = now() - %s::interval, activity_at = now() - %s::interval "
        "WHERE id = ANY(%s)",
        (interval, interval, ids),
    )
    conn.execute(
        "UPDATE tabs SET updated_at = now() - %s::interval WHERE session_id = ANY(%s)", (interval, ids)
    )
    conn.execute(
        "UPDATE panes SET updated_at = now() - %s::interval WHERE session_id = ANY(%s)", (interval, ids)
    )
    conn.execute(
        "UPDATE pane_history SET created_at = now() - %s::interval WHERE session_id = ANY(%s)",
        (interval, ids),
    )
