"""What ``perth-pipeline status`` reports: queue, lag, jobs, workers, backends, producers.

The report is a plain JSON-ready dict (``--json`` prints it as it is). It is
``healthy`` when both backends answer, the schema is applied and the failed
registry is empty; the command exits 1 otherwise, so it can serve as a health
check. Things that are not failures yet but lose data on a bad day (Redis
without persistence, an evicting ``maxmemory-policy``, no live workers) are
``warnings``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg
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
from .masking import first_line, mask_url
from .settings import Settings
from .store import Store

__all__ = ["gather_status", "producer_totals", "queue_lag", "render_status", "run_status"]

#: The producer counters shown in the one-line summary (all of them are in ``--json``).
_PRODUCER_SUMMARY = (
    "submitted",
    "coalesced",
    "enqueued_ops",
    "dropped_jobs",
    "dropped_entities",
    "dropped_chunks",
    "resynced",
    "unrouted",  # writes waiting for their session to be known (a backlog of another's batches)
)


def gather_status(settings: Settings) -> dict[str, Any]:
    """Everything an operator needs at a glance, as a JSON-ready dict.

    ``healthy`` is False when a backend is down, the schema is missing or batches
    are in the failed registry.
    """
    report: dict[str, Any] = {
        "checked_at": datetime.now(UTC).isoformat(),
        "queue_name": settings.queue,
        "problems": [],
        "warnings": [],
    }
    report["redis"] = _redis_part(settings, report)
    if not report["redis"]["ok"]:
        error = report["redis"]["error"]
        where = f"Redis unreachable at {redis_host(settings.redis_url)}: "
        report["problems"].append(error if error.startswith("invalid") else where + error)
    report["postgres"] = _postgres_section(settings)
    postgres = report["postgres"]
    if not postgres["ok"]:
        error = postgres["error"]
        report["problems"].append(error if "PostgreSQL" in error else f"PostgreSQL unreachable: {error}")
    elif postgres.get("schema_error"):
        report["problems"].append(postgres["schema_error"])
    seen = report.get("worker_view_of_postgres")
    if postgres["ok"] and seen is not None and seen["down"]:
        down = [w for w in seen["workers"] if w["fresh"] and not w["ok"]]
        who = "; ".join(f"{w['worker']}: {w['error']}" for w in down)
        report["warnings"].append(
            f"{seen['down']} of {seen['up'] + seen['down']} worker(s) report PostgreSQL unreachable ({who}) "
            "although status reaches it: check those workers' network and DATABASE_URL"
        )
    report["healthy"] = not report["problems"]
    return report


def _redis_part(settings: Settings, report: dict[str, Any]) -> dict[str, Any]:
    """The Redis section, and the queue, workers and producers sections that live in Redis."""
    try:
        client = make_redis(settings.redis_url or "", connect_timeout=2.0, socket_timeout=5.0)
    except ValueError as exc:  # not a redis://, rediss:// or unix:// URL
        return {
            "ok": False,
            "url": mask_url(settings.redis_url),
            "error": f"invalid REDIS_URL: {first_line(exc)}",
        }
    try:
        section = _redis_section(client, settings, report)
        keys = Keys(settings.queue)
        queue = make_queue(settings.queue, client)
        report["queue"] = _queue_section(queue)
        report["workers"] = _workers_section(queue)
        report["producers"] = producer_totals(client, keys)
        report["worker_view_of_postgres"] = read_db_health(client, keys, ttl=settings.health_ttl).as_dict()
    except redis.RedisError as exc:
        for partial in ("queue", "workers", "producers", "worker_view_of_postgres"):
            report.pop(partial, None)
        return {"ok": False, "url": mask_url(settings.redis_url), "error": first_line(exc)}
    finally:
        client.close()
    failed = report["queue"]["failed"]
    if failed:
        report["problems"].append(
            f"{failed} batch(es) in the failed registry: see why on the dashboard, "
            "then requeue or delete them (docs/operations.md)"
        )
    if not report["workers"]:
        report["warnings"].append("no live workers: batches wait on the queue")
    return section


def _redis_section(client: redis.Redis, settings: Settings, report: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    client.ping()
    latency = (time.perf_counter() - started) * 1000
    info = client.info()
    section: dict[str, Any] = {
        "ok": True,
        "url": mask_url(settings.redis_url),
        "latency_ms": round(latency, 2),
        "version": info.get("redis_version"),
        "role": info.get("role"),
        "used_memory": info.get("used_memory_human"),
        "aof_enabled": bool(info.get("aof_enabled")),
        "maxmemory_policy": info.get("maxmemory_policy"),
    }
    try:
        save = client.config_get("save").get("save", "")
    except redis.ResponseError:  # CONFIG may be renamed or forbidden on managed Redis
        save = None
    section["rdb_save"] = save
    if not section["aof_enabled"] and save == "":
        report["warnings"].append(
            "Redis keeps nothing on disk (no AOF, no RDB snapshots): a restart loses the queue; "
            "producers send live state again, but set appendonly yes"
        )
    policy = section["maxmemory_policy"]
    if policy and policy != "noeviction":
        report["warnings"].append(
            f"Redis maxmemory-policy is {policy}: under memory pressure it may evict queued batches; "
            "set maxmemory-policy noeviction"
        )
    return section


def _queue_section(queue: Queue) -> dict[str, Any]:
    return {
        "depth": queue.count,
        "lag_seconds": queue_lag(queue),
        "started": StartedJobRegistry(queue=queue).count,
        "finished": FinishedJobRegistry(queue=queue).count,
        "failed": FailedJobRegistry(queue=queue).count,
        "scheduled": ScheduledJobRegistry(queue=queue).count,  # type: ignore[no-untyped-call]
        "deferred": DeferredJobRegistry(queue=queue).count,
    }


def queue_lag(queue: Queue) -> float | None:
    """Age in seconds of the oldest batch waiting on the queue (None when the queue is empty)."""
    oldest = queue.get_job_ids(0, 1)
    if not oldest:
        return None
    enqueued = queue.connection.hget(f"rq:job:{oldest[0]}", "enqueued_at")
    if not isinstance(enqueued, bytes):
        return None
    try:
        when = datetime.fromisoformat(enqueued.decode().replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return round(max(0.0, (datetime.now(UTC) - when).total_seconds()), 3)


def _workers_section(queue: Queue) -> list[dict[str, Any]]:
    out = []
    for worker in Worker.all(queue=queue):
        state = worker.get_state()
        out.append(
            {
                "name": worker.name,
                "host": worker.hostname,
                "pid": worker.pid,
                "state": str(getattr(state, "value", state)),
                "current_job": worker.get_current_job_id(),
                "successful_jobs": worker.successful_job_count,
                "failed_jobs": worker.failed_job_count,
                "last_heartbeat": worker.last_heartbeat.isoformat() if worker.last_heartbeat else None,
            }
        )
    return sorted(out, key=lambda w: (w["host"] or "", w["name"]))


def producer_totals(client: redis.Redis, keys: Keys) -> dict[str, Any]:
    """The counters of every live producer (each publishes its own under a short TTL), summed."""
    totals: dict[str, int] = {}
    live = 0
    database_down = 0
    for key in client.scan_iter(match=keys.producer_pattern, count=500):
        raw = client.get(key)
        if not raw:
            continue  # expired between SCAN and GET: that producer is gone
        try:
            stats = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(stats, dict):
            continue
        live += 1
        database_down += stats.get("database_down") is True
        for name, value in stats.items():
            if isinstance(value, int) and not isinstance(value, bool):
                totals[name] = totals.get(name, 0) + value
    return {"live": live, "reporting_database_down": database_down, "totals": dict(sorted(totals.items()))}


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
    except (PersistenceError, psycopg.Error) as exc:  # psycopg.Error: a malformed DATABASE_URL
        store.close()
        return {**section, "ok": False, "error": first_line(exc)}
    try:
        section["schema_version"] = store.schema_version()
    except (PersistenceError, psycopg.Error) as exc:
        section["schema_version"] = None
        section["schema_error"] = first_line(exc)
    finally:
        store.close()
    if section["schema_version"] == 0:
        section["schema_error"] = "the schema is not applied: run `perth-pipeline init-db`"
    return section


def render_status(report: dict[str, Any]) -> str:
    lines = []
    state = "healthy" if report["healthy"] else "UNHEALTHY"
    lines.append(f"perth-pipeline status: {state} (queue {report['queue_name']!r}, {report['checked_at']})")
    r = report["redis"]
    if r.get("ok"):
        lines.append(
            f"  redis      up   {r['url']}  v{r['version']}  {r['latency_ms']} ms"
            f"  aof={'on' if r['aof_enabled'] else 'off'}  policy={r['maxmemory_policy']}"
        )
    else:
        lines.append(f"  redis      DOWN {r['url']}  {r.get('error', '')}")
    p = report["postgres"]
    if p.get("ok"):
        lines.append(
            f"  postgres   up   {p['url']}  v{p['version']}  {p['latency_ms']} ms"
            f"  schema={p.get('schema_version')}"
        )
    else:
        lines.append(f"  postgres   DOWN {p['url']}  {p.get('error', '')}")
    q = report.get("queue")
    if q:
        lag = "-" if q["lag_seconds"] is None else f"{q['lag_seconds']:.1f}s"
        lines.append(
            f"  queue      depth={q['depth']} lag={lag} started={q['started']} finished={q['finished']}"
            f" failed={q['failed']} scheduled={q['scheduled']} deferred={q['deferred']}"
        )
    workers = report.get("workers")
    if workers is not None:
        hosts = sorted({w["host"] or "?" for w in workers})
        on = f" on {', '.join(hosts)}" if hosts else ""
        lines.append(f"  workers    {len(workers)} live{on}")
        for w in workers:
            lines.append(
                f"    {w['name'][:16]:16}  {w['host']}:{w['pid']}  {w['state']}"
                f"  ok={w['successful_jobs']} failed={w['failed_jobs']}"
            )
    lines.extend(_render_worker_view(report.get("worker_view_of_postgres")))
    producers = report.get("producers")
    if producers is not None:
        t = producers["totals"]
        summary = " ".join(f"{k}={t.get(k, 0)}" for k in _PRODUCER_SUMMARY)
        lines.append(f"  producers  {producers['live']} live  {summary}")
    for warning in report["warnings"]:
        lines.append(f"  warning: {warning}")
    for problem in report["problems"]:
        lines.append(f"  problem: {problem}")
    return "\n".join(lines)


def _render_worker_view(view: dict[str, Any] | None) -> list[str]:
    """What each worker last reported of PostgreSQL: the workers that cannot reach it, by name."""
    if view is None:
        return []
    if not view["up"] and not view["down"]:
        stale = f" ({view['stale']} stale)" if view["stale"] else ""
        return [f"  db reports none fresh{stale}: producers check PostgreSQL themselves"]
    verdict = {True: "up", False: "DOWN"}[view["ok"]]
    lines = [f"  db reports {verdict}: {view['up']} worker(s) up, {view['down']} down, {view['stale']} stale"]
    for w in view["workers"]:
        if w["fresh"] and not w["ok"]:
            lines.append(f"    {w['worker'][:16]:16}  down  {w['age_seconds']}s ago  {w['error']}")
    return lines


def run_status(
    settings: Settings,
    *,
    as_json: bool = False,
    watch: float | None = None,
    echo: Callable[[str], None] = print,
    clear: Callable[[], None] | None = None,
) -> int:
    """Print the report (once, or every ``watch`` seconds until Ctrl-C). Returns the exit code.

    With ``--watch --json`` each report is one line of JSON (JSON Lines), so that a
    consumer can read them as they come.
    """
    code = 1
    try:
        while True:
            report = gather_status(settings)
            code = 0 if report["healthy"] else 1
            if as_json:
                text = json.dumps(report, default=str, indent=None if watch else 2)
            else:
                text = render_status(report)
            if watch and clear is not None and not as_json:
                clear()
            echo(text)
            if not watch:
                return code
            time.sleep(watch)
    except KeyboardInterrupt:  # Ctrl-C ends --watch: exit with the health of the last report
        return code
