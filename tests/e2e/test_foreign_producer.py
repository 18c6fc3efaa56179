"""A producer in another language (examples/node-producer) writes through docs/protocol.md alone.

It runs against the real Redis on a queue of the test's own and enqueues with EVALSHA of the shipped
script; a burst worker applies its batches; ``perth-pipeline restore --format json`` gives back what
it wrote, field by field. Mixed with the Python producer on one session, the highest version wins
whichever clock made it and in whichever order the batches are applied; a batch that breaks the
contract is refused with a reason naming the field, and what it refuses leaves no row.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest
import redis
from rq.registry import FailedJobRegistry, FinishedJobRegistry

from perth_pipeline import PersistenceManager
from perth_pipeline.broker import Keys
from perth_pipeline.settings import Settings
from perth_pipeline.wire import refusal

from ..helpers import drain, require, run_cli, settle

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "node-producer"
SCRIPT = str(resources.files("perth_pipeline").joinpath("lua/enqueue.lua"))


@pytest.fixture(scope="session")
def node_producer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example installed with ``npm ci`` once per test session, in a directory of its own."""
    node, npm = shutil.which("node"), shutil.which("npm")
    require(node is not None and npm is not None, "needs node and npm (Node 20) for the Node producer")
    assert npm is not None
    folder = tmp_path_factory.mktemp("node-producer")
    for name in ("package.json", "package-lock.json", "producer.js"):
        shutil.copy(EXAMPLE / name, folder / name)
    installed = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    return folder


