"""A worker started while Redis is unreachable: one line, a wait with back-off, work once it is back.

The Redis is a throwaway one whose URL stays the same across starts: the workers are
started against it before it runs, and it is started once they said they wait.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from rq import Worker

from perth_pipeline import PersistenceManager
from perth_pipeline.broker import make_queue
from perth_pipeline.settings import Settings
from perth_pipeline.testing import ServerUnavailable, ThrowawayRedis

from ..helpers import cli_env, pane, require, session, tab, wait_for

ROOT = Path(__file__).resolve().parents[2]
UNREACHABLE = "Redis unreachable at"


@pytest.fixture
def late_redis() -> Iterator[ThrowawayRedis]:
    """A Redis that is not running yet (``start()`` it), on a URL of its own."""
    try:
        server = ThrowawayRedis()
    except ServerUnavailable as exc:
        require(False, str(exc))
        raise
    try:
        yield server
    finally:
        server.close()


def _start(settings: Settings, log: Path, *args: str) -> subprocess.Popen[bytes]:
    env = cli_env(settings, PERTH_LOG_LEVEL="DEBUG", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "perth_pipeline.cli", "worker", *args]
    with log.open("wb") as out:
        # a session of its own: teardown kills the pool's children too, never leaving one orphaned
        return subprocess.Popen(
            command,
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )


def _lines(log: Path, text: str) -> list[str]:
    return [line for line in log.read_text(errors="replace").splitlines() if text in line]


def _registered(settings: Settings, server: ThrowawayRedis) -> set[int]:
    client = server.client()
    try:
        return {w.pid for w in Worker.all(queue=make_queue(settings.queue, client)) if w.pid}
    except redis.RedisError:
        return set()
    finally:
        client.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the process and whatever it started
    if proc.poll() is None:
        proc.wait(timeout=10)


@pytest.mark.timeout(120)
def test_a_worker_waits_for_redis_in_one_line_and_works_once_it_is_up(
    settings: Settings, late_redis: ThrowawayRedis, tmp_path: Path
) -> None:
    settings = settings.with_urls(late_redis.url, settings.database_url)
    log = tmp_path / "worker.log"
    proc = _start(settings, log)
    try:
        # it waited past its first retry, alive, having said so once
        wait_for(lambda: _lines(log, "next try in 2 s"), 30.0, what="a retry")
        assert proc.poll() is None
        [line] = _lines(log, UNREACHABLE)
        assert late_redis.url in line and "waiting for it" in line
        assert "Traceback" not in log.read_text()

        late_redis.start()
        wait_for(lambda: _registered(settings, late_redis), 60.0, what="the worker to register")
        s = session("after-redis-came-back")
        t = tab(s.id)
        p = pane(t.id)
        with PersistenceManager(settings=settings) as manager:
            manager.create_session(s)
            manager.create_tab(t)
            manager.create_pane(p)
            assert manager.flush(timeout=60), manager.stats()
            assert manager.restore_panes(t.id) == [p]
        assert _lines(log, "Redis reachable after")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        _stop(proc)
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.mark.timeout(60)
def test_a_worker_waiting_for_redis_stops_at_once(
    settings: Settings, late_redis: ThrowawayRedis, tmp_path: Path
) -> None:
    settings = settings.with_urls(late_redis.url, settings.database_url)
    log = tmp_path / "worker.log"
    proc = _start(settings, log)
    try:
        wait_for(lambda: _lines(log, "next try in 4 s"), 30.0, what="the second retry")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=3) == 0  # not at the end of its 4 s wait
    finally:
        _stop(proc)
    text = log.read_text()
    assert len(_lines(log, UNREACHABLE)) == 1 and "Traceback" not in text, text


@pytest.mark.timeout(120)
def test_burst_worker_with_redis_unreachable_exits_1_in_one_line(
    settings: Settings, late_redis: ThrowawayRedis, tmp_path: Path
) -> None:
    log = tmp_path / "worker.log"
    proc = _start(settings.with_urls(late_redis.url, settings.database_url), log, "--burst")
    try:
        assert proc.wait(timeout=30) == 1
    finally:
        _stop(proc)
    text = log.read_text()
    assert "exiting (--burst)" in text and "Traceback" not in text, text


@pytest.mark.timeout(120)
def test_a_pool_waits_for_redis_without_restarting_its_children(
    settings: Settings, late_redis: ThrowawayRedis, tmp_path: Path
) -> None:
    settings = settings.with_urls(late_redis.url, settings.database_url)
    log = tmp_path / "pool.log"
    proc = _start(settings, log, "--processes", "2")
    try:
        # each child is alive past its first retry: nothing died, nothing was restarted
        wait_for(lambda: len(_lines(log, "next try in 2 s")) == 2, 30.0, what="both children's retry")
        assert len(_lines(log, UNREACHABLE)) == 2
        assert not _lines(log, "restarting in") and proc.poll() is None

        late_redis.start()
        wait_for(lambda: len(_registered(settings, late_redis)) == 2, 60.0, what="both children to register")
        assert not _lines(log, "restarting in")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        _stop(proc)
    assert "Traceback" not in log.read_text(), log.read_text()
