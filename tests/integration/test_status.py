"""`perth-pipeline status` against real backends, healthy and broken; safe-Redis checks; TLS URLs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from rq.registry import FailedJobRegistry

from perth_pipeline import PersistenceManager
from perth_pipeline.batch import JOB_FUNCTION, describe
from perth_pipeline.broker import Keys, make_queue, make_redis
from perth_pipeline.errors import DatabaseUnavailable
from perth_pipeline.settings import Settings
from perth_pipeline.status import gather_status, render_status
from perth_pipeline.store import Store, connect
from perth_pipeline.testing import ThrowawayRedis, free_port, redis_binary
from workers.worker import PerthJob, PerthWorker

from ..helpers import drain, pane, require, run_cli, session, settle, tab, test_settings, wait_for


def status_cli(settings: Settings, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run_cli(settings, "status", *args, timeout=timeout)


def write_some(manager: PersistenceManager, sessions: int) -> None:
    for n in range(sessions):
        s = session(f"s{n}")
        t = tab(s.id)
        manager.create_session(s)
        manager.create_tab(t)
        manager.create_pane(pane(t.id))


def wait_published(rconn: redis.Redis, settings: Settings, manager: PersistenceManager) -> None:
    """Until the producer's counters in Redis are its current ones (it publishes every few seconds)."""
    key = Keys(settings.queue).producer(manager.origin)

    def current() -> bool:
        raw = rconn.get(key)
        return bool(raw) and json.loads(raw)["enqueued_jobs"] == manager.stats()["enqueued_jobs"]

    wait_for(current, timeout=30, what="the producer to publish its counters")
    ttl = rconn.ttl(key)
    assert 0 < ttl <= 30, f"producer stats key TTL {ttl}"


def enqueue_poison(settings: Settings, rconn: redis.Redis) -> str:
    """A batch of a format no worker knows: refused into the failed registry."""
    queue = make_queue(settings.queue, rconn)
    payload = {
        "format": 999,
        "id": str(uuid.uuid4()),
        "origin": "p1-newer-producer",
        "created_at": "2026-01-01T00:00:00+00:00",
        "ops": [{"op": "session.touch"}],
    }
    job = queue.create_job(
        JOB_FUNCTION,
        args=(payload,),
        description=describe(1, [uuid.uuid4()]),
        failure_ttl=settings.failed_ttl,
    )
    queue.enqueue_job(job)
    return str(job.id)


@pytest.fixture
def live_worker(settings: Settings, rconn: redis.Redis) -> Iterator[PerthWorker]:
    """A worker registered as alive on the queue (as `perth-pipeline worker` is while it waits)."""
    queue = make_queue(settings.queue, rconn, job_class=PerthJob)
    worker = PerthWorker([queue], settings=settings, connection=rconn)
    worker.register_birth()
    yield worker
    worker.teardown()  # registers its death


def test_status_json_reports_queue_lag_workers_producers_and_backends(
    settings: Settings, rconn: redis.Redis, pg: psycopg.Connection[Any], live_worker: PerthWorker
) -> None:
    # two terminals: their counters are published to Redis (short TTL) and summed by status
    first = PersistenceManager(settings=settings)
    second = PersistenceManager(settings=settings)
    try:
        write_some(first, 2)
        write_some(second, 1)
        for m in (first, second):
            m.flush(timeout=0.2)  # sends; no worker applies them
            wait_for(lambda m=m: not m.buffer.has_dirty(), what="the batches to be enqueued")  # type: ignore[misc]
            wait_published(rconn, settings, m)
        expected_jobs = first.stats()["enqueued_jobs"] + second.stats()["enqueued_jobs"]
        expected_ops = first.stats()["enqueued_ops"] + second.stats()["enqueued_ops"]
        # the oldest queued batch was enqueued 90 s ago
        queue = make_queue(settings.queue, rconn)
        oldest = queue.get_job_ids(0, 1)[0]
        ninety_seconds_ago = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime(time.time() - 90))
        rconn.hset(f"rq:job:{oldest}", "enqueued_at", ninety_seconds_ago)

        result = status_cli(settings, "--json")
    finally:
        first.close(timeout=1)
        second.close(timeout=1)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["healthy"] is True and report["problems"] == []
    assert report["queue_name"] == settings.queue
    q = report["queue"]
    assert q["depth"] == expected_jobs == queue.count
    assert 90 <= q["lag_seconds"] < 150
    assert (q["started"], q["finished"], q["failed"]) == (0, 0, 0)
    [worker] = report["workers"]
    assert worker["name"] == live_worker.name
    assert worker["host"] == socket.gethostname() and worker["pid"] == os.getpid()
    assert report["producers"]["live"] == 2
    assert report["producers"]["totals"]["enqueued_jobs"] == expected_jobs
    assert report["producers"]["totals"]["enqueued_ops"] == expected_ops
    assert report["producers"]["totals"]["dropped_jobs"] == 0
    assert report["redis"]["ok"] and report["redis"]["version"] == rconn.info()["redis_version"]
    p = report["postgres"]
    assert p["ok"] and p["version"] == pg.info.parameter_status("server_version")
    store = Store(settings.database_url or "")
    try:
        assert p["schema_version"] == store.schema_version() >= 1
    finally:
        store.close()


