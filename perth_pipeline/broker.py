"""Redis and RQ as this project uses them: clients with explicit timeouts, and the key names.

Every key this project writes besides RQ's own lives under ``perth:<queue>:``,
so that two deployments (or two test runs) on one Redis never see each other.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from rq import Queue
from rq.serializers import JSONSerializer

from .errors import InvalidSetting
from .masking import first_line, mask_url

__all__ = [
    "LIVE_STATUSES",
    "DbHealth",
    "Keys",
    "clear_db_health",
    "db_health_verdict",
    "make_queue",
    "make_redis",
    "prune_db_health",
    "read_db_health",
    "write_db_health",
]

#: Job statuses of a batch that may still be applied.
LIVE_STATUSES = frozenset({"queued", "started", "deferred", "scheduled"})

#: A worker's health report older than this many ``health_ttl`` is removed from the hash by
#: the next worker that prunes (readers ignore it as soon as it is older than one ``health_ttl``;
#: until it is pruned, ``status`` shows it as stale).
PRUNE_AFTER_TTLS = 4


def make_redis(
    url: str,
    *,
    connect_timeout: float = 0.5,
    socket_timeout: float = 1.0,
    client_name: str | None = None,
) -> redis.Redis:
    """A client that fails fast: short connect and read timeouts, and no silent retries.

    A URL redis-py cannot parse raises :class:`InvalidSetting` (a ``ValueError``), masked.

    redis-py 8 defaults to 5 s timeouts and up to 10 retries with back-off (a silent
    server took 59 s to fail here); the terminal cannot afford either.
    """
    kwargs: dict[str, Any] = {
        "socket_connect_timeout": connect_timeout,
        "socket_timeout": socket_timeout,
        "retry": Retry(NoBackoff(), 0),
        "retry_on_timeout": False,
        "health_check_interval": 0,
    }
    if client_name:
        kwargs["client_name"] = client_name
    try:
        client: redis.Redis = redis.Redis.from_url(url, **kwargs)
    except ValueError as exc:  # its text quotes nothing, but the URL it names may hold a password
        raise InvalidSetting(f"invalid REDIS_URL {mask_url(url)}: {first_line(exc)}") from None
    return client


def make_queue(name: str, connection: redis.Redis, *, job_class: Any = None) -> Queue:
    """The project's queue: JSON serialization only (no pickle on the wire)."""
    if job_class is None:
        return Queue(name, connection=connection, serializer=JSONSerializer)
    return Queue(name, connection=connection, serializer=JSONSerializer, job_class=job_class)


