"""Redis and RQ as this project uses them: clients with explicit timeouts, and the key names.

Every key this project writes besides RQ's own lives under ``perth:<queue>:``,
so that two deployments (or two test runs) on one Redis never see each other.
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from rq import Queue
from rq.serializers import JSONSerializer

__all__ = [
    "LIVE_STATUSES",
    "Keys",
    "make_queue",
    "make_redis",
    "read_db_health",
    "write_db_health",
]

#: Job statuses of a batch that may still be applied.
LIVE_STATUSES = frozenset({"queued", "started", "deferred", "scheduled"})


def make_redis(
    url: str,
    *,
    connect_timeout: float = 0.5,
    socket_timeout: float = 1.0,
    client_name: str | None = None,
) -> redis.Redis:
    """A client that fails fast: short connect and read timeouts, and no silent retries.

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
    client: redis.Redis = redis.Redis.from_url(url, **kwargs)
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
        return f"{self.prefix}health:db"

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
    """What a worker last saw of PostgreSQL, for producers and ``status`` (expires with ``ttl``)."""
    value = json.dumps({"ok": ok, "at": time.time(), "source": source, "error": error})
    client.set(keys.db_health, value, ex=ttl)


def read_db_health(raw: bytes | str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) and "ok" in value else None


def redis_host(url: str | None) -> str:
    """host:port of a Redis URL, for messages (never the password)."""
    if not url:
        return "<unset>"
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname}:{parts.port or 6379}"
