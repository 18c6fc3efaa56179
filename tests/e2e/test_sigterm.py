"""SIGTERM: with ``install_signal_handlers()`` a terminal that is told to stop sends what it holds first.

Python's default SIGTERM ends a process without running ``atexit``: the state a manager had not
enqueued is lost. The opt-in handler closes every manager (to the queue), then lets the signal
act as before. Each case runs a small terminal in a subprocess on a real Redis, whose manager
has no flusher running (``start=False``): whatever reaches the queue was sent by the closing.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import threading
import zlib

import pytest
import redis

from perth_pipeline import install_signal_handlers
from perth_pipeline.settings import Settings

TERMINAL = """
import signal, sys, time, uuid
from datetime import UTC, datetime
from perth_pipeline import PersistenceManager, SessionRecord, TabRecord, install_signal_handlers
from perth_pipeline.settings import Settings

mode = sys.argv[3]
if mode == "chained":
    def previous(signum, frame):
        print("previous handler ran", flush=True)
        sys.exit(3)
    signal.signal(signal.SIGTERM, previous)
if mode != "default":
    install_signal_handlers()
manager = PersistenceManager(settings=Settings(redis_url=sys.argv[1], queue=sys.argv[2]), start=False)
now = datetime.now(UTC)
sid = uuid.uuid4()
manager.create_session(SessionRecord(id=sid, name="told to stop", created_at=now, last_active=now))
manager.create_tab(TabRecord(id=uuid.uuid4(), session_id=sid, position=0, name="editor"))
print(sid, flush=True)
while True:
    time.sleep(60)
"""


def run_terminal(settings: Settings, mode: str) -> tuple[int, str, str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(TERMINAL), settings.redis_url or "", settings.queue, mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        session_id = proc.stdout.readline().strip()  # written: the terminal is ready
        assert session_id, proc.stderr.read() if proc.stderr else ""
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, session_id, out + err


def queued_ops(rconn: redis.Redis, settings: Settings) -> list[dict[str, object]]:
    ops: list[dict[str, object]] = []
    for job_id in rconn.lrange(f"rq:queue:{settings.queue}", 0, -1):
        data = rconn.hget(f"rq:job:{job_id.decode()}", "data")
        assert data is not None
        ops.extend(json.loads(zlib.decompress(data))[2][0]["ops"])
    return ops


def test_sigterm_loses_what_is_buffered_without_the_handlers(settings: Settings, rconn: redis.Redis) -> None:
    returncode, _, _ = run_terminal(settings, "default")
    assert returncode == -signal.SIGTERM
    assert queued_ops(rconn, settings) == []  # why the opt-in exists


def test_sigterm_sends_what_is_buffered_then_ends_the_process_as_sigterm(
    settings: Settings, rconn: redis.Redis
) -> None:
    returncode, session_id, output = run_terminal(settings, "installed")
    assert returncode == -signal.SIGTERM, output
    ops = queued_ops(rconn, settings)
    assert sorted(op["op"] for op in ops) == ["session.upsert", "tab.upsert"]
    assert any(
        op.get("record", {}).get("id") == session_id for op in ops if isinstance(op.get("record"), dict)
    )


def test_a_handler_installed_before_is_called_after_the_state_is_sent(
    settings: Settings, rconn: redis.Redis
) -> None:
    returncode, _, output = run_terminal(settings, "chained")
    assert returncode == 3 and "previous handler ran" in output, output
    assert len(queued_ops(rconn, settings)) == 2


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
