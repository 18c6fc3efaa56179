"""Worker logs: one structured line per batch (no RQ chatter), JSON that parses, secrets masked."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from perth_pipeline import PersistenceManager
from perth_pipeline.batch import JOB_FUNCTION, describe
from perth_pipeline.broker import make_queue
from perth_pipeline.logs import configure_logging, mask_secrets
from perth_pipeline.settings import Settings
from perth_pipeline.testing import free_port

from ..helpers import pane, session, tab, wait_for


def environment(settings: Settings, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_URL": settings.redis_url or "",
        "DATABASE_URL": settings.database_url or "",
        "PERTH_QUEUE": settings.queue,
        **extra,
    }


def enqueue_work(settings: Settings, rconn: redis.Redis) -> tuple[list[str], str]:
    """Several batches from a producer and one refused batch, all waiting for a worker."""
    small = settings.model_copy(update={"batch_max_ops": 3})
    with PersistenceManager(settings=small) as manager:
        for n in range(2):
            s = session(f"s{n}")
            t = tab(s.id)
            manager.create_session(s)
            manager.create_tab(t)
            for i in range(2):
                manager.create_pane(pane(t.id, i, title="vim secrets.txt"))
        manager.flush(timeout=0.2)  # sends; nothing applies them yet
        wait_for(lambda: not manager.buffer.has_dirty(), what="the batches to be enqueued")
    queue = make_queue(settings.queue, rconn)
    batches = [j.decode() if isinstance(j, bytes) else str(j) for j in queue.get_job_ids()]
    payload = {"format": 999, "id": str(uuid.uuid4()), "origin": "x", "created_at": "x", "ops": [{}]}
    poison = queue.create_job(JOB_FUNCTION, args=(payload,), description=describe(1, [uuid.uuid4()]))
    queue.enqueue_job(poison)
    return batches, str(poison.id)


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_a_worker_logs_one_line_per_batch_and_nothing_from_rq(
    settings: Settings, rconn: redis.Redis, fmt: str
) -> None:
    batches, poison = enqueue_work(settings, rconn)
    assert len(batches) >= 3
    result = subprocess.run(
        [sys.executable, "-m", "perth_pipeline.cli", "--log-format", fmt, "worker", "--burst"],
        env=environment(settings),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    for batch in batches:
        mentions = [line for line in lines if batch in line]
        assert len(mentions) == 1, f"batch {batch}: {mentions}"
    [refusal] = [line for line in lines if poison in line]
    assert "vim secrets.txt" not in result.stdout + result.stderr  # a log line never carries user data

    if fmt == "text":
        for batch in batches:
            [line] = [line for line in lines if batch in line]
            assert " INFO workers.jobs: applied batch " in line
            assert " ops=" in line and " rows_written=" in line and " ms=" in line
        assert " WARNING workers.worker: batch " in refusal and "PoisonBatch" in refusal
        assert not [line for line in lines if " rq." in line]
        return

    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert not [r for r in records if r["logger"].startswith("rq")], "RQ's per-job lines are silenced"
    applied = [r for r in records if r["message"].startswith("applied batch ")]
    assert sorted(r["batch_id"] for r in applied) == sorted(batches)
    for r in applied:
        assert r["level"] == "info" and r["logger"] == "workers.jobs"
        assert r["ops"] >= 1 and r["sessions"] >= 1 and r["rows_written"] >= 1 and r["ms"] > 0
        assert isinstance(r["rows"], dict) and sum(r["rows"].values()) == r["rows_written"]
    assert sum(r["ops"] for r in applied) == 8  # 2 sessions, 2 tabs, 4 panes
    [refused] = [r for r in records if poison in r["message"]]
    assert refused["level"] == "warning" and refused["job_id"] == poison
    assert "batch format 999 is not supported" in refused["message"]


def test_a_worker_never_logs_a_password(settings: Settings) -> None:
    secret = f"pw-{uuid.uuid4().hex[:8]}"
    dead = f"postgresql://postgres:{secret}@127.0.0.1:{free_port()}/test"
    lines: list[str] = []
    with subprocess.Popen(
        [sys.executable, "-m", "perth_pipeline.cli", "--log-format", "json", "worker"],
        env=environment(settings, DATABASE_URL=dead),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
        reader.start()
        try:
            wait_for(
                lambda: any("PostgreSQL unreachable" in line for line in lines),
                timeout=60,
                what="the worker to report PostgreSQL down",
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.join(timeout=10)
    output = "".join(lines)
    assert secret not in output
    downs = [line for line in lines if "PostgreSQL unreachable" in line]
    assert len(downs) == 1 and downs[0].startswith("{"), output
    down = json.loads(downs[0])
    assert down["level"] == "warning"
    assert down["database"].startswith("postgresql://postgres:***@127.0.0.1:")


@pytest.fixture
def logging_restored() -> Iterator[None]:
    """configure_logging() replaces the root handlers: give pytest its own back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    rq_level = logging.getLogger("rq").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("rq").setLevel(rq_level)