def run_node(folder: Path, settings: Settings, *args: str, observe: int | None = None) -> dict[str, Any]:
    """Run the Node producer; what it says it wrote (JSON)."""
    env = {
        **os.environ,
        "REDIS_URL": settings.redis_url or "",
        "PERTH_QUEUE": settings.queue,
        "PERTH_ENQUEUE_LUA": SCRIPT,
    }
    if observe is not None:
        env["PERTH_OBSERVE_VERSION"] = str(observe)
    done = subprocess.run(
        ["node", "producer.js", *args],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    written: dict[str, Any] = json.loads(done.stdout)
    return written


def restore_json(settings: Settings, session_id: str, history: Path) -> dict[str, Any]:
    done = run_cli(settings, "restore", session_id, "--format", "json", "--with-history", str(history))
    assert done.returncode == 0, done.stderr
    document: dict[str, Any] = json.loads(done.stdout)
    return document


def assert_fields(expected: dict[str, Any], actual: dict[str, Any], where: str) -> None:
    """Every field the producer wrote, compared one by one (timestamps as instants)."""
    assert set(actual) == set(expected), f"{where}: fields {sorted(actual)} != {sorted(expected)}"
    for name, wrote in expected.items():
        got, value = actual[name], wrote
        if name in ("created_at", "last_active"):
            value, got = datetime.fromisoformat(wrote), datetime.fromisoformat(got)
        assert got == value, f"{where}.{name}: {got!r} != {value!r}"


def stored_tab(pg: psycopg.Connection[Any], tab_id: str) -> tuple[str, int, str]:
    row = pg.execute("SELECT name, version, origin FROM tabs WHERE id = %s", (tab_id,)).fetchone()
    assert row is not None
    return row[0], row[1], row[2]


def test_a_session_written_in_node_is_restored_field_by_field(
    node_producer: Path, settings: Settings, rconn: redis.Redis, tmp_path: Path
) -> None:
    written = run_node(node_producer, settings, "session")
    assert drain(settings)
    batch_ids = [b["id"] for b in written["batches"]]
    assert set(batch_ids) <= set(FinishedJobRegistry(settings.queue, connection=rconn).get_job_ids())
    assert rconn.zcard(Keys(settings.queue).outstanding(written["session"]["id"])) == 0

    document = restore_json(settings, written["session"]["id"], tmp_path)
    assert_fields(written["session"], document["session"], "session")
    assert [t["id"] for t in document["tabs"]] == [t["id"] for t in written["tabs"]]  # by position
    for tab, got_tab in zip(written["tabs"], document["tabs"], strict=True):
        expected_panes = sorted(tab["panes"], key=lambda p: p["pane_id"])
        got_panes = got_tab["panes"]
        assert_fields({**tab, "panes": None}, {**got_tab, "panes": None}, f"tab {tab['position']}")
        assert len(got_panes) == len(expected_panes)
        for pane, got in zip(expected_panes, got_panes, strict=True):
            history = Path(got["history_file"]).read_bytes()
            assert_fields(pane, {k: v for k, v in got.items() if k != "history_file"}, f"pane {pane['id']}")
            assert history == base64.b64decode(written["history"].get(pane["id"], ""))
    # the update replaced the records whole; the deleted pane is gone
    assert document["tabs"][0]["name"] == "editor" and document["tabs"][0]["panes"][0]["title"] == "vim"
    listed = {p["id"] for t in document["tabs"] for p in t["panes"]}
    assert listed.isdisjoint(written["deleted_panes"]) and len(listed) == 2


def test_python_and_node_on_one_session_the_highest_version_wins(
    node_producer: Path, settings: Settings, pg: psycopg.Connection[Any], tmp_path: Path
) -> None:
    written = run_node(node_producer, settings, "session")
    assert drain(settings)
    session_id, tab_id = written["session"]["id"], written["tabs"][0]["id"]
    _, node_version, node_origin = stored_tab(pg, tab_id)

    # the Python producer restores (its clock observes Node's versions) and writes after Node
    with PersistenceManager(settings=settings) as manager:
        tree = manager.restore_session_tree(UUID(session_id))
        manager.update_tab(tree.tabs[0].model_copy(update={"name": "python"}))
        settle(manager, settings)
        python_origin = manager.origin
    name, python_version, origin = stored_tab(pg, tab_id)
    assert (name, origin) == ("python", python_origin) and python_version > node_version

    # Node writes after Python (having read Python's version back): Node wins
    record = {**tree.tabs[0].model_dump(mode="json"), "name": "node-late"}
    run_node(node_producer, settings, "tab", json.dumps(record), observe=python_version)
    assert drain(settings)
    name, late_version, origin = stored_tab(pg, tab_id)
    assert name == "node-late" and origin.startswith("node-") and origin != node_origin
    assert late_version > python_version

    # an older Python write applied after a newer Node write: it changes nothing
    manager = PersistenceManager(settings=settings, start=False)
    try:
        manager.update_tab(tree.tabs[0].model_copy(update={"name": "python-older"}))  # versioned now
        newest = run_node(node_producer, settings, "tab", json.dumps({**record, "name": "node-newer"}))
        manager.start()  # its batch goes on the queue after Node's
        settle(manager, settings)  # both applied, Python's last, and committed
    finally:
        manager.close(timeout=2)
    name, version, origin = stored_tab(pg, tab_id)
    assert (name, str(version)) == ("node-newer", newest["batches"][0]["versions"][0])
    assert origin == newest["origin"]
    assert restore_json(settings, session_id, tmp_path)["tabs"][0]["name"] == "node-newer"


def test_a_foreign_batch_that_breaks_the_contract_is_refused_naming_the_field(
    node_producer: Path, settings: Settings, rconn: redis.Redis, pg: psycopg.Connection[Any]
) -> None:
    written = run_node(node_producer, settings, "bad")
    drain(settings)
    mixed, unknown_format = (b["id"] for b in written["batches"])
    assert {mixed, unknown_format} <= set(FailedJobRegistry(settings.queue, connection=rconn).get_job_ids())
    reason = refusal(rconn.hget(f"rq:job:{mixed}", "meta")) or ""
    assert "ops[1].tab.upsert.record.position" in reason and "ops[2].pane.upsert.version" in reason
    assert "more than 24 hours ahead" in reason
    assert "negative position" not in reason  # the field is named, its value never shown
    other = refusal(rconn.hget(f"rq:job:{unknown_format}", "meta")) or ""
    assert "batch format 9 is not supported" in other

    def rows(table: str, column: str, value: str) -> int:
        count = pg.execute(f"SELECT count(*) FROM {table} WHERE {column} = %s", (value,)).fetchone()
        assert count is not None
        return int(count[0])

    # each operation is applied whole or not at all: the valid session upsert of the mixed batch
    # is stored (docs/guarantees.md), the refused tab and pane leave no row and no tombstone
    assert rows("sessions", "id", written["session"]["id"]) == 1
    assert rows("tabs", "id", written["tab"]["id"]) == 0
    assert rows("panes", "id", written["pane"]["id"]) == 0
    assert (
        rows("tombstones", "id", written["tab"]["id"]) + rows("tombstones", "id", written["pane"]["id"]) == 0
    )
    # a batch refused whole (its envelope) applies nothing
    assert rows("sessions", "id", written["other_session"]["id"]) == 0