class Keys:
    """Names of this project's own keys for one queue."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.prefix = f"perth:{queue}:"

    def outstanding(self, session_id: object) -> str:
        """Sorted set of batch ids enqueued for a session and not yet applied (score: enqueue time)."""
        return f"{self.prefix}outstanding:{session_id}"

    @property
    def db_health(self) -> str:
        """Hash of what each worker last saw of PostgreSQL: field = worker name, value = JSON report.

        (Version 0.1's workers kept one string at ``health:db``; the hash has a name of its own,
        so that neither version ever meets the other's type at its key.)
        """
        return f"{self.prefix}health:workers"

    def producer(self, origin: str) -> str:
        return f"{self.prefix}producer:{origin}"

    @property
    def producer_pattern(self) -> str:
        return f"{self.prefix}producer:*"

    def worker_metrics(self, worker: str) -> str:
        return f"{self.prefix}worker:{worker}"

    @property
    def worker_pattern(self) -> str:
        return f"{self.prefix}worker:*"

    @property
    def scheduler_lock(self) -> str:
        return f"{self.prefix}scheduler:lock"

    @property
    def maintenance_lock(self) -> str:
        return f"{self.prefix}maintenance:lock"


def write_db_health(
    client: redis.Redis, keys: Keys, *, ok: bool, source: str, ttl: int, error: str | None = None
) -> None:
    """What the worker ``source`` last saw of PostgreSQL: its own field of the health hash.

    A field has no TTL of its own: readers ignore a report older than ``ttl`` (its ``at``), and
    :func:`prune_db_health` removes it later. The whole key expires ``ttl`` after the last report
    of any worker, so it vanishes when no worker lives.
    """
    value = json.dumps({"ok": ok, "at": time.time(), "source": source, "error": error})
    with client.pipeline(transaction=True) as pipe:
        pipe.hset(keys.db_health, source, value)
        pipe.expire(keys.db_health, ttl)
        pipe.execute()


def clear_db_health(client: redis.Redis, keys: Keys, source: str) -> None:
    """The worker ``source`` stops: its report goes (the others' verdict no longer counts it)."""
    client.hdel(keys.db_health, source)


def prune_db_health(client: redis.Redis, keys: Keys, *, ttl: int, now: float | None = None) -> int:
    """Remove reports older than :data:`PRUNE_AFTER_TTLS` ``ttl`` (workers that died); how many.

    Optimistic: if any worker writes the hash meanwhile, nothing is removed this time, so that
    a report refreshed between the read and the delete is never lost.
    """
    cutoff = (time.time() if now is None else now) - PRUNE_AFTER_TTLS * ttl
    with client.pipeline(transaction=True) as pipe:
        try:
            pipe.watch(keys.db_health)  # type: ignore[no-untyped-call]
            fields = pipe.hgetall(keys.db_health)
            stale = [
                name
                for name, raw in fields.items()
                if (report := _parse_report(raw)) is None or report["at"] < cutoff
            ]
            if not stale:
                return 0
            pipe.multi()
            pipe.hdel(keys.db_health, *stale)
            pipe.execute()
        except redis.WatchError:
            return 0
    return len(stale)


@dataclass(frozen=True)
class DbHealth:
    """The workers' verdict on PostgreSQL, from the fresh reports of the health hash.

    ``ok`` is None when no worker reported within ``health_ttl`` (a reader then checks for
    itself), True when at least one worker reaches PostgreSQL (the queue is being applied), and
    False when every fresh report says it is down; ``error`` is then the newest report's error.
    """

    ok: bool | None
    error: str | None = None
    #: worker name -> its fresh report (``ok``, ``at``, ``error``, ``source``), newest first
    fresh: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: worker name -> its report older than ``health_ttl`` (ignored), newest first
    stale: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def up(self) -> list[str]:
        return [name for name, report in self.fresh.items() if report["ok"]]

    @property
    def down(self) -> list[str]:
        return [name for name, report in self.fresh.items() if not report["ok"]]

    def as_dict(self, now: float | None = None) -> dict[str, Any]:
        """JSON-ready, for ``status --json``: the verdict, the counts, and each worker's report."""
        at = time.time() if now is None else now

        def view(name: str, report: dict[str, Any], fresh: bool) -> dict[str, Any]:
            age = round(max(0.0, at - report["at"]), 1)
            return {
                "worker": name,
                "ok": report["ok"],
                "fresh": fresh,
                "age_seconds": age,
                "error": report["error"],
            }

        return {
            "ok": self.ok,
            "error": self.error,
            "up": len(self.up),
            "down": len(self.down),
            "stale": len(self.stale),
            "workers": [view(n, r, True) for n, r in self.fresh.items()]
            + [view(n, r, False) for n, r in self.stale.items()],
        }


def db_health_verdict(fields: Mapping[Any, Any] | None, *, ttl: float, now: float | None = None) -> DbHealth:
    """The verdict of the health hash's fields (HGETALL's answer): any fresh report up means up.

    One worker whose own network to PostgreSQL is broken must not make producers hold their
    batches back while other workers apply them; and workers that all say down are believed.
    Reports older than ``ttl`` (a worker that died or stopped reporting) do not count.
    """
    at = time.time() if now is None else now
    fresh: dict[str, dict[str, Any]] = {}
    stale: dict[str, dict[str, Any]] = {}
    for name, raw in (fields or {}).items():
        report = _parse_report(raw)
        if report is None:
            continue
        key = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        (fresh if at - report["at"] <= ttl else stale)[key] = report
    fresh = dict(sorted(fresh.items(), key=lambda item: -item[1]["at"]))
    stale = dict(sorted(stale.items(), key=lambda item: -item[1]["at"]))
    if not fresh:
        return DbHealth(None, None, fresh, stale)
    if any(report["ok"] for report in fresh.values()):
        return DbHealth(True, None, fresh, stale)
    newest = next(iter(fresh.values()))
    return DbHealth(False, newest["error"] or "reported down by the workers", fresh, stale)


def read_db_health(client: redis.Redis, keys: Keys, *, ttl: float) -> DbHealth:
    """The workers' verdict on PostgreSQL, in one round trip (``status``, tests)."""
    return db_health_verdict(client.hgetall(keys.db_health), ttl=ttl)


def _parse_report(raw: bytes | str | None) -> dict[str, Any] | None:
    """One worker's report, normalized; None when it is not a report at all."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        return None
    if not isinstance(value, dict) or "ok" not in value:
        return None
    at = value.get("at")
    if isinstance(at, bool) or not isinstance(at, int | float):
        return None
    error = value.get("error")
    return {
        "ok": bool(value["ok"]),
        "at": float(at),
        "source": value.get("source"),
        "error": str(error) if error else None,
    }


def redis_host(url: str | None) -> str:
    """host:port of a Redis URL, for messages (never the password)."""
    if not url:
        return "<unset>"
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname}:{parts.port or 6379}"