def emit(capsys: pytest.CaptureFixture[str], fmt: str) -> list[str]:
    configure_logging("INFO", fmt)
    log = logging.getLogger("workers.test")
    log.warning(
        "cannot reach %s",
        "redis://:hunter2@cache:6379/0",
        extra={"database": "postgresql://app:s3cret@db/perth?sslmode=require", "attempt": 2},
    )
    try:
        raise ConnectionError("dsn host=db user=app password=s3cret dbname=perth")
    except ConnectionError:
        log.exception("connection failed")
    logging.getLogger("rq.worker").info("perth: workers.jobs.apply_batch(...) (job-id)")
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.usefixtures("logging_restored")
def test_json_logs_parse_and_mask_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    lines = emit(capsys, "json")
    text = "\n".join(lines)
    assert "hunter2" not in text and "s3cret" not in text
    records: list[dict[str, Any]] = [json.loads(line) for line in lines]  # tracebacks included
    first, second = records
    assert first["message"] == "cannot reach redis://:***@cache:6379/0"
    assert first["database"] == "postgresql://app:***@db/perth?sslmode=require" and first["attempt"] == 2
    assert first["level"] == "warning" and first["logger"] == "workers.test"
    assert first["ts"].endswith("+00:00")
    assert "password=***" in second["exc"] and "ConnectionError" in second["exc"]
    assert len(records) == 2, "RQ's INFO lines are silenced"


@pytest.mark.usefixtures("logging_restored")
def test_text_logs_mask_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    text = "\n".join(emit(capsys, "text"))
    assert "hunter2" not in text and "s3cret" not in text
    assert "redis://:***@cache:6379/0" in text and "database=postgresql://app:***@db/perth" in text
    assert "apply_batch" not in text


@pytest.mark.parametrize(
    ("raw", "masked"),
    [
        ("redis://:p%40ss@h:6379/0", "redis://:***@h:6379/0"),
        (
            "rediss://user:pw@h:6380/0?ssl_cert_reqs=required",
            "rediss://user:***@h:6380/0?ssl_cert_reqs=required",
        ),
        ("postgresql://u:pw@h/db?sslmode=verify-full", "postgresql://u:***@h/db?sslmode=verify-full"),
        ("host=h password='a b' dbname=d", "host=h password=*** dbname=d"),
        ("http://host:8080/path@v2 is not a password", "http://host:8080/path@v2 is not a password"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("postgresql://postgres@h:5432/test", "postgresql://postgres@h:5432/test"),
        # malformed: libpq and redis-py quote them back in their errors
        ('after "postgresq://u:pw@h:5432/db" in', 'after "postgresq://u:***@h:5432/db" in'),
        ("rediss//:pw@h:6379", "rediss//:***@h:6379"),
        ("redis://:p@ss/w#rd@h:1/0 and more", "redis://:***@h:1/0 and more"),
        ("redis://h:1/0?password=pw&db=1", "redis://h:1/0?password=***&db=1"),
    ],
)
def test_mask_secrets(raw: str, masked: str) -> None:
    assert mask_secrets(raw) == masked