def test_status_text_shows_the_same_report(
    settings: Settings, rconn: redis.Redis, live_worker: PerthWorker
) -> None:
    with PersistenceManager(settings=settings) as manager:
        write_some(manager, 1)
        settle(manager, settings)
        committed = manager.stats()["committed_jobs"]
    result = status_cli(settings)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.startswith("perth-pipeline status: healthy")
    assert f"depth=0 lag=- started=0 finished={committed} failed=0" in out
    assert f"1 live on {socket.gethostname()}" in out
    assert f"{socket.gethostname()}:{os.getpid()}" in out
    assert "schema=" in out and "redis      up" in out and "postgres   up" in out


def test_a_failed_batch_makes_status_unhealthy_and_its_stay_is_bounded(
    settings: Settings, rconn: redis.Redis
) -> None:
    poison = enqueue_poison(settings, rconn)
    # a job someone else put on the queue, with RQ's defaults (no failure TTL: a year)
    foreign = make_queue(settings.queue, rconn).enqueue("os.system", "true").id
    assert drain(settings)
    registry = FailedJobRegistry(queue=make_queue(settings.queue, rconn))
    assert sorted(registry.get_job_ids()) == sorted([poison, foreign])
    for job_id in (poison, foreign):
        kept_until = rconn.zscore(registry.key, job_id)
        assert kept_until is not None and kept_until - time.time() <= settings.failed_ttl
        assert 0 < rconn.ttl(f"rq:job:{job_id}") <= settings.failed_ttl

    result = status_cli(settings, "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["healthy"] is False
    assert report["queue"]["failed"] == 2
    assert any("2 batch(es) in the failed registry" in p for p in report["problems"])


def test_status_exits_1_when_redis_is_down(settings: Settings) -> None:
    down = settings.with_urls(f"redis://127.0.0.1:{free_port()}/0", settings.database_url)
    started = time.monotonic()
    result = status_cli(down, "--json")
    assert time.monotonic() - started < 30, "status must fail fast on a dead Redis"
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["healthy"] is False
    assert report["redis"]["ok"] is False and "error" in report["redis"]
    assert "queue" not in report and "workers" not in report
    assert report["postgres"]["ok"] is True
    assert any(p.startswith("Redis unreachable at 127.0.0.1:") for p in report["problems"])


def test_status_exits_1_when_postgres_is_down(settings: Settings) -> None:
    down = settings.with_urls(
        settings.redis_url, f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/test"
    )
    result = status_cli(down, "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "hunter2" not in result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["redis"]["ok"] is True and report["postgres"]["ok"] is False
    assert report["postgres"]["url"].startswith("postgresql://postgres:***@127.0.0.1:")
    assert any("PostgreSQL" in p for p in report["problems"])


def test_status_exits_1_when_the_schema_is_missing(settings: Settings, pg: psycopg.Connection[Any]) -> None:
    name = f"perth_empty_{uuid.uuid4().hex[:10]}"
    pg.execute(f"CREATE DATABASE {name}")
    try:
        empty = settings.with_urls(
            settings.redis_url, make_conninfo(settings.database_url or "", dbname=name)
        )
        report = gather_status(empty)
    finally:
        pg.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    assert report["postgres"]["ok"] is True and report["postgres"]["schema_version"] is None
    assert report["healthy"] is False
    assert any("init-db" in p for p in report["problems"])


def test_status_warns_when_redis_may_lose_the_queue(database_url: str) -> None:
    require(redis_binary() is not None, "no redis-server binary")
    with ThrowawayRedis(appendonly=False) as volatile, ThrowawayRedis(appendonly=True) as durable:
        client = volatile.client()
        try:
            client.config_set("maxmemory-policy", "allkeys-lru")
        finally:
            client.close()
        report = gather_status(test_settings(volatile.url, database_url))
        warnings = " ".join(report["warnings"])
        assert "keeps nothing on disk" in warnings
        assert "maxmemory-policy is allkeys-lru" in warnings
        assert report["redis"]["aof_enabled"] is False and report["redis"]["rdb_save"] == ""
        assert report["healthy"] is True  # a risk, not a failure
        assert "warning: Redis keeps nothing on disk" in render_status(report)

        report = gather_status(test_settings(durable.url, database_url))
        assert report["redis"]["aof_enabled"] is True
        assert report["redis"]["maxmemory_policy"] == "noeviction"
        assert not [w for w in report["warnings"] if "disk" in w or "maxmemory" in w]


def test_status_watch_refreshes_until_ctrl_c(settings: Settings) -> None:
    env = {
        **os.environ,
        "REDIS_URL": settings.redis_url or "",
        "DATABASE_URL": settings.database_url or "",
        "PERTH_QUEUE": settings.queue,
    }
    lines: list[str] = []
    with subprocess.Popen(
        [sys.executable, "-m", "perth_pipeline.cli", "status", "--watch", "0.2", "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
        reader.start()
        try:
            wait_for(lambda: len(lines) >= 3, timeout=60, what="three refreshes")
            proc.send_signal(signal.SIGINT)
            # healthy: Ctrl-C ends the watch with the last report's exit code, without a traceback
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        reader.join(timeout=10)
        errors = proc.stderr.read()
    assert "Traceback" not in errors, errors
    reports = [json.loads(line) for line in lines]  # --watch --json: one JSON document per line
    assert all(r["queue_name"] == settings.queue and r["healthy"] for r in reports)
    assert len({r["checked_at"] for r in reports}) == len(reports)


# --- TLS: rediss:// and sslmode= ----------------------------------------------------------------


def _start_tls_redis(binary: str, port: int, cert: Path, key: Path, folder: Path) -> subprocess.Popen[bytes]:
    args = [
        binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--tls-cert-file", str(cert),
        "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
        "--save", "", "--appendonly", "no", "--dir", str(folder), "--logfile", str(folder / "redis.log"),
    ]  # fmt: skip
    return subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)


def _answers(url: str) -> bool:
    client = make_redis(url, connect_timeout=1.0, socket_timeout=2.0)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A redis-server that speaks TLS only, with a self-signed certificate for 127.0.0.1."""
    openssl = shutil.which("openssl")
    # the embedded extra's redis-server (first on a venv's PATH) is built without TLS; Debian's has it
    binaries = list(dict.fromkeys(b for b in (shutil.which("redis-server"), "/usr/bin/redis-server") if b))
    binaries = [b for b in binaries if Path(b).exists()]
    require(bool(binaries) and openssl is not None, "the TLS test needs redis-server and openssl")
    assert openssl is not None
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    folder = Path(tempfile.mkdtemp(prefix="perth-tls-redis-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        for binary in binaries:
            port = free_port()
            url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}"
            candidate = _start_tls_redis(binary, port, cert, key, folder)
            # a redis-server built without TLS refuses --tls-port and exits at once
            wait_for(lambda: candidate.poll() is not None or _answers(url), timeout=30, what="redis-server")  # noqa: B023
            if candidate.poll() is None:
                proc = candidate
                break
        require(proc is not None, f"no redis-server with TLS among {binaries}")
        yield url, cert
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


def test_a_rediss_url_builds_a_tls_client_that_carries_the_pipeline(
    tls_redis: tuple[str, Path], database_url: str
) -> None:
    url, cert = tls_redis
    client = make_redis(url)
    try:
        assert client.connection_pool.connection_class is redis.SSLConnection
        assert client.connection_pool.connection_kwargs["ssl_ca_certs"] == str(cert)
        assert client.connection_pool.connection_kwargs["socket_timeout"] == 1.0  # our timeouts still apply
    finally:
        client.close()
    plain = make_redis(url.replace("rediss://", "redis://", 1).split("?")[0], connect_timeout=1.0)
    try:
        with pytest.raises(redis.ConnectionError):
            plain.ping()  # the server speaks TLS only: a plain client cannot talk to it
    finally:
        plain.close()

    settings = test_settings(url, database_url)
    s = session("over-tls")
    with PersistenceManager(settings=settings) as manager:
        manager.create_session(s)
        settle(manager, settings)  # enqueued over TLS, applied by a worker connected over TLS
        assert manager.restore_session(s.id) == s
    report = gather_status(settings)
    assert report["redis"]["ok"] is True and report["queue"]["finished"] >= 1


def test_sslmode_in_database_url_reaches_libpq(database_url: str) -> None:
    params = conninfo_to_dict(database_url)
    url = f"postgresql://{params['user']}@{params['host']}:{params.get('port', 5432)}/{params['dbname']}"
    with connect(url + "?sslmode=disable") as conn:
        assert conn.pgconn.ssl_in_use is False
    try:
        conn = connect(url + "?sslmode=require")
    except DatabaseUnavailable as exc:  # a server without SSL refuses what sslmode=require asks for
        assert "SSL" in str(exc)
    else:
        with conn:
            assert conn.pgconn.ssl_in_use is True
