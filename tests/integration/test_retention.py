"""Retention: `perth-pipeline cleanup` (dry run and real run) against rows with chosen timestamps."""

from __future__ import annotations

import base64
import json
import threading
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from perth_pipeline import NotFound, PaneHistoryChunk, PersistenceManager
from perth_pipeline.locks import lock_key
from perth_pipeline.operations import Batch, HistoryAppend, PaneUpsert, SessionUpsert, TabUpsert
from perth_pipeline.retention import run_cleanup
from perth_pipeline.settings import Settings
from workers.applier import Applier

from ..helpers import age_sessions, now, pane, run_cli, session, settle, tab, wait_for

DAY = 86400.0
_COUNTS = (
    "SELECT (SELECT count(*) FROM sessions), (SELECT count(*) FROM tabs), (SELECT count(*) FROM panes), "
    "(SELECT count(*) FROM pane_history), (SELECT count(*) FROM tombstones), "
    "(SELECT count(*) FROM template_tombstones)"
)


@pytest.fixture
def aged(settings: Settings, pg: psycopg.Connection[Any]) -> dict[str, Any]:
    """An old session (40 days), a fresh one (1 day), orphans and tombstones, young and old."""
    old, fresh = session("old", last_active=now(-40 * DAY)), session("fresh", last_active=now(-DAY))
    old_tabs = [tab(old.id, 0), tab(old.id, 1)]
    old_panes = [pane(old_tabs[0].id, 1), pane(old_tabs[0].id, 2), pane(old_tabs[1].id, 1)]
    fresh_tab = tab(fresh.id)
    fresh_pane = pane(fresh_tab.id, 1)
    with PersistenceManager(settings=settings) as manager:
        for s in (old, fresh):
            manager.create_session(s)
        for t in (*old_tabs, fresh_tab):
            manager.create_tab(t)
        for p in (*old_panes, fresh_pane):
            manager.create_pane(p)
        for i in range(3):
            manager.append_pane_history(
                PaneHistoryChunk(pane_id=old_panes[0].id, chunk_index=i, content=b"o" * 100)
            )
        manager.append_pane_history(PaneHistoryChunk(pane_id=fresh_pane.id, chunk_index=0, content=b"fresh"))
        settle(manager, settings)
    age_sessions(pg, [old.id], 40 * DAY)
    age_sessions(pg, [fresh.id], DAY)
    orphans = {"old_tab": uuid.uuid4(), "young_tab": uuid.uuid4(), "old_pane": uuid.uuid4()}
    pg.execute(
        "INSERT INTO tabs (id, session_id, position, name, version, origin, updated_at) VALUES "
        "(%s, gen_random_uuid(), 0, 'lost', 1, 'p', now() - interval '40 days'), "
        "(%s, gen_random_uuid(), 0, 'arriving', 1, 'p', now())",
        (orphans["old_tab"], orphans["young_tab"]),
    )
    # a pane of the fresh session whose tab never arrived
    pg.execute(
        "INSERT INTO panes (id, tab_id, pane_id, pane_type, session_id, version, origin, updated_at) VALUES "
        "(%s, gen_random_uuid(), 'terminal_9', 'terminal', %s, 1, 'p', now() - interval '40 days')",
        (orphans["old_pane"], fresh.id),
    )
    tombstones = {"old": uuid.uuid4(), "young": uuid.uuid4()}
    pg.execute(
        "INSERT INTO tombstones (id, kind, version, origin, deleted_at) VALUES "
        "(%s, 'pane', 1, 'p', now() - interval '31 days'), (%s, 'tab', 1, 'p', now())",
        (tombstones["old"], tombstones["young"]),
    )
    pg.execute(
        "INSERT INTO template_tombstones (name, version, origin, deleted_at) VALUES "
        "('gone', 1, 'p', now() - interval '31 days'), ('recent', 1, 'p', now())"
    )
    return {
        "old": old,
        "fresh": fresh,
        "old_tabs": old_tabs,
        "old_panes": old_panes,
        "fresh_pane": fresh_pane,
        "orphans": orphans,
        "tombstones": tombstones,
    }


