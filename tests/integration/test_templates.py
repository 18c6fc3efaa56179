"""Templates: CRUD through the API and through `perth-pipeline templates` (a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from perth_pipeline import InvalidRecord, NotFound, PersistenceManager, TemplateRecord
from perth_pipeline.settings import Settings

from ..helpers import cli_env, drain, require_module, run_cli, settle

kdl = require_module("kdl")


def cli(settings: Settings, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the command with no worker: whatever it enqueues stays queued."""
    return run_cli(settings, "templates", *args, stdin=stdin)


def cli_applied(
    settings: Settings, *args: str, stdin: str | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run the command while burst workers apply what it enqueues (as a running worker would)."""
    with tempfile.TemporaryFile("w+") as given:
        given.write(stdin or "")
        given.seek(0)
        proc = subprocess.Popen(
            [sys.executable, "-m", "perth_pipeline.cli", "templates", *args],
            env=cli_env(settings),
            stdin=given,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            drain(settings)
            if time.monotonic() > deadline:
                proc.kill()
                proc.communicate()
                raise AssertionError(f"`templates {' '.join(args)}` did not finish within {timeout}s")
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_templates_crud_through_the_api(settings: Settings) -> None:
    dev = TemplateRecord(id=uuid.uuid4(), name="dev", definition={"tabs": [{"name": "editor"}]})
    ops = TemplateRecord(id=uuid.uuid4(), name="ops", definition={"tabs": [{"name": "logs"}, {"name": "db"}]})
    with PersistenceManager(settings=settings) as manager:
        manager.save_template(ops)
        manager.save_template(dev)
        settle(manager, settings)
        assert manager.get_template("dev") == dev
        assert manager.list_templates() == [dev, ops]  # by name

        # saving an existing name replaces it
        dev2 = dev.model_copy(update={"definition": {"tabs": [{"name": "editor"}, {"name": "tests"}]}})
        manager.save_template(dev2)
        settle(manager, settings)
        assert manager.get_template("dev") == dev2

        manager.delete_template("dev")
        settle(manager, settings)
        with pytest.raises(NotFound):
            manager.get_template("dev")
        assert manager.list_templates() == [ops]

        # a later save brings the name back (newer than its tombstone)
        manager.save_template(dev)
        settle(manager, settings)
        assert manager.get_template("dev") == dev

        with pytest.raises(InvalidRecord) as info:
            manager.delete_template("")
        assert info.value.field == "name"
        too_big = TemplateRecord(
            id=uuid.uuid4(), name="big", definition={"blob": "x" * (settings.max_json_bytes + 1)}
        )
        with pytest.raises(InvalidRecord) as info:
            manager.save_template(too_big)
        assert info.value.field == "definition"


LAYOUT = """
layout {
    tab name="editor" {
        pane split_direction="vertical" {
            pane size="60%" command="nvim"
            pane
        }
    }
    tab name="logs" {
        pane command="tail" {
            args "-f" "/var/log/syslog"
        }
    }
}
"""


def test_templates_crud_through_the_command_line(settings: Settings, tmp_path: Path) -> None:
    as_json = tmp_path / "dev.json"
    as_json.write_text(json.dumps({"tabs": [{"name": "main", "panes": [{"command": "htop"}]}]}))
    as_kdl = tmp_path / "ops.kdl"
    as_kdl.write_text(LAYOUT)

    saved = cli_applied(settings, "save", "dev", str(as_json))
    assert saved.returncode == 0, saved.stderr
    assert saved.stdout.strip() == "saved template dev"
    saved = cli_applied(settings, "save", "ops", str(as_kdl))
    assert saved.returncode == 0, saved.stderr

    listed = cli(settings, "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines() == ["dev  (1 tab)", "ops  (2 tabs)"]

    shown = cli(settings, "show", "ops")
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert record["name"] == "ops"
    editor, logs = record["definition"]["tabs"]
    assert editor["panes"][0]["panes"] == [{"size": "60%", "command": "nvim"}, {}]
    assert logs["panes"] == [{"command": "tail", "args": ["-f", "/var/log/syslog"]}]

    as_layout = cli(settings, "show", "ops", "--format", "kdl")
    assert as_layout.returncode == 0, as_layout.stderr
    (layout,) = kdl.parse(as_layout.stdout).nodes
    assert [dict(t.props) for t in layout.nodes] == [{"name": "editor"}, {"name": "logs"}]

    # saving again replaces the definition and keeps the template's id
    replaced = cli_applied(settings, "save", "ops", "-", "--format", "json", stdin='{"tabs": []}')
    assert replaced.returncode == 0, replaced.stderr
    again = json.loads(cli(settings, "show", "ops").stdout)
    assert (again["id"], again["definition"]) == (record["id"], {"tabs": []})

    deleted = cli_applied(settings, "delete", "dev")
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.strip() == "deleted template dev"
    missing = cli(settings, "show", "dev")
    assert missing.returncode == 1
    assert "not stored" in missing.stderr and "Traceback" not in missing.stderr
    assert cli(settings, "delete", "dev").returncode == 1
    assert [t["name"] for t in json.loads(cli(settings, "list", "--json").stdout)] == ["ops"]


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        ("layout { pane size= }", "bad.kdl", "not a KDL document"),
        ("[1, 2]", "list.json", "a JSON object"),
        ("{not json", "broken.json", "not JSON"),
        ("pane", "nolayout.kdl", "top-level `layout"),
        (None, "absent.json", "cannot read"),
    ],
)
def test_save_refuses_a_file_that_is_no_layout_with_one_line(
    settings: Settings, tmp_path: Path, content: str | None, name: str, message: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    result = cli(settings, "save", "x", str(path))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_save_without_a_worker_says_so_and_is_applied_when_one_runs(
    settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "later.json"
    path.write_text('{"tabs": [{"name": "later"}]}')
    result = cli(settings, "save", "later", str(path), "--wait", "0.5")
    assert result.returncode == 1
    assert "queued but was not applied" in result.stderr and "worker" in result.stderr
    assert drain(settings)
    with PersistenceManager(settings=settings, start=False) as manager:
        assert manager.get_template("later").definition == {"tabs": [{"name": "later"}]}


def test_jsonb_columns_use_lz4_where_the_server_has_it(
    settings: Settings, pg: psycopg.Connection[Any]
) -> None:
    try:
        with pg.transaction():
            pg.execute("CREATE TEMP TABLE lz4_probe (j jsonb COMPRESSION lz4)")
        supported = True
    except psycopg.Error:  # PostgreSQL < 14, or built without lz4: the schema falls back silently
        supported = False
    rows = pg.execute(
        "SELECT attrelid::regclass::text || '.' || attname, attcompression::text FROM pg_attribute "
        "WHERE (attrelid, attname) IN "
        "(('tabs'::regclass, 'layout_blob'), ('panes'::regclass, 'component_state'), "
        "('templates'::regclass, 'definition'))"
    ).fetchall()
    expected = "l" if supported else ""
    assert dict(rows) == {
        "tabs.layout_blob": expected,
        "panes.component_state": expected,
        "templates.definition": expected,
    }
    if not supported:
        return
    # and a large definition written through the pipeline is stored compressed with it
    tabs = [
        {"name": f"tab {i}", "panes": [{"command": "htop", "cwd": "/home/perth/src"}]} for i in range(2000)
    ]
    with PersistenceManager(settings=settings) as manager:
        manager.save_template(TemplateRecord(id=uuid.uuid4(), name="big", definition={"tabs": tabs}))
        settle(manager, settings)
    stored = pg.execute(
        "SELECT pg_column_compression(definition) FROM templates WHERE name = 'big'"
    ).fetchone()
    assert stored == ("lz4",)


@pytest.mark.parametrize("args", [["delete", "nosuch"], ["show", "nosuch"]])
def test_a_missing_template_is_one_line_with_no_false_warning(settings: Settings, args: list[str]) -> None:
    result = cli(settings, *args)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == "error: template 'nosuch' is not stored (or was deleted)"
    assert "flusher" not in result.stderr and "WARNING" not in result.stderr
