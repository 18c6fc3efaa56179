"""Schema migration 2 on a database made by an earlier schema.sql: `init-db` (twice) brings it up to date.

The earlier schemas are read from the repository's history (``git show``): the first schema
(without migration 2) and the one that added tombstone ancestors but not ``sessions.activity_at``.
Each test works in a database of its own on the test server, dropped at the end.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from perth_pipeline.store import Store

from ..helpers import require, wait_for

ROOT = Path(__file__).resolve().parents[2]
#: schema.sql before migration 2, and with its first half (tombstone ancestors) only
_EARLIER = {"first": "54addbb", "ancestors only": "1d971db"}


def _schema_at(commit: str) -> str:
    git = shutil.which("git")
    require(git is not None and (ROOT / ".git").exists(), "needs git and the repository's history")
    assert git is not None
    done = subprocess.run(
        [git, "show", f"{commit}:schema.sql"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    require(done.returncode == 0, f"schema.sql of {commit} is not in this checkout's history")
    return done.stdout


@pytest.fixture
def own_database(backends: tuple[str | None, str | None]) -> Iterator[str]:
    server = backends[1]
    require(server is not None, "no PostgreSQL: set DATABASE_URL or install the 'embedded' extra")
    assert server is not None
    name = f"perth_migrate_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield make_conninfo(server, dbname=name)
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _columns(conn: psycopg.Connection[Any], table: str) -> dict[str, tuple[str, str, str | None]]:
    rows = conn.execute(
        "SELECT column_name, is_nullable, data_type, column_default FROM information_schema.columns "
        "WHERE table_name = %s",
        (table,),
    ).fetchall()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


@pytest.mark.parametrize("earlier", sorted(_EARLIER))
def test_init_db_twice_migrates_a_database_of_an_earlier_schema(own_database: str, earlier: str) -> None:
    busy, quiet, gone = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(own_database, autocommit=True) as conn:
        conn.execute(_schema_at(_EARLIER[earlier]).encode())
        assert "activity_at" not in _columns(conn, "sessions")
        # rows as that schema's workers left them: a session untouched for 40 days whose panes
        # were written a day ago, one idle for 40 days, and an old tombstone
        conn.execute(
            "INSERT INTO sessions (id, name, last_active, updated_at) VALUES "
            "(%(busy)s, 'busy', now() - interval '40 days', now() - interval '40 days'), "
            "(%(quiet)s, 'quiet', now() - interval '40 days', now() - interval '40 days')",
            {"busy": busy, "quiet": quiet},
        )
        tab = uuid.uuid4()
        conn.execute(
            "INSERT INTO tabs (id, session_id, position, name, updated_at) "
            "VALUES (%s, %s, 0, 't', now() - interval '40 days')",
            (tab, busy),
        )
        conn.execute(
            "INSERT INTO panes (id, tab_id, pane_id, pane_type, session_id, updated_at) "
            "VALUES (gen_random_uuid(), %s, 'terminal_1', 'terminal', %s, now() - interval '1 day')",
            (tab, busy),
        )
        conn.execute("INSERT INTO tombstones (id, kind, version, origin) VALUES (%s, 'tab', 5, 'p')", (gone,))
    store = Store(own_database)
    try:
        assert store.init_db() == 2
        assert store.init_db() == 2  # idempotent: nothing left to do, nothing redone
    finally:
        store.close()
    with psycopg.connect(own_database, autocommit=True) as conn:
        sessions, tombstones = _columns(conn, "sessions"), _columns(conn, "tombstones")
        nullable, kind, default = sessions["activity_at"]
        assert (nullable, kind) == ("NO", "timestamp with time zone") and default == "now()"
        assert {k: tombstones[k][:2] for k in ("session_id", "tab_id")} == {
            "session_id": ("YES", "uuid"),
            "tab_id": ("YES", "uuid"),
        }
        # activity_at starts from what the rows say, not from the moment of the migration
        ages = dict(
            conn.execute(
                "SELECT id, round(extract(epoch FROM now() - activity_at) / 86400) FROM sessions"
            ).fetchall()
        )
        assert ages == {busy: 1, quiet: 40}
        assert conn.execute("SELECT session_id, tab_id FROM tombstones").fetchall() == [(None, None)]
        assert conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall() == [
            (1,),
            (2,),
        ]


def test_init_db_on_a_migrated_database_does_not_wait_for_readers_of_sessions_and_tombstones(
    database_url: str,
) -> None:
    # a restore (sessions) or a producer's route lookup (tombstones) in flight: an ALTER TABLE, which
    # takes its exclusive lock before it finds the column already there, would wait for it, and
    # every later read and batch would queue behind the ALTER
    done = threading.Event()

    def init() -> None:
        store = Store(database_url)
        try:
            store.init_db()
        finally:
            store.close()
            done.set()

    reader = psycopg.connect(database_url)
    thread = threading.Thread(target=init)
    try:
        reader.execute("SELECT (SELECT count(*) FROM sessions), (SELECT count(*) FROM tombstones)")
        thread.start()
        wait_for(done.is_set, timeout=20, what="init-db to finish while a reader is in flight")
    finally:
        reader.rollback()
        reader.close()
        if thread.is_alive():
            thread.join(timeout=30)
