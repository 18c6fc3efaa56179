"""`perth-pipeline restore` and `sessions`: by id, name or id prefix; the list; delete; history files."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest

from perth_pipeline import PaneHistoryChunk, PersistenceManager, SessionRecord
from perth_pipeline.settings import Settings

from ..helpers import cli_env, drain, now, pane, run_cli, session, settle, tab, wait_for


def _store(settings: Settings, *sessions: tuple[SessionRecord, int, int]) -> None:
    """Each (session, tabs, panes per tab), written and committed."""
    with PersistenceManager(settings=settings) as manager:
        for s, tabs, panes in sessions:
            manager.create_session(s)
            for position in range(tabs):
                t = tab(s.id, position)
                manager.create_tab(t)
                for n in range(panes):
                    manager.create_pane(pane(t.id, n))
        settle(manager, settings)


@pytest.fixture
def three(settings: Settings) -> dict[str, SessionRecord]:
    """work (2 tabs of 2 panes), and two sessions both named demo-0 whose ids start alike."""
    work = session("work", last_active=now(-60))
    # ids sharing their first 8 characters (and nothing else stored can start so)
    demo_a = session("demo-0", id=uuid.UUID("7f0c2d3e-0000-4000-8000-00000000000a"), last_active=now(-120))
    demo_b = session("demo-0", id=uuid.UUID("7f0c2d3e-0000-4000-8000-00000000000b"), last_active=now(-180))
    _store(settings, (work, 2, 2), (demo_a, 1, 1), (demo_b, 0, 0))
    return {"work": work, "demo_a": demo_a, "demo_b": demo_b}


def test_restore_show_and_restore_from_db_take_a_name_or_an_id_prefix(
    settings: Settings, three: dict[str, SessionRecord]
) -> None:
    work = three["work"]
    by_id = run_cli(settings, "restore", str(work.id))
    assert by_id.returncode == 0, by_id.stderr
    for args in (
        ["restore", "work"],
        ["restore", str(work.id)[:8]],
        ["restore", str(work.id)[:6].upper()],
        ["--restore-from-db", "work"],
        ["sessions", "show", "work", "--json"],
    ):
        result = run_cli(settings, *args)
        assert result.returncode == 0, (args, result.stderr)
        assert json.loads(result.stdout) == json.loads(by_id.stdout), args
    shown = run_cli(settings, "sessions", "show", str(work.id)[:8])
    assert shown.returncode == 0, shown.stderr
    assert f"session work  {work.id}" in shown.stdout
    assert "2 tabs, 4 panes" in shown.stdout and "terminal_1" in shown.stdout


def test_an_ambiguous_name_exits_2_listing_the_candidates(
    settings: Settings, three: dict[str, SessionRecord]
) -> None:
    for args in (
        ["restore", "demo-0"],
        ["sessions", "show", "demo-0"],
        ["sessions", "delete", "demo-0", "--yes"],
    ):
        result = run_cli(settings, *args, env={"TZ": "UTC"})
        assert result.returncode == 2, (args, result.stderr)
        assert "matches more than one session" in result.stderr
        for s in (three["demo_a"], three["demo_b"]):
            assert f"{s.id}  demo-0  last active {s.last_active:%Y-%m-%d %H:%M} UTC" in result.stderr
        assert str(three["work"].id) not in result.stderr
        assert "Traceback" not in result.stderr
    # an id prefix both share is ambiguous; one character more is not
    if not str(three["work"].id).startswith("7f0c2d"):
        prefix = run_cli(settings, "restore", "7F0C2D3E")
        assert prefix.returncode == 2 and "matches more than one session" in prefix.stderr
        one = run_cli(settings, "restore", "7f0c2d3e-0000-4000-8000-00000000000b"[:-1] + "a")
        assert one.returncode == 0 and json.loads(one.stdout)["session"]["id"].endswith("0a")
        shorter = run_cli(settings, "restore", "7f0c2d3e-0000-4000-8000-00000000000")
        assert shorter.returncode == 2


def test_a_name_or_prefix_that_matches_nothing_is_one_line_and_exit_1(
    settings: Settings, three: dict[str, SessionRecord]
) -> None:
    for args in (
        ["restore", "nosuch"],
        ["sessions", "show", "nosuch"],
        ["sessions", "delete", "nosuch", "--yes"],
    ):
        result = run_cli(settings, *args)
        assert result.returncode == 1, (args, result.stderr)
        assert result.stderr.strip().count("\n") == 0, result.stderr
        assert "no stored session is named 'nosuch'" in result.stderr
    missing = run_cli(settings, "restore", str(uuid.uuid4()))
    assert missing.returncode == 1 and "not stored" in missing.stderr


def test_sessions_lists_with_a_header_counts_and_local_times_with_zone(
    settings: Settings, three: dict[str, SessionRecord]
) -> None:
    result = run_cli(settings, "sessions", env={"TZ": "Europe/Paris"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ID", "LAST", "ACTIVE", "TABS", "PANES", "NAME"]
    assert len(lines) == 4  # most recently active first
    paris = ZoneInfo("Europe/Paris")
    for line, key, tabs, panes in zip(
        lines[1:], ["work", "demo_a", "demo_b"], [2, 1, 0], [4, 1, 0], strict=True
    ):
        s = three[key]
        when = s.last_active.astimezone(paris).strftime("%Y-%m-%d %H:%M %Z")
        assert line.split() == [str(s.id), *when.split(), str(tabs), str(panes), s.name], line
        assert line.count(s.name) == 1
    same = run_cli(settings, "sessions", "list", env={"TZ": "Europe/Paris"})
    assert same.stdout == result.stdout


def test_sessions_json_keeps_utc_and_has_help(settings: Settings, three: dict[str, SessionRecord]) -> None:
    result = run_cli(settings, "sessions", "--json", env={"TZ": "Asia/Kolkata"})
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == ["work", "demo-0", "demo-0"]
    assert (rows[0]["tabs"], rows[0]["panes"]) == (2, 4)
    for row, key in zip(rows, ["work", "demo_a", "demo_b"], strict=True):
        when = datetime.fromisoformat(row["last_active"].replace("Z", "+00:00"))
        assert when.utcoffset() is not None and when.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
        assert when == three[key].last_active.astimezone(UTC)
    helped = run_cli(settings, "sessions", "--help")
    text = " ".join(helped.stdout.split())
    assert "--json Print JSON" in text and "ISO-8601 UTC" in text


def test_no_stored_sessions_is_said(settings: Settings) -> None:
    result = run_cli(settings, "sessions")
    assert result.returncode == 0 and result.stdout.strip() == "no stored sessions"


def test_sessions_delete_asks_for_yes_off_a_terminal_then_deletes_now(
    settings: Settings, three: dict[str, SessionRecord], pg: psycopg.Connection[Any]
) -> None:
    work = three["work"]
    refused = run_cli(settings, "sessions", "delete", "work")  # stdin is not a terminal
    assert refused.returncode == 2
    assert "--yes" in refused.stderr and refused.stderr.strip().count("\n") == 0
    assert pg.execute("SELECT count(*) FROM sessions WHERE id = %s", (work.id,)).fetchone() == (1,)

    # no worker runs: the delete does not need one
    done = run_cli(settings, "sessions", "delete", str(work.id)[:8], "--yes")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"deleted session work ({work.id}")
    assert "2 tabs, 4 panes, 0 scrollback chunks" in done.stdout
    assert pg.execute("SELECT count(*) FROM sessions WHERE id = %s", (work.id,)).fetchone() == (0,)
    assert pg.execute("SELECT count(*) FROM tabs WHERE session_id = %s", (work.id,)).fetchone() == (0,)
    assert pg.execute("SELECT count(*) FROM panes WHERE session_id = %s", (work.id,)).fetchone() == (0,)
    assert pg.execute("SELECT kind FROM tombstones WHERE id = %s", (work.id,)).fetchone() == ("session",)
    assert run_cli(settings, "restore", "work").returncode == 1
    # the others are untouched
    assert pg.execute("SELECT count(*) FROM sessions").fetchone() == (2,)


def test_a_write_queued_before_the_delete_stays_deleted_and_a_later_one_brings_it_back(
    settings: Settings, pg: psycopg.Connection[Any]
) -> None:
    s = session("doomed")
    t = tab(s.id, 0)
    with PersistenceManager(settings=settings) as manager:
        manager.create_session(s)
        manager.create_tab(t)
        settle(manager, settings)
        sent = manager.stats()["enqueued_jobs"]
        manager.update_tab(t.model_copy(update={"name": "renamed"}))
        wait_for(lambda: manager.stats()["enqueued_jobs"] > sent, what="the update queued")
        assert run_cli(settings, "sessions", "delete", "doomed", "--yes").returncode == 0
        drain(settings)  # the worker applies the update made before the delete: it stays dead
        assert pg.execute("SELECT count(*) FROM tabs WHERE id = %s", (t.id,)).fetchone() == (0,)
        assert pg.execute("SELECT count(*) FROM sessions WHERE id = %s", (s.id,)).fetchone() == (0,)
        # the terminal still holding the session stores it again with its next write
        manager.update_session(s.model_copy(update={"last_active": now()}))
        settle(manager, settings)
    assert pg.execute("SELECT name FROM sessions WHERE id = %s", (s.id,)).fetchone() == ("doomed",)


def test_history_files_are_named_by_tab_position_and_pane_id(settings: Settings, tmp_path: Path) -> None:
    s = session("hist")
    t0, t1 = tab(s.id, 0), tab(s.id, 3)
    panes = [
        pane(t0.id, 0, pane_id="terminal_1"),
        pane(t0.id, 1, pane_id="terminal_1"),  # the same pane_id twice in one tab
        pane(t1.id, 0, pane_id="../../etc/passwd"),
        pane(t1.id, 1, pane_id="TERMINAL_1"),
    ]
    with PersistenceManager(settings=settings) as manager:
        manager.create_session(s)
        manager.create_tab(t0)
        manager.create_tab(t1)
        for n, p in enumerate(panes):
            manager.create_pane(p)
            manager.append_pane_history(PaneHistoryChunk(pane_id=p.id, chunk_index=0, content=b"x" * (n + 1)))
        settle(manager, settings)
    out = tmp_path / "history"
    result = run_cli(settings, "restore", "hist", "--with-history", str(out))
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "tab-0-terminal_1-2.log",
        "tab-0-terminal_1.log",
        "tab-3-TERMINAL_1.log",
        "tab-3-etc_passwd.log",
    ]
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == names  # nothing outside DIR
    document = json.loads(result.stdout)
    by_id = {p["id"]: p for t in document["tabs"] for p in t["panes"]}
    for n, p in enumerate(panes):
        written = Path(by_id[str(p.id)]["history_file"])
        assert written.parent == out
        assert written.read_bytes() == b"x" * (n + 1)


@pytest.mark.parametrize(("answer", "deleted"), [("n", False), ("y", True)])
def test_sessions_delete_on_a_terminal_asks_first(
    settings: Settings, pg: psycopg.Connection[Any], answer: str, deleted: bool
) -> None:
    s = session("asked")
    _store(settings, (s, 1, 1))
    leader, follower = pty.openpty()
    try:
        os.write(leader, f"{answer}\n".encode())
        result = subprocess.run(
            [sys.executable, "-m", "perth_pipeline.cli", "sessions", "delete", "asked"],
            env=cli_env(settings),
            stdin=follower,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(follower)
        os.close(leader)
    assert f"Delete session asked ({s.id}" in result.stdout, result.stdout
    assert result.returncode == (0 if deleted else 1), result.stderr
    stored = pg.execute("SELECT count(*) FROM sessions WHERE id = %s", (s.id,)).fetchone()
    assert stored == ((0,) if deleted else (1,))
    if not deleted:
        assert result.stderr.strip() == "error: nothing deleted"
