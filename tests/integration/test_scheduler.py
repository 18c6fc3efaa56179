"""`perth-pipeline scheduler`: one active at a time, JSON cleanup jobs on a schedule, run by our workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import psycopg
import redis
from rq.job import Job
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from perth_pipeline import NotFound, PersistenceManager
from perth_pipeline.broker import make_queue
from perth_pipeline.scheduler import CLEANUP_FUNCTION, Scheduler
from perth_pipeline.settings import Settings

from ..helpers import age_sessions, drain, now, session, settle, tab, wait_for

ROOT = Path(__file__).resolve().parents[2]
HOUR, DAY = 3600.0, 86400.0


def _scheduler(settings: Settings, rconn: redis.Redis, **kw: Any) -> Scheduler:
    options: dict[str, Any] = {"every": HOUR, "older_than": 30 * DAY, **kw}
    return Scheduler(settings, rconn, **options)


def _queued(settings: Settings, rconn: redis.Redis) -> list[str]:
    return [
        j.decode() if isinstance(j, bytes) else j for j in rconn.lrange(f"rq:queue:{settings.queue}", 0, -1)
    ]


def test_one_scheduler_is_active_and_enqueues_a_json_cleanup_job(
    settings: Settings, rconn: redis.Redis
) -> None:
    first, second = _scheduler(settings, rconn), _scheduler(settings, rconn)
    job_id = first.tick()
    assert job_id is not None and first.is_leader
    assert second.tick() is None and not second.is_leader  # another host: stands by
    assert first.tick() is None  # the next run is an hour away
    assert _queued(settings, rconn) == [job_id]
    # JSON on the wire, naming the allowlisted function: no pickle a JSON-only worker would refuse
    data = rconn.hget(f"rq:job:{job_id}", "data")
    assert isinstance(data, bytes)
    payload = json.loads(zlib.decompress(data))
    assert payload == [CLEANUP_FUNCTION, None, [{"older_than": 30 * DAY}], {}]


def test_the_cleanup_job_is_described_in_days_not_seconds(settings: Settings, rconn: redis.Redis) -> None:
    job_id = _scheduler(settings, rconn).tick()
    assert job_id is not None
    job = Job.fetch(job_id, connection=rconn, serializer=JSONSerializer)
    assert job.description == "cleanup: sessions inactive for more than 30d"


def test_a_takeover_keeps_the_schedule(settings: Settings, rconn: redis.Redis) -> None:
    first, second = _scheduler(settings, rconn), _scheduler(settings, rconn)
    start = time.time()
    assert first.tick(now=start) is not None
    first.release()  # a clean stop: the lock goes at once
    assert second.tick(now=start + 60) is None  # active now, but the run is not due yet
    assert second.is_leader
    drain(settings)  # the first run finished: the next may be enqueued when due
    assert second.tick(now=start + HOUR + 1) is not None
    assert len(_queued(settings, rconn)) == 1


def test_a_dead_schedulers_lock_expires_and_a_paused_one_steps_down(
    settings: Settings, rconn: redis.Redis
) -> None:
    first, second = _scheduler(settings, rconn, lock_ttl=1.0), _scheduler(settings, rconn, lock_ttl=1.0)
    assert first.tick() is not None
    assert not second.hold()
    # the first one stops renewing (killed, or paused): its lock expires and the other takes over
    wait_for(second.hold, timeout=15, what="the lock to expire and pass to the second scheduler")
    assert first.tick() is None and not first.is_leader  # back from its pause, it finds the lock gone
    assert second.is_leader


def test_a_run_is_skipped_while_the_previous_cleanup_is_still_queued(
    settings: Settings, rconn: redis.Redis
) -> None:
    scheduler = _scheduler(settings, rconn)
    start = time.time()
    first = scheduler.tick(now=start)
    assert first is not None
    assert scheduler.tick(now=start + HOUR + 1) is None  # no worker ran it: no second copy piles up
    assert _queued(settings, rconn) == [first]
    drain(settings)
    assert scheduler.tick(now=start + 2 * HOUR + 2) is not None


def test_the_cleanup_job_runs_on_our_workers_and_removes_old_sessions(
    settings: Settings, rconn: redis.Redis
) -> None:
    old, fresh = session("old", last_active=now(-40 * DAY)), session("fresh")
    with PersistenceManager(settings=settings) as manager:
        for s in (old, fresh):
            manager.create_session(s)
            manager.create_tab(tab(s.id))
        settle(manager, settings)
    with psycopg.connect(settings.database_url or "", autocommit=True) as conn:
        age_sessions(conn, [old.id], 40 * DAY)
    job_id = _scheduler(settings, rconn).tick()
    assert job_id is not None
    assert drain(settings)
    job = Job.fetch(job_id, connection=rconn, serializer=JSONSerializer)
    assert job.get_status() == "finished"
    result = job.return_value()
    assert result is not None
    assert (result["sessions"], result["tabs"], result["dry_run"]) == (1, 1, False)
    assert [s["id"] for s in result["session_list"]] == [str(old.id)]
    with PersistenceManager(settings=settings, start=False) as manager:
        assert manager.restore_session(fresh.id, wait=0) == fresh
        try:
            manager.restore_session(old.id, wait=0)
            raise AssertionError("the old session is still stored")
        except NotFound:
            pass


def test_a_cleanup_job_with_bad_options_is_refused_into_the_failed_registry(
    settings: Settings, rconn: redis.Redis
) -> None:
    queue = make_queue(settings.queue, rconn)
    job = queue.enqueue(CLEANUP_FUNCTION, {"older_than": -1, "everything": True})
    drain(settings)
    assert job.id in FailedJobRegistry(queue=queue).get_job_ids()
    reason = Job.fetch(job.id, connection=rconn, serializer=JSONSerializer).meta.get("perth_refused", "")
    assert "older_than" in reason and "everything" in reason


def _env(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_URL": settings.redis_url or "",
        "DATABASE_URL": settings.database_url or "",
        "PERTH_QUEUE": settings.queue,
    }


def test_the_scheduler_command_enqueues_and_stops_cleanly_on_sigterm(
    settings: Settings, rconn: redis.Redis
) -> None:
    lock = f"perth:{settings.queue}:scheduler:lock"
    with subprocess.Popen(
        [sys.executable, "-m", "perth_pipeline.cli", "scheduler", "--every", "1h", "--tick", "0.1"],
        env=_env(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            wait_for(lambda: _queued(settings, rconn), timeout=60, what="the scheduler to enqueue a cleanup")
            assert rconn.exists(lock)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert not rconn.exists(lock)  # given up on the way out: another host takes over at once
    assert len(_queued(settings, rconn)) == 1


def test_scheduler_once_enqueues_only_when_due(settings: Settings) -> None:
    args = [sys.executable, "-m", "perth_pipeline.cli", "scheduler", "--once", "--older-than", "7d"]
    first = subprocess.run(args, env=_env(settings), capture_output=True, text=True, timeout=60, check=False)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("enqueued cleanup job ")
    second = subprocess.run(args, env=_env(settings), capture_output=True, text=True, timeout=60, check=False)
    assert (second.returncode, second.stdout.strip()) == (0, "nothing due (or another is active)")


def test_the_procfile_runs_the_scheduler() -> None:
    from honcho.environ import parse_procfile

    processes = parse_procfile((ROOT / "Procfile").read_text(encoding="utf-8")).processes
    assert processes.get("scheduler") == "exec perth-pipeline scheduler"


def test_a_queued_cleanup_job_cannot_ask_to_remove_everything(
    settings: Settings, rconn: redis.Redis, pg: psycopg.Connection[Any]
) -> None:
    # anyone who can write to Redis can enqueue a job: older_than=0.001 would remove every session
    with PersistenceManager(settings=settings) as manager:
        s = session("in use")
        manager.create_session(s)
        settle(manager, settings)
    queue = make_queue(settings.queue, rconn)
    job = queue.enqueue(CLEANUP_FUNCTION, {"older_than": 0.001})
    drain(settings)
    assert job.id in FailedJobRegistry(queue=queue).get_job_ids()
    reason = Job.fetch(job.id, connection=rconn, serializer=JSONSerializer).meta.get("perth_refused", "")
    assert "older_than" in reason
    assert pg.execute("SELECT count(*) FROM sessions WHERE id = %s", (s.id,)).fetchone() == (1,)


def test_the_scheduler_refuses_a_retention_below_an_hour(settings: Settings) -> None:
    args = [sys.executable, "-m", "perth_pipeline.cli", "scheduler", "--once", "--older-than", "30m"]
    result = subprocess.run(args, check=False, env=_env(settings), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--older-than" in result.stderr and "1h" in result.stderr and "Traceback" not in result.stderr
