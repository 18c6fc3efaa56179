"""SIGTERM: with ``install_signal_handlers()`` a terminal that is told to stop sends what it holds first.

Python's default SIGTERM ends a process without running ``atexit``: the state a manager had not
enqueued is lost. The opt-in handler closes every manager (to the queue), then lets the signal
act as before. Each case runs a small terminal in a subprocess on a real Redis; its flusher runs
with a one-minute interval, so nothing reaches the queue before the signal (each case checks):
whatever is there afterwards was sent by the closing.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest
import redis
from rq import Queue
from rq.serializers import JSONSerializer

from perth_pipeline import install_signal_handlers
from perth_pipeline.settings import Settings

TERMINAL = """
import signal, sys, uuid
from datetime import UTC, datetime
from perth_pipeline import PersistenceManager, SessionRecord, TabRecord, install_signal_handlers
from perth_pipeline.settings import Settings

redis_url, database_url, queue, mode = sys.argv[1:5]
manager = None
if mode == "chained":
    def previous(signum, frame):
        print("previous handler ran after", manager.stats()["enqueued_ops"], "ops were enqueued", flush=True)
        sys.exit(3)
    signal.signal(signal.SIGTERM, previous)
if mode != "default":
    install_signal_handlers(timeout=3.0)
settings = Settings(redis_url=redis_url, database_url=database_url, queue=queue, flush_interval=60)
manager = PersistenceManager(settings=settings)
now = datetime.now(UTC)
sid = uuid.uuid4()
manager.create_session(SessionRecord(id=sid, name="told to stop", created_at=now, last_active=now))
if mode == "in-write":
    print(sid, flush=True)  # ready (this terminal signals itself)
    # the signal arrives in the middle of a write call, while it holds the buffer's lock
    clock = manager.buffer.clock
    issue = clock.next_unlocked
    def next_unlocked():
        del clock.next_unlocked
        print("buffer lock held:", manager.buffer._lock.locked(), flush=True)
        signal.raise_signal(signal.SIGTERM)
        return issue()
    clock.next_unlocked = next_unlocked
manager.create_tab(TabRecord(id=uuid.uuid4(), session_id=sid, position=0, name="editor"))
if mode == "in-write":
    print("the write returned", flush=True)
else:
    print(sid, flush=True)  # ready: both writes made
while True:
    signal.pause()  # an idle terminal, until the signal ends it
"""


def queued_ops(rconn: redis.Redis, settings: Settings) -> list[dict[str, Any]]:
    queue = Queue(settings.queue, connection=rconn, serializer=JSONSerializer)
    return [op for job in queue.get_jobs() for op in job.args[0]["ops"]]


def run_terminal(
    settings: Settings, rconn: redis.Redis, mode: str, signalled_at: list[float] | None = None
) -> tuple[int, str, str]:
    """Start the terminal, wait until it is ready, send SIGTERM (unless it signals itself)."""
    args = [settings.redis_url or "", settings.database_url or "", settings.queue, mode]
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(TERMINAL), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        try:
            session_id = proc.stdout.readline().strip()  # written: the terminal is ready
            if session_id and mode != "in-write":
                assert queued_ops(rconn, settings) == []  # nothing sent before the signal
                proc.send_signal(signal.SIGTERM)
                if signalled_at is not None:
                    signalled_at.append(time.monotonic())
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        # (not communicate(): it would skip what readline() buffered)
        out, err = proc.stdout.read(), proc.stderr.read()
    assert session_id, out + err
    return proc.returncode, session_id, out + err


def test_sigterm_loses_what_is_buffered_without_the_handlers(settings: Settings, rconn: redis.Redis) -> None:
    returncode, _, output = run_terminal(settings, rconn, "default")
    assert returncode == -signal.SIGTERM, output
    assert queued_ops(rconn, settings) == []  # why the opt-in exists


def test_sigterm_sends_what_is_buffered_then_ends_the_process_as_sigterm(
    settings: Settings, rconn: redis.Redis
) -> None:
    returncode, session_id, output = run_terminal(settings, rconn, "installed")
    assert returncode == -signal.SIGTERM, output
    ops = queued_ops(rconn, settings)
    assert sorted(op["op"] for op in ops) == ["session.upsert", "tab.upsert"], output
    assert session_id in {op["record"]["id"] for op in ops}
    assert "Traceback" not in output, output


def test_a_handler_installed_before_is_called_after_the_state_is_sent(
    settings: Settings, rconn: redis.Redis
) -> None:
    returncode, _, output = run_terminal(settings, rconn, "chained")
    assert returncode == 3, output
    assert "previous handler ran after 2 ops were enqueued" in output, output
    assert len(queued_ops(rconn, settings)) == 2


def test_a_signal_during_a_write_holding_the_buffer_lock_still_sends_everything(
    settings: Settings, rconn: redis.Redis
) -> None:
    # The handler cannot close from inside the write (the lock is the main thread's): it lets
    # the write finish, and ends the process once the closing is over.
    returncode, _, output = run_terminal(settings, rconn, "in-write")
    assert "buffer lock held: True" in output, output
    assert returncode == -signal.SIGTERM, output
    ops = queued_ops(rconn, settings)
    assert sorted(op["op"] for op in ops) == ["session.upsert", "tab.upsert"], output


def test_a_redis_that_does_not_answer_delays_the_end_by_the_timeout_at_most(
    settings: Settings, rconn: redis.Redis
) -> None:
    signalled_at: list[float] = []
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections, never answers
        stuck = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{silent.getsockname()[1]}/0"})
        returncode, _, output = run_terminal(stuck, rconn, "installed", signalled_at)
    assert returncode == -signal.SIGTERM, output
    assert time.monotonic() - signalled_at[0] < 3.0 + 1.0 + 2.0, output  # timeout, grace, slack


def test_installing_twice_changes_nothing_and_restore_puts_the_old_handler_back() -> None:
    before = signal.getsignal(signal.SIGTERM)
    restore = install_signal_handlers()
    try:
        ours = signal.getsignal(signal.SIGTERM)
        assert ours is not before
        install_signal_handlers()()  # a second install replaces nothing, and its restore is a no-op
        assert signal.getsignal(signal.SIGTERM) is ours
    finally:
        restore()
    assert signal.getsignal(signal.SIGTERM) == before


def test_restore_leaves_a_handler_set_after_ours() -> None:
    before = signal.getsignal(signal.SIGTERM)

    def later(signum: int, frame: object) -> None:
        raise AssertionError("not called")

    restore = install_signal_handlers()
    try:
        signal.signal(signal.SIGTERM, later)
        restore()
        assert signal.getsignal(signal.SIGTERM) is later
    finally:
        signal.signal(signal.SIGTERM, before)


def test_an_ignored_signal_stays_ignored() -> None:
    before = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        install_signal_handlers()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # it never ended the process
    finally:
        signal.signal(signal.SIGTERM, before)


def test_only_the_main_thread_may_install_handlers() -> None:
    errors: list[BaseException] = []

    def install() -> None:
        try:
            install_signal_handlers()
        except RuntimeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=install)
    thread.start()
    thread.join(timeout=10)
    assert len(errors) == 1 and "main thread" in str(errors[0])


pytestmark = pytest.mark.timeout(90)
