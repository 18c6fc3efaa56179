"""`perth-pipeline env` with URLs in the environment: printed as they are, quoted for `eval`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# a password with what a shell would otherwise expand, split or end a quote on
REDIS = "redis://:pa$s w'rd&`x`@127.0.0.1:6379/0?ssl_cert_reqs=none&x=1"
DATABASE = "postgresql://perth:s3cr*t;$(id)@db.example:5432/perth?sslmode=require"


def _env(tmp_path: Path, **values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "PERTH_QUEUE")}
    env["PERTH_DATA_DIR"] = str(tmp_path / "data")
    env.update(values)
    return env


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "perth_pipeline.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_env_prints_the_environments_urls_quoted_for_eval_and_nothing_else(tmp_path: Path) -> None:
    result = _cli(_env(tmp_path, REDIS_URL=REDIS, DATABASE_URL=DATABASE, PERTH_QUEUE="perth-a"), "env")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("export REDIS_URL=") and result.stdout.count("\n") == 1
    assert result.stderr == ""  # the URLs go to stdout only: never a log line
    script = 'eval "$1" && printf "%s\\n" "$REDIS_URL" "$DATABASE_URL" "$PERTH_QUEUE"'
    shown = subprocess.run(
        ["sh", "-c", script, "sh", result.stdout], capture_output=True, text=True, timeout=10, check=True
    )
    assert shown.stdout.splitlines() == [REDIS, DATABASE, "perth-a"]
    assert not (tmp_path / "data").exists(), "env started something"


def test_env_without_a_running_stack_says_so_in_one_line_and_starts_nothing(tmp_path: Path) -> None:
    result = _cli(_env(tmp_path), "env")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.count("\n") == 1, result.stderr
    assert "no embedded stack is running" in result.stderr and "perth-pipeline up" in result.stderr
    assert not (tmp_path / "data" / "redis").exists() and not (tmp_path / "data" / "postgres").exists()


def test_env_with_one_url_of_two_says_both_are_needed(tmp_path: Path) -> None:
    result = _cli(_env(tmp_path, REDIS_URL="redis://127.0.0.1:6379/0"), "env")
    assert (result.returncode, result.stdout) == (1, "")
    assert "set both REDIS_URL and DATABASE_URL" in result.stderr
