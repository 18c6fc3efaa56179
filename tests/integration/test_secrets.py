"""Secrets stay secret: passwords of REDIS_URL and DATABASE_URL, and the user's data.

Passwords never appear in logs, in ``status`` output or in the errors shown; titles,
commands, working directories and scrollback never appear in a log line nor in a
failed job's reason, whatever happens to the batch that carries them (applied,
refused for an invalid neighbour, timed out and retried, or a database that is down).
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from psycopg.conninfo import conninfo_to_dict
from rq import Queue, Retry
from rq.job import Job
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from perth_pipeline import PaneHistoryChunk, PersistenceManager
from perth_pipeline.batch import JOB_FUNCTION
from perth_pipeline.broker import Keys, read_db_health
from perth_pipeline.errors import PersistenceError
from perth_pipeline.settings import Settings
from perth_pipeline.testing import ThrowawayRedis, free_port
from workers.context import JobContext

from ..e2e.procs import WorkerProcs
from ..helpers import now, pane, require, session, tab, wait_for

REDIS_PASSWORD = "redis-pw-S3CRET"
PG_PASSWORD = "pg-pw-S3CRET"
USER_DATA = [
    "TITLE-S3CRET",
    "/home/CWD-S3CRET",
    "CMD-S3CRET",
    "SCROLLBACK-S3CRET",
    "STATE-S3CRET",
    "TAB-S3CRET",
]
PASSWORDS = [REDIS_PASSWORD, PG_PASSWORD]


def leaks(text: str, secrets: list[str]) -> list[str]:
    return [s for s in secrets if s in text]


@pytest.fixture
def locked_redis() -> Iterator[ThrowawayRedis]:
    try:
        server = ThrowawayRedis().start()
    except (RuntimeError, OSError) as exc:
        require(False, f"no throwaway Redis: {exc}")
        raise
    client = server.client()
    client.config_set("requirepass", REDIS_PASSWORD)
    client.close()
    try:
        yield server
    finally:
        server.close()


def with_password(database_url: str, *, query: bool = False, port: int | None = None) -> str:
    """The test database as a URL carrying a password (trust authentication ignores it)."""
    params = conninfo_to_dict(database_url)
    host, dbname = params.get("host", "127.0.0.1"), params.get("dbname", "postgres")
    port = port or int(params.get("port", 5432))
    if query:
        return f"postgresql://postgres@{host}:{port}/{dbname}?sslmode=disable&password={PG_PASSWORD}"
    return f"postgresql://postgres:{PG_PASSWORD}@{host}:{port}/{dbname}"


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERTH_")}
    env.update(
        REDIS_URL=settings.redis_url or "",
        DATABASE_URL=settings.database_url or "",
        PERTH_QUEUE=settings.queue,
    )
    return subprocess.run(
        [sys.executable, "-m", "perth_pipeline.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def user_data_records(sid: uuid.UUID | None = None) -> tuple[Any, Any, Any]:
    s = session("work") if sid is None else session("work", id=sid)
    t = tab(s.id, name="TAB-S3CRET")
    p = pane(
        t.id,
        title="TITLE-S3CRET",
        cwd="/home/CWD-S3CRET",
        command="CMD-S3CRET",
        component_state={"n": "STATE-S3CRET"},
    )
    return s, t, p


def logs_of(folder: Path) -> str:
    return "".join(path.read_text(errors="replace") for path in sorted(folder.glob("worker-*.log")))


def refused_with_an_invalid_neighbour(queue: Queue, session_id: uuid.UUID, p: Any) -> Job:
    """The pane as it is, and the same pane made invalid: the second is refused, with a reason."""
    good = json.loads(p.model_dump_json())
    bad = good | {"title": "TITLE-S3CRET\u0000", "pane_type": "CMD-S3CRET!"}
    ops = [
        {"op": "pane.upsert", "version": 10**18 + n, "session_id": str(session_id), "record": record}
        for n, record in enumerate((good, bad))
    ]
    payload = {
        "format": 2,
        "id": str(uuid.uuid4()),
        "origin": "s",
        "created_at": now().isoformat(),
        "ops": ops,
    }
    return queue.enqueue_job(queue.create_job(JOB_FUNCTION, args=[payload], retry=Retry(max=3, interval=[1])))


def failure_reasons(queue: Queue, rconn: redis.Redis) -> list[str]:
    out = []
    for job_id in FailedJobRegistry(queue=queue).get_job_ids():
        result = Job.fetch(job_id, connection=rconn, serializer=JSONSerializer).latest_result()
        out.append(result.exc_string or "" if result is not None else "")
    return out


@pytest.mark.timeout(180)
def test_worker_and_producer_logs_carry_no_password_and_no_user_data(
    settings: Settings,
    locked_redis: ThrowawayRedis,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    redis_url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{locked_redis.port}/0"
    base = settings.database_url or ""
    s = settings.model_copy(
        update={"redis_url": redis_url, "database_url": with_password(base), "statement_timeout": 1.0}
    )
    rconn = redis.Redis.from_url(redis_url)
    workers = WorkerProcs(s, tmp_path, rconn)
    debug = {"PERTH_LOG_LEVEL": "DEBUG"}
    try:
        workers.start(**debug)
        # workers that cannot reach PostgreSQL log it, with the URL in both of libpq's password forms
        # (on a queue of their own: their health reports would hold the producer's batches back)
        dead = free_port()
        for url in (with_password(base, port=dead), with_password(base, query=True, port=dead)):
            elsewhere = WorkerProcs(
                s.model_copy(update={"database_url": url, "queue": f"{s.queue}-x"}), tmp_path, rconn
            )
            workers.procs.append(elsewhere.start(**debug))
        wait_for(
            lambda: logs_of(tmp_path).count("PostgreSQL unreachable") >= 2, timeout=60, what="down reports"
        )

        caplog.set_level(logging.DEBUG)
        sess, t, p = user_data_records()
        chunk = PaneHistoryChunk(pane_id=p.id, chunk_index=0, content=b"$ SCROLLBACK-S3CRET\n")
        with PersistenceManager(settings=s) as manager:
            manager.create_session(sess)
            manager.create_tab(t)
            manager.create_pane(p)
            manager.append_pane_history(chunk)
            assert manager.flush(timeout=60), manager.stats()  # applied
            with psycopg.connect(base) as lock:  # timed out against a held lock and retried
                lock.execute("SELECT 1 FROM panes WHERE id = %s FOR UPDATE", (p.id,))
                manager.update_pane(p.model_copy(update={"title": "TITLE-S3CRET again"}))
                wait_for(lambda: "QueryCanceled" in logs_of(tmp_path), timeout=60, what="a statement timeout")
            assert manager.flush(timeout=60), manager.stats()  # then applied
        queue = Queue(s.queue, connection=rconn, serializer=JSONSerializer)
        refused = refused_with_an_invalid_neighbour(queue, sess.id, p)
        wait_for(
            lambda: refused.id in FailedJobRegistry(queue=queue).get_job_ids(), timeout=60, what="a refusal"
        )
        reasons = failure_reasons(queue, rconn)
    finally:
        rconn.close()
        workers.close()
    logs = logs_of(tmp_path)
    assert "applied batch" in logs and "ops[1]" in logs and "QueryCanceled" in logs  # they did log
    assert not leaks(logs, PASSWORDS + USER_DATA), leaks(logs, PASSWORDS + USER_DATA)
    assert reasons and not leaks("\n".join(reasons), USER_DATA), reasons
    producer_lines = "\n".join(r.getMessage() + " " + str(r.__dict__) for r in caplog.records)
    assert not leaks(producer_lines, PASSWORDS + USER_DATA), leaks(producer_lines, PASSWORDS + USER_DATA)


@pytest.mark.parametrize("form", ["userinfo", "query"])
def test_status_and_errors_never_show_a_password(
    settings: Settings, locked_redis: ThrowawayRedis, form: str
) -> None:
    if form == "userinfo":
        redis_url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{locked_redis.port}/0"
    else:
        redis_url = f"redis://127.0.0.1:{locked_redis.port}/0?password={REDIS_PASSWORD}"
    up = settings.model_copy(
        update={
            "redis_url": redis_url,
            "database_url": with_password(settings.database_url or "", query=form == "query"),
        }
    )
    down = up.model_copy(
        update={
            "database_url": with_password(
                settings.database_url or "", query=form == "query", port=free_port()
            )
        }
    )
    outputs = []
    for s in (up, down):
        for args in (
            ["status"],
            ["status", "--json"],
            ["sessions"],
            ["restore", str(uuid.uuid4()), "--wait", "0"],
        ):
            result = cli(s, *args)
            assert "Traceback" not in result.stderr, result.stderr
            outputs.append(result.stdout + result.stderr)
    text = "\n".join(outputs)
    assert "127.0.0.1" in text  # the outputs do name the servers
    assert not leaks(text, PASSWORDS), [o for o in outputs if leaks(o, PASSWORDS)][:2]


# URLs a typo broke: libpq and redis-py quote them back whole in their errors
MALFORMED_DATABASE = f"postgresq://postgres:{PG_PASSWORD}@127.0.0.1:5432/test"
MALFORMED_REDIS = f"rediss//:{REDIS_PASSWORD}@127.0.0.1:6379/0"


@pytest.mark.parametrize("broken", ["database", "redis"])
def test_a_malformed_url_is_masked_on_every_command(settings: Settings, broken: str) -> None:
    update = {"database_url": MALFORMED_DATABASE} if broken == "database" else {"redis_url": MALFORMED_REDIS}
    bad = settings.model_copy(update=update)
    outputs = []
    for args in (
        ["status"],
        ["status", "--json"],
        ["sessions"],
        ["init-db"],
        ["restore", str(uuid.uuid4()), "--wait", "0"],
        ["cleanup", "--older-than", "30d", "--dry-run"],
    ):
        result = cli(bad, *args)
        assert "Traceback" not in result.stderr, (args, result.stderr)
        if broken == "database":  # every one of them needs PostgreSQL: one line, exit 1
            assert result.returncode == 1, (args, result.stdout, result.stderr)
        outputs.append(result.stdout + result.stderr)
    text = "\n".join(outputs)
    assert ":***@127.0.0.1" in text  # the URL is shown, masked, so the typo can be seen
    assert not leaks(text, PASSWORDS), [o for o in outputs if leaks(o, PASSWORDS)][:2]


def test_the_library_masks_its_errors_and_logs_whatever_the_handler(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A host application's own logging (no configure_logging) and its tracebacks carry no password."""
    bad = settings.model_copy(update={"database_url": MALFORMED_DATABASE})
    caplog.set_level(logging.DEBUG)
    with PersistenceManager(settings=bad) as manager:
        with pytest.raises(PersistenceError) as raised:
            manager.restore_session(uuid.uuid4(), wait=0)
        s, t, p = user_data_records()
        for write, record in ((manager.create_session, s), (manager.create_tab, t), (manager.create_pane, p)):
            write(record)  # writes are accepted: the terminal is not affected
    shown = "".join(traceback.format_exception(raised.value))
    assert "127.0.0.1" in shown and not leaks(shown, PASSWORDS), shown
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(logging.Formatter("%(message)s %(exc_text)s"))
    rendered = "\n".join(handler.format(r) + " " + str(r.__dict__) for r in caplog.records)
    assert not leaks(rendered, PASSWORDS), leaks(rendered, PASSWORDS)


def test_the_health_hash_carries_no_password(settings: Settings) -> None:
    """A worker whose DATABASE_URL is malformed reports why, masked, where status and producers read it."""
    bad = settings.model_copy(update={"database_url": MALFORMED_DATABASE, "health_ttl": 60})
    client = redis.Redis.from_url(settings.redis_url or "")
    context = JobContext(bad, client, name="secrets-test")
    try:
        assert context.check_database() is False
        raw = {k.decode(): v.decode() for k, v in client.hgetall(Keys(bad.queue).db_health).items()}
        health = read_db_health(client, Keys(bad.queue), ttl=60)
    finally:
        context.close()
        client.delete(Keys(bad.queue).db_health)
        client.close()
    assert raw, "the worker reported nothing"
    text = json.dumps(raw) + json.dumps(health.as_dict(), default=str)
    assert "postgres:***@" in text and not leaks(text, PASSWORDS), text
