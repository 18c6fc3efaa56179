"""What ``perth-pipeline status`` reports: queue, lag, jobs, workers, backends, producers."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import redis
from rq import Queue, Worker
from rq.registry import (
    DeferredJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    ScheduledJobRegistry,
    StartedJobRegistry,
)

from .broker import Keys, make_queue, make_redis, read_db_health, redis_host
from .errors import PersistenceError
from .settings import Settings, mask_url
from .store import Store

__all__ = ["gather_status", "render_status"]


def gather_status(settings: Settings) -> dict[str, Any]:
    """Everything an operator needs at a glance.

    ``healthy`` is False when a backend is down or batches are in the failed registry.
    """
    report: dict[str, Any] = {
        "checked_at": datetime.now(UTC).isoformat(),
        "queue_name": settings.queue,
        "problems": [],
        "warnings": [],
    }
    client = make_redis(settings.redis_url or "", connect_timeout=2.0, socket_timeout=5.0)
    try:
        report["redis"] = _redis_section(client, settings, report)
        if report["redis"]["ok"]:
            queue = make_queue(settings.queue, client)
            report["queue"] = _queue_section(queue)
            report["workers"] = _workers_section(queue)
            report["producers"] = _producers_section(client, Keys(settings.queue))
            report["worker_view_of_postgres"] = read_db_health(client.get(Keys(settings.queue).db_health))
            failed = report["queue"]["failed"]
            if failed:
                report["problems"].append(f"{failed} batch(es) in the failed registry (see requeue-failed)")
            if not report["workers"]:
                report["warnings"].append("no live workers: batches wait on the queue")
    except redis.RedisError as exc:
        report["redis"] = {"ok": False, "url": mask_url(settings.redis_url), "error": str(exc)}
    finally:
        client.close()
    if not report["redis"]["ok"]:
        report["problems"].append(f"Redis unreachable at {redis_host(settings.redis_url)}")
    report["postgres"] = _postgres_section(settings)
    if not report["postgres"]["ok"]:
        report["problems"].append("PostgreSQL unreachable")
    report["healthy"] = not report["problems"]
    return report


def _redis_section(client: redis.Redis, settings: Settings, report: dict[str, Any]) -> dict[str, Any]:
    info = client.info()
    section: dict[str, Any] = {
        "ok": True,
        "url": mask_url(settings.redis_url),
        "version": info.get("redis_version"),
        "aof_enabled": bool(info.get("aof_enabled")),
        "maxmemory_policy": info.get("maxmemory_policy"),
    }
    try:
        save = client.config_get("save").get("save", "")
    except redis.RedisError:  # CONFIG may be renamed or forbidden on managed Redis
        save = None
    section["rdb_save"] = save
    if not section["aof_enabled"] and not save:
        report["warnings"].append(
            "Redis keeps nothing on disk (no AOF, no RDB snapshots): a restart loses the queue; "
            "producers resend live state, but enable appendonly yes"
        )
    policy = section["maxmemory_policy"]
    if policy and policy != "noeviction":
        report["warnings"].append(
            f"Redis maxmemory-policy is {policy}: under memory pressure it may evict queued batches; "
            "use noeviction"
        )
    return section


def _queue_section(queue: Queue) -> dict[str, Any]:
    connection = queue.connection
    depth = queue.count
    lag = None
    oldest = queue.get_job_ids(0, 1)
    if oldest:
        enqueued = connection.hget(f"rq:job:{oldest[0]}", "enqueued_at")
        if isinstance(enqueued, bytes):
            when = datetime.fromisoformat(enqueued.decode().replace("Z", "+00:00"))
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            lag = max(0.0, (datetime.now(UTC) - when).total_seconds())
    return {
        "depth": depth,
        "lag_seconds": None if lag is None else round(lag, 3),
        "started": StartedJobRegistry(queue=queue).count,
        "finished": FinishedJobRegistry(queue=queue).count,
        "failed": FailedJobRegistry(queue=queue).count,
        "scheduled": ScheduledJobRegistry(queue=queue).count,  # type: ignore[no-untyped-call]
        "deferred": DeferredJobRegistry(queue=queue).count,
    }


def _workers_section(queue: Queue) -> list[dict[str, Any]]:
    out = []
    for worker in Worker.all(queue=queue):
        out.append(
            {
                "name": worker.name,
                "host": worker.hostname,
                "pid": worker.pid,
                "state": worker.get_state(),
                "current_job": worker.get_current_job_id(),
                "successful_jobs": worker.successful_job_count,
                "failed_jobs": worker.failed_job_count,
                "last_heartbeat": worker.last_heartbeat.isoformat() if worker.last_heartbeat else None,
            }
        )
    return sorted(out, key=lambda w: (w["host"] or "", w["name"]))


def _producers_section(client: redis.Redis, keys: Keys) -> dict[str, Any]:
    totals: dict[str, int] = {}
    count = 0
    for key in client.scan_iter(match=keys.producer_pattern, count=500):
        raw = client.get(key)
        if not raw:
            continue
        try:
            stats = json.loads(raw)
        except ValueError:
            continue
        count += 1
        for name, value in stats.items():
            if isinstance(value, int) and not isinstance(value, bool):
                totals[name] = totals.get(name, 0) + value
    totals.pop("published_at", None)
    return {"live": count, "totals": totals}


def _postgres_section(settings: Settings) -> dict[str, Any]:
    section: dict[str, Any] = {"url": mask_url(settings.database_url)}
    if not settings.database_url:
        return {**section, "ok": False, "error": "DATABASE_URL is not set"}
    store = Store(settings.database_url, connect_timeout=3, statement_timeout=5.0)
    started = time.perf_counter()
    try:
        store.ping()
        section["ok"] = True
        section["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
        section["version"] = store.server_version()
        try:
            section["schema_version"] = store.schema_version()
        except PersistenceError as exc:
            section["schema_version"] = None
            section["schema_error"] = str(exc)
    except PersistenceError as exc:
        section["ok"] = False
        section["error"] = str(exc)
    finally:
        store.close()
    return section


def render_status(report: dict[str, Any]) -> str:
    lines = []
    state = "healthy" if report["healthy"] else "UNHEALTHY"
    lines.append(f"perth-pipeline status: {state} (queue {report['queue_name']!r}, {report['checked_at']})")
    r = report["redis"]
    if r.get("ok"):
        lines.append(
            f"  redis      up   {r['url']}  v{r['version']}  aof={'on' if r['aof_enabled'] else 'off'}"
            f"  policy={r['maxmemory_policy']}"
        )
    else:
        lines.append(f"  redis      DOWN {r['url']}  {r.get('error', '')}")
    p = report["postgres"]
    if p.get("ok"):
        lines.append(
            f"  postgres   up   {p['url']}  v{p['version']}  schema={p.get('schema_version')}"
            f"  {p['latency_ms']} ms"
        )
    else:
        lines.append(f"  postgres   DOWN {p['url']}  {p.get('error', '')}")
    q = report.get("queue")
    if q:
        lag = "-" if q["lag_seconds"] is None else f"{q['lag_seconds']:.1f}s"
        lines.append(
            f"  queue      depth={q['depth']} lag={lag} started={q['started']} finished={q['finished']}"
            f" failed={q['failed']} scheduled={q['scheduled']}"
        )
    workers = report.get("workers")
    if workers is not None:
        lines.append(f"  workers    {len(workers)} live")
        for w in workers:
            lines.append(
                f"    {w['name'][:12]}  {w['host']}:{w['pid']}  {w['state']}"
                f"  ok={w['successful_jobs']} failed={w['failed_jobs']}"
            )
    producers = report.get("producers")
    if producers is not None:
        t = producers["totals"]
        keys = ("submitted", "coalesced", "enqueued_ops", "dropped_jobs", "dropped_entities", "resynced")
        summary = " ".join(f"{k}={t.get(k, 0)}" for k in keys)
        lines.append(f"  producers  {producers['live']} live  {summary}")
    for warning in report["warnings"]:
        lines.append(f"  warning: {warning}")
    for problem in report["problems"]:
        lines.append(f"  problem: {problem}")
    return "\n".join(lines)
