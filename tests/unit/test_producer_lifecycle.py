"""Shutdown: close(timeout) sends what is buffered and returns, never waiting for workers or for a
dead backend; an atexit hook closes a manager left open; the flusher never keeps a process alive."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest

from perth_pipeline import PaneHistoryChunk, PersistenceManager
from perth_pipeline.broker import Keys, write_db_health
from perth_pipeline.operations import BATCH_ADAPTER
from perth_pipeline.settings import Settings

from ..helpers import pane, session, tab, wait_for

QUEUE = "lifecycle"
ROOT = Path(__file__).resolve().parents[2]


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"redis_url": None, "database_url": None, "queue": QUEUE, "flush_interval": 0.01}
    values.update(overrides)
    return Settings(**values)


def queued_ops(client: fakeredis.FakeRedis) -> list[Any]:
    ops = []
    for job_id in client.lrange(f"rq:queue:{QUEUE}", 0, -1):
        job = client.hgetall(b"rq:job:" + job_id)
        assert job[b"status"] == b"queued"  # no worker ran: close did not wait for one
        _, _, args, _ = json.loads(zlib.decompress(job[b"data"]))
        ops += BATCH_ADAPTER.validate_python(args[0]).ops
    return ops


def workload(manager: PersistenceManager, panes: int) -> None:
    s = session()
    t = tab(s.id)
    manager.create_session(s)
    manager.create_tab(t)
    for i in range(panes):
        p = pane(t.id, i)
        manager.create_pane(p)
        manager.append_pane_history(PaneHistoryChunk(pane_id=p.id, chunk_index=0, content=b"$ ls\n"))


@pytest.mark.parametrize("started", [True, False], ids=["running", "never-started"])
def test_close_sends_what_is_buffered_within_the_timeout(started: bool) -> None:
    client = fakeredis.FakeRedis()
    # a long flush interval: what close() sends is what was still buffered
    manager = PersistenceManager(
        settings=settings(flush_interval=30, batch_max_ops=100), redis_client=client, start=started
    )
    workload(manager, 1000)
    began = time.monotonic()
    manager.close(timeout=10)
    assert time.monotonic() - began < 10
    ops = queued_ops(client)
    assert len(ops) == 2 + 2 * 1000
    assert manager.stats()["dirty"] == manager.stats()["pending_history_chunks"] == 0


def test_close_sends_even_while_postgresql_is_down() -> None:
    client = fakeredis.FakeRedis()
    write_db_health(client, Keys(QUEUE), ok=False, source="w1", ttl=30, error="refused")
    manager = PersistenceManager(settings=settings(), redis_client=client)
    wait_for(lambda: manager.stats()["database_down"], what="PostgreSQL down")
    workload(manager, 10)
    manager.close(timeout=5)
    assert len(queued_ops(client)) == 22  # the queue keeps it for the workers


class SilentRedis:
    """A port that accepts connections (the kernel's backlog) and never answers: a stuck server."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.sock.getsockname()[1]}/0"

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def silent() -> Iterator[SilentRedis]:
    server = SilentRedis()
    yield server
    server.close()


@pytest.mark.parametrize("dead", ["down", "stuck"])
def test_close_returns_within_its_timeout_whatever_redis_does(dead: str, silent: SilentRedis) -> None:
    if dead == "down":
        server = fakeredis.FakeServer()
        server.connected = False
        manager = PersistenceManager(settings=settings(), redis_client=fakeredis.FakeRedis(server=server))
    else:
        manager = PersistenceManager(settings=settings(redis_url=silent.url, redis_socket_timeout=5.0))
    workload(manager, 100)  # the flusher is trying (down: failing at once; stuck: blocked for 5 s)
    began = time.monotonic()
    manager.close(timeout=0.5)
    assert time.monotonic() - began < 2.0  # the timeout, and a generous margin on a busy machine


def test_the_flusher_thread_is_a_daemon() -> None:
    manager = PersistenceManager(settings=settings(), redis_client=fakeredis.FakeRedis())
    try:
        assert manager._flusher.thread is not None and manager._flusher.thread.daemon
    finally:
        manager.close(timeout=1)


def run_script(body: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(body)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_the_atexit_hook_sends_what_an_unclosed_manager_holds() -> None:
    # The check is an atexit handler registered before perth_pipeline is imported: handlers run
    # last-registered first, so it runs after the library's own hook, at a real interpreter exit.
    result = run_script(
        f"""
        import atexit, json, zlib
        import fakeredis

        client = fakeredis.FakeRedis()

        def report():
            jobs = client.lrange("rq:queue:{QUEUE}", 0, -1)
            ops = sum(
                len(json.loads(zlib.decompress(client.hget(b"rq:job:" + j, "data")))[2][0]["ops"])
                for j in jobs
            )
            print("OPS", ops, flush=True)

        atexit.register(report)

        from perth_pipeline import PersistenceManager
        from perth_pipeline.settings import Settings
        from tests.helpers import pane, session, tab

        manager = PersistenceManager(
            settings=Settings(queue="{QUEUE}", flush_interval=60), redis_client=client
        )
        s = session()
        t = tab(s.id)
        manager.create_session(s)
        manager.create_tab(t)
        for i in range(50):
            manager.create_pane(pane(t.id, i))
        # no close(): the process just ends
        """
    )
    assert result.returncode == 0, result.stderr
    assert "OPS 52" in result.stdout, result.stdout + result.stderr


def test_an_unclosed_manager_does_not_keep_the_process_alive_when_redis_is_stuck(silent: SilentRedis) -> None:
    began = time.monotonic()
    result = run_script(
        f"""
        from perth_pipeline import PersistenceManager
        from perth_pipeline.settings import Settings
        from tests.helpers import session

        manager = PersistenceManager(
            settings=Settings(redis_url="{silent.url}", queue="{QUEUE}-{uuid.uuid4().hex[:6]}",
                              redis_socket_timeout=30, flush_interval=0.01)
        )
        for _ in range(100):
            manager.create_session(session())
        print("DONE", flush=True)
        """
    )
    took = time.monotonic() - began
    assert result.returncode == 0, result.stderr
    assert "DONE" in result.stdout
    # interpreter start-up and imports, plus the atexit hook's 2 s bound; nowhere near the 30 s
    # that the flusher stays blocked on the stuck socket
    assert took < 20, took


@pytest.mark.parametrize("started", [True, False], ids=["running", "never-started"])
def test_closing_with_nothing_buffered_warns_of_nothing(
    started: bool, caplog: pytest.LogCaptureFixture
) -> None:
    manager = PersistenceManager(settings=settings(), redis_client=fakeredis.FakeRedis(), start=started)
    with caplog.at_level("WARNING", logger="perth_pipeline"):
        manager.close(timeout=0)  # the flusher has no time to finish, and nothing to send
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text
