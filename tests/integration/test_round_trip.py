"""A full round trip on real Redis and PostgreSQL: producer, burst worker, every restore."""

from __future__ import annotations

import socket
import uuid
from typing import Any

import psycopg
import pytest

from perth_pipeline import NotFound, PaneHistoryChunk, PersistenceManager, TemplateRecord
from perth_pipeline.settings import Settings

from ..helpers import now, pane, run_cli, session, settle, tab


@pytest.fixture
def stored(settings: Settings) -> dict[str, Any]:
    """A session with 2 tabs and 3 panes, scrollback and a template, written and committed."""
    s = session("work", template_name="dev")
    t0, t1 = tab(s.id, 0, name="editor"), tab(s.id, 1, name="logs", layout_blob={"direction": "horizontal"})
    panes = [
        pane(t0.id, 1, title="vim", cwd="/src", command="vim ."),
        pane(t0.id, 2, pane_type="bloodbank-feed", component_state={"channel": "ci", "unread": 3}),
        pane(t1.id, 1, cwd=None, title="tail"),
    ]
    template = TemplateRecord(id=uuid.uuid4(), name="dev", definition={"tabs": [{"name": "editor"}]})
    history = [b"$ make\n" * 50, b"", bytes(range(256)) * 8]
    with PersistenceManager(settings=settings) as manager:
        manager.save_template(template)
        manager.create_session(s)
        for t in (t1, t0):
            manager.create_tab(t)
        for p in panes:
            manager.create_pane(p)
        for i, content in enumerate(history):
            manager.append_pane_history(PaneHistoryChunk(pane_id=panes[0].id, chunk_index=i, content=content))
        settle(manager, settings)
    return {"session": s, "tabs": [t0, t1], "panes": panes, "template": template, "history": history}


def test_every_restore_gives_back_what_was_written(settings: Settings, stored: dict[str, Any]) -> None:
    s, (t0, t1), panes = stored["session"], stored["tabs"], stored["panes"]
    with PersistenceManager(settings=settings) as manager:
        assert manager.restore_session(s.id) == s
        assert manager.restore_tabs(s.id) == [t0, t1]
        assert manager.restore_panes(t0.id) == sorted(panes[:2], key=lambda p: p.pane_id)
        assert manager.restore_panes(t1.id) == [panes[2]]
        assert manager.restore_pane_history(panes[0].id) == b"".join(stored["history"])
        assert manager.restore_pane_history(panes[2].id) == b""
        assert [x.id for x in manager.list_sessions()] == [s.id]
        assert manager.get_template("dev") == stored["template"]
        assert manager.list_templates() == [stored["template"]]
        with pytest.raises(NotFound):
            manager.restore_session(uuid.uuid4())


def test_the_whole_session_read_at_once_is_what_the_reads_one_by_one_give(
    settings: Settings, stored: dict[str, Any]
) -> None:
    s, (t0, t1), panes = stored["session"], stored["tabs"], stored["panes"]
    # a pane of the session applied before its tab (another worker holds the tab's batch)
    orphan, missing_tab = uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(settings.database_url or "", autocommit=True) as conn:
        conn.execute(
            "INSERT INTO panes (id, tab_id, pane_id, pane_type, session_id)"
            " VALUES (%s, %s, 'terminal_9', 'terminal', %s)",
            (orphan, missing_tab, s.id),
        )
        conn.execute(
            "INSERT INTO pane_history (pane_id, chunk_index, content, tab_id, session_id)"
            " VALUES (%s, 0, 'x', %s, %s)",
            (orphan, missing_tab, s.id),
        )
    with PersistenceManager(settings=settings) as manager:
        tree = manager.restore_session_tree(s.id)
        assert tree.session == manager.restore_session(s.id) == s
        assert tree.tabs == manager.restore_tabs(s.id) == [t0, t1]
        assert tree.panes == {t0.id: manager.restore_panes(t0.id), t1.id: manager.restore_panes(t1.id)}
        assert tree.panes[t0.id] == sorted(panes[:2], key=lambda p: p.pane_id)
        assert tree.history == {panes[0].id: b"".join(stored["history"])}  # panes with none: absent
        assert missing_tab not in tree.panes and orphan not in tree.history
        without = manager.restore_session_tree(s.id, with_history=False)
        assert without.history == {} and without.panes == tree.panes
        with pytest.raises(NotFound):
            manager.restore_session_tree(uuid.uuid4())
        manager.delete_session(s.id)
        settle(manager, settings)
        with pytest.raises(NotFound):
            manager.restore_session_tree(s.id)


