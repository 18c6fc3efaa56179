"""Hostile or mistaken command-line input: one clear line and an exit code, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from perth_pipeline.settings import Settings

from ..helpers import run_cli


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--log-level", "bogus", "sessions"], "--log-level"),
        (["status", "--watch", "-1"], "--watch"),
        (["status", "--watch", "0"], "--watch"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(settings: Settings, args: list[str], names: str) -> None:
    result = run_cli(settings, *args)
    assert result.returncode == 2, result.stderr
    assert names in result.stderr and "Traceback" not in result.stderr


def test_a_template_file_nested_too_deeply_is_refused_in_one_line(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text('{"a":' * 100_000 + "1" + "}" * 100_000)
    result = run_cli(settings, "templates", "save", "deep", str(path))
    assert result.returncode in (1, 2), result.stderr
    assert "Traceback" not in result.stderr and "RecursionError" not in result.stderr
    assert "nested too deeply" in result.stderr