def test_dry_run_prints_what_would_go_and_removes_nothing(
    settings: Settings, aged: dict[str, Any], pg: psycopg.Connection[Any]
) -> None:
    before = pg.execute(_COUNTS).fetchone()
    result = run_cli(settings, "cleanup", "--older-than", "30d", "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "would remove 1 session inactive for more than 30d" in out
    assert str(aged["old"].id) in out and str(aged["fresh"].id) not in out
    assert "with 2 tabs, 3 panes, 3 scrollback chunks (300 bytes)" in out
    assert "would remove 1 orphan tab, 1 orphan pane, 0 orphan scrollback chunks" in out
    assert "would remove 1 tombstone and 1 template tombstone older than 30d" in out
    assert pg.execute(_COUNTS).fetchone() == before


def test_cleanup_removes_old_sessions_orphans_and_tombstones_and_keeps_the_rest(
    settings: Settings, aged: dict[str, Any], pg: psycopg.Connection[Any]
) -> None:
    old, fresh = aged["old"], aged["fresh"]
    result = run_cli(settings, "cleanup", "--older-than", "30d", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["dry_run"] is False
    assert [s["id"] for s in report["session_list"]] == [str(old.id)]
    assert {k: report[k] for k in ("sessions", "tabs", "panes", "history_chunks", "history_bytes")} == {
        "sessions": 1,
        "tabs": 2,
        "panes": 3,
        "history_chunks": 3,
        "history_bytes": 300,
    }
    assert (report["orphan_tabs"], report["orphan_panes"], report["orphan_history_chunks"]) == (1, 1, 0)
    assert (report["tombstones"], report["template_tombstones"]) == (1, 1)

    # the old session is gone with everything under it; every row of the fresh one is there
    for table, column in (("tabs", "session_id"), ("panes", "session_id"), ("pane_history", "session_id")):
        assert pg.execute(f"SELECT count(*) FROM {table} WHERE {column} = %s", (old.id,)).fetchone() == (0,)
    with PersistenceManager(settings=settings, start=False) as manager:
        with pytest.raises(NotFound):
            manager.restore_session(old.id, wait=0)
        assert manager.restore_session(fresh.id, wait=0) == fresh
        assert [
            p.id for t in manager.restore_tabs(fresh.id, wait=0) for p in manager.restore_panes(t.id)
        ] == [aged["fresh_pane"].id]
        assert manager.restore_pane_history(aged["fresh_pane"].id, wait=0) == b"fresh"
    # orphans: the old ones went, the young one may still see its parent arrive
    tab_ids = {r[0] for r in pg.execute("SELECT id FROM tabs").fetchall()}
    assert aged["orphans"]["young_tab"] in tab_ids and aged["orphans"]["old_tab"] not in tab_ids
    assert pg.execute(
        "SELECT count(*) FROM panes WHERE id = %s", (aged["orphans"]["old_pane"],)
    ).fetchone() == (0,)
    # tombstones: the old ones went; the young one stays, and the removed session left one of its own
    kinds = dict(pg.execute("SELECT id, kind FROM tombstones").fetchall())
    assert kinds == {aged["tombstones"]["young"]: "tab", old.id: "session"}
    assert pg.execute("SELECT name FROM template_tombstones").fetchall() == [("recent",)]
    # a second run finds nothing left to do
    again = json.loads(run_cli(settings, "cleanup", "--older-than", "30d", "--json").stdout)
    assert again["sessions"] == 0 and again["orphan_tabs"] == again["tombstones"] == 0


def test_a_late_redelivery_stays_dead_but_a_live_terminal_brings_the_session_back(
    settings: Settings, aged: dict[str, Any], database_url: str
) -> None:
    old, old_tab = aged["old"], aged["old_tabs"][0]
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute("SELECT version, origin FROM sessions WHERE id = %s", (old.id,)).fetchone()
        tab_row = conn.execute("SELECT version FROM tabs WHERE id = %s", (old_tab.id,)).fetchone()
        assert row is not None and tab_row is not None
        (version, origin), tab_version = row, tab_row[0]
        run_cleanup(conn, older_than=30 * DAY, tombstone_retention=30 * DAY)
        # the batch that wrote them, delivered again (a retried job, a requeued failure)
        late = Batch(
            id=uuid.uuid4(),
            origin=origin,
            created_at=datetime.now(UTC),
            ops=[SessionUpsert(version=version, record=old), TabUpsert(version=tab_version, record=old_tab)],
        )
        Applier().apply(conn, late)
        assert conn.execute("SELECT count(*) FROM sessions WHERE id = %s", (old.id,)).fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM tabs WHERE id = %s", (old_tab.id,)).fetchone() == (0,)
    with PersistenceManager(settings=settings) as manager:  # a terminal that still holds the session
        manager.update_session(old.model_copy(update={"last_active": now()}))
        settle(manager, settings)
        assert manager.restore_session(old.id, wait=0).name == old.name


def test_cleanup_waits_for_a_batch_of_the_session_in_flight(
    settings: Settings, aged: dict[str, Any], database_url: str, pg: psycopg.Connection[Any]
) -> None:
    old = aged["old"]
    with psycopg.connect(database_url, autocommit=True) as batch, batch.transaction():
        batch.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key(old.id),))  # as the applier does
        reports: list[Any] = []

        def clean() -> None:
            with psycopg.connect(database_url, autocommit=True) as conn:
                reports.append(run_cleanup(conn, older_than=30 * DAY, tombstone_retention=30 * DAY))

        worker = threading.Thread(target=clean)
        worker.start()
        waiting = (
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        wait_for(
            lambda: pg.execute(waiting).fetchone() == (1,),
            timeout=30,
            what="the cleanup to wait on the session's lock",
        )
        assert pg.execute("SELECT count(*) FROM sessions WHERE id = %s", (old.id,)).fetchone() == (1,)
    worker.join(timeout=60)
    assert not worker.is_alive()
    assert [s["id"] for s in reports[0].sessions] == [str(old.id)]
    assert pg.execute("SELECT count(*) FROM sessions WHERE id = %s", (old.id,)).fetchone() == (0,)


def test_cleanup_works_through_many_sessions_a_chunk_at_a_time(
    settings: Settings, database_url: str, pg: psycopg.Connection[Any]
) -> None:
    stale = [session(f"stale-{i}", last_active=now(-10 * DAY)) for i in range(7)]
    with PersistenceManager(settings=settings) as manager:
        for s in stale:
            manager.create_session(s)
            manager.create_tab(tab(s.id))
        settle(manager, settings)
    age_sessions(pg, [s.id for s in stale], 10 * DAY)
    with psycopg.connect(database_url, autocommit=True) as conn:
        report = run_cleanup(conn, older_than=5 * DAY, tombstone_retention=30 * DAY, chunk=2)
    assert sorted(s["id"] for s in report.sessions) == sorted(str(s.id) for s in stale)
    assert report.tabs == 7 and report.tombstones_written == 7
    assert pg.execute("SELECT count(*) FROM sessions").fetchone() == (0,)


@pytest.mark.parametrize(
    "args",
    [
        ["cleanup"],
        ["cleanup", "--older-than", "soon"],
        ["cleanup", "--older-than", "0s"],
        ["cleanup", "--older-than", "30"],
        ["cleanup", "--older-than", "30d", "--tombstones-older-than", "7"],
    ],
)
def test_cleanup_refuses_a_missing_or_bad_duration(settings: Settings, args: list[str]) -> None:
    result = run_cli(settings, *args)
    assert result.returncode == 2
    assert "older-than" in result.stderr and "Traceback" not in result.stderr
    if args[-1].isdigit():  # a bare number: the unit is asked for, nothing is removed
        assert "has no unit" in result.stderr


def test_the_scheduler_refuses_a_duration_without_a_unit(settings: Settings) -> None:
    result = run_cli(settings, "scheduler", "--once", "--every", "3600")
    assert result.returncode == 2
    assert "--every" in result.stderr and "has no unit" in result.stderr


def test_a_session_written_under_for_a_month_without_touches_is_not_idle(
    settings: Settings, pg: psycopg.Connection[Any], database_url: str
) -> None:
    # the terminal never calls touch_session: last_active stays where the session was created,
    # but its panes and scrollback keep changing, which the cleanup must read as activity
    busy, idle = session("busy", last_active=now(-40 * DAY)), session("idle", last_active=now(-40 * DAY))
    busy_tab, idle_tab = tab(busy.id), tab(idle.id)
    busy_pane = pane(busy_tab.id, 1)
    with PersistenceManager(settings=settings) as manager:
        for s, t in ((busy, busy_tab), (idle, idle_tab)):
            manager.create_session(s)
            manager.create_tab(t)
        manager.create_pane(busy_pane)
        settle(manager, settings)
        age_sessions(pg, [busy.id, idle.id], 40 * DAY)
        manager.update_pane(busy_pane.model_copy(update={"title": "still typing"}))
        manager.append_pane_history(PaneHistoryChunk(pane_id=busy_pane.id, chunk_index=0, content=b"$ "))
        settle(manager, settings)
    with psycopg.connect(database_url, autocommit=True) as conn:
        report = run_cleanup(conn, older_than=30 * DAY, tombstone_retention=30 * DAY)
    assert [s["id"] for s in report.sessions] == [str(idle.id)]
    assert pg.execute("SELECT title FROM panes WHERE id = %s", (busy_pane.id,)).fetchone() == (
        "still typing",
    )
    assert pg.execute("SELECT count(*) FROM sessions WHERE id = %s", (busy.id,)).fetchone() == (1,)


def test_closing_a_pane_is_activity_and_the_listing_shows_when(
    settings: Settings, pg: psycopg.Connection[Any], database_url: str
) -> None:
    # the only write in 40 days under this session is the terminal closing a pane
    closing, idle = (
        session("closing", last_active=now(-40 * DAY)),
        session("idle", last_active=now(-40 * DAY)),
    )
    closing_tab = tab(closing.id)
    closed = pane(closing_tab.id, 1)
    with PersistenceManager(settings=settings) as manager:
        for s in (closing, idle):
            manager.create_session(s)
        manager.create_tab(closing_tab)
        manager.create_pane(closed)
        settle(manager, settings)
        age_sessions(pg, [closing.id, idle.id], 40 * DAY)
        manager.delete_pane(closed.id)
        settle(manager, settings)
    with psycopg.connect(database_url, autocommit=True) as conn:
        plan = run_cleanup(conn, older_than=30 * DAY, tombstone_retention=30 * DAY, dry_run=True)
        report = run_cleanup(conn, older_than=30 * DAY, tombstone_retention=30 * DAY)
    assert [s["id"] for s in plan.sessions] == [s["id"] for s in report.sessions] == [str(idle.id)]
    # the listing says when the session was last active: what the cleanup judged by
    listed = report.sessions[0]
    assert str(listed["active_at"])[:10] == str(now(-40 * DAY).date())
    assert pg.execute("SELECT count(*) FROM tabs WHERE session_id = %s", (closing.id,)).fetchone() == (1,)
    # the cleanup's tombstone of the session names the session, as the apply's do
    assert pg.execute(
        "SELECT kind, session_id, tab_id FROM tombstones WHERE id = %s", (idle.id,)
    ).fetchone() == (
        "session",
        idle.id,
        None,
    )


def _apply(conn: psycopg.Connection[Any], *ops: Any) -> None:
    Applier().apply(conn, Batch(id=uuid.uuid4(), origin="p", created_at=datetime.now(UTC), ops=list(ops)))


def test_orphans_stay_while_their_family_is_still_written(
    pg: psycopg.Connection[Any], database_url: str
) -> None:
    # a session row that has not arrived: its tab was written 40 days ago, its panes all along
    waiting, lost = session("waiting"), session("lost")
    waiting_tab, lost_tab = tab(waiting.id), tab(lost.id)
    waiting_pane, lost_pane = pane(waiting_tab.id, 1), pane(lost_tab.id, 1)
    # a stored session whose tab never arrived: the pane was created 40 days ago, its scrollback
    # is appended all along
    live = session("live")
    scrolling = pane(uuid.uuid4(), 2)
    _apply(
        pg,
        SessionUpsert(version=1, record=live),
        TabUpsert(version=1, record=waiting_tab),
        TabUpsert(version=1, record=lost_tab),
        PaneUpsert(version=1, session_id=lost.id, record=lost_pane),
        PaneUpsert(version=1, session_id=live.id, record=scrolling),
    )
    for table, column in (("tabs", "updated_at"), ("panes", "updated_at")):
        pg.execute(f"UPDATE {table} SET {column} = now() - interval '40 days'")
    _apply(
        pg,
        PaneUpsert(version=2, session_id=waiting.id, record=waiting_pane),
        HistoryAppend(
            version=2, pane_id=scrolling.id, tab_id=scrolling.tab_id, session_id=live.id, chunk_index=0,
            raw_size=2, content=base64.b64encode(b"$ "),
        ),
    )  # fmt: skip
    with psycopg.connect(database_url, autocommit=True) as conn:
        plan = run_cleanup(conn, older_than=30 * DAY, tombstone_retention=30 * DAY, dry_run=True)
        report = run_cleanup(conn, older_than=30 * DAY, tombstone_retention=30 * DAY)
    counts = (report.orphan_tabs, report.orphan_panes, report.orphan_history_chunks)
    assert counts == (plan.orphan_tabs, plan.orphan_panes, plan.orphan_history_chunks) == (1, 1, 0)
    assert {r[0] for r in pg.execute("SELECT id FROM tabs")} == {waiting_tab.id}
    assert {r[0] for r in pg.execute("SELECT id FROM panes")} == {waiting_pane.id, scrolling.id}
    assert pg.execute("SELECT count(*) FROM pane_history").fetchone() == (1,)
    assert report.sessions == []