def test_deletes_remove_rows_and_their_descendants(settings: Settings, stored: dict[str, Any]) -> None:
    s, (t0, t1), panes = stored["session"], stored["tabs"], stored["panes"]
    with PersistenceManager(settings=settings) as manager:
        manager.delete_pane(panes[1].id)
        manager.delete_tab(t1.id)
        manager.delete_template("dev")
        settle(manager, settings)
        assert manager.restore_tabs(s.id) == [t0]
        assert manager.restore_panes(t0.id) == [panes[0]]
        assert manager.restore_panes(t1.id) == []
        with pytest.raises(NotFound):
            manager.get_template("dev")
        manager.delete_session(s.id)
        settle(manager, settings)
        with pytest.raises(NotFound):
            manager.restore_session(s.id)
        assert manager.restore_tabs(s.id) == []
        assert manager.restore_pane_history(panes[0].id) == b""


def test_upstream_restore_queries_see_exactly_the_live_rows(
    settings: Settings, stored: dict[str, Any], pg: psycopg.Connection[Any]
) -> None:
    s, (t0, t1), panes = stored["session"], stored["tabs"], stored["panes"]
    gone = session("gone")
    with PersistenceManager(settings=settings) as manager:
        manager.create_session(gone)
        manager.create_tab(tab(gone.id))
        manager.delete_pane(panes[1].id)
        manager.delete_tab(t1.id)
        manager.delete_session(gone.id)
        settle(manager, settings)
    # the queries of the Rust Perth, unchanged
    sessions = pg.execute("SELECT id, name, template_name, created_at, last_active FROM sessions").fetchall()
    assert sessions == [(s.id, s.name, s.template_name, s.created_at, s.last_active)]
    tabs = pg.execute(
        "SELECT id, session_id, position, name, layout_blob, created_at, updated_at FROM tabs "
        "WHERE session_id = %s ORDER BY position",
        (s.id,),
    ).fetchall()
    assert [(r[0], r[2], r[3], r[4]) for r in tabs] == [(t0.id, 0, t0.name, t0.layout_blob)]
    assert all(r[5] is not None and r[6] >= r[5] for r in tabs)
    rows = pg.execute(
        "SELECT id, tab_id, pane_id, pane_type, component_state, title, cwd, command, created_at, updated_at "
        "FROM panes WHERE tab_id = %s ORDER BY pane_id",
        (t0.id,),
    ).fetchall()
    assert [r[0] for r in rows] == [panes[0].id]
    assert pg.execute("SELECT count(*) FROM tabs").fetchone() == (1,)
    assert pg.execute("SELECT count(*) FROM panes").fetchone() == (1,)
    # deleted rows left the main tables; their tombstones are in a table of their own
    kinds = sorted(r[0] for r in pg.execute("SELECT kind FROM tombstones").fetchall())
    assert kinds == ["pane", "session", "tab"]


def test_restore_command_prints_the_session_as_json(settings: Settings, stored: dict[str, Any]) -> None:
    import json

    s, (t0, t1), panes = stored["session"], stored["tabs"], stored["panes"]
    result = run_cli(settings, "restore", str(s.id))
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["session"]["id"] == str(s.id)
    assert [t["id"] for t in document["tabs"]] == [str(t0.id), str(t1.id)]
    assert [p["id"] for p in document["tabs"][0]["panes"]] == [
        str(p.id) for p in sorted(panes[:2], key=lambda p: p.pane_id)
    ]
    assert document["tabs"][0]["panes"][1]["component_state"] == {"channel": "ci", "unread": 3}
    same = run_cli(settings, "--restore-from-db", str(s.id))
    assert same.returncode == 0, same.stderr
    assert json.loads(same.stdout) == document


def test_restore_command_reads_what_is_no_id_as_a_name_and_says_so_in_one_line(settings: Settings) -> None:
    result = run_cli(settings, "restore", "not-a-uuid")
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert "no stored session is named 'not-a-uuid'" in result.stderr and "Traceback" not in result.stderr


def test_restore_command_reports_a_missing_session(settings: Settings) -> None:
    result = run_cli(settings, "restore", str(uuid.uuid4()))
    assert result.returncode == 1
    assert "not stored" in result.stderr and "Traceback" not in result.stderr


def test_restore_command_reports_an_unreachable_database(settings: Settings) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    result = run_cli(
        settings,
        "restore",
        str(uuid.uuid4()),
        "--wait",
        "0",
        env={"DATABASE_URL": f"postgresql://perth:s3cret@127.0.0.1:{port}/perth"},
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "PostgreSQL unavailable" in result.stderr
    assert "s3cret" not in result.stderr


def test_init_db_is_idempotent_and_records_the_schema_version(
    settings: Settings, pg: psycopg.Connection[Any]
) -> None:
    for _ in range(2):
        result = run_cli(settings, "init-db")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "schema version 2"
    assert pg.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall() == [(1,), (2,)]


def test_last_active_of_a_stored_session_is_touched_after_a_restart(settings: Settings) -> None:
    s = session("restarted", last_active=now(-3600))
    with PersistenceManager(settings=settings) as first:
        first.create_session(s)
        settle(first, settings)
    with PersistenceManager(settings=settings) as second:  # a new terminal process: holds nothing
        second.touch_session(s.id)
        settle(second, settings)
        restored = second.restore_session(s.id)
    assert restored.last_active > s.last_active
    assert restored.name == s.name
