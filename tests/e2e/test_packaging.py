"""What a non-editable install carries: schema, SQL, Procfile, the Lua script; only our two packages."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_the_wheel_carries_schema_sql_and_every_file_the_commands_read(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = tmp_path.glob("perth_pipeline-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        # schema.sql lives at the repository root: it is force-included into the package
        assert archive.read("perth_pipeline/schema.sql") == (ROOT / "schema.sql").read_bytes()
        assert archive.read("perth_pipeline/Procfile") == (ROOT / "Procfile").read_bytes()
        # the enqueue script that producers in other languages run (docs/protocol.md)
        lua = ROOT / "perth_pipeline" / "lua" / "enqueue.lua"
        assert archive.read("perth_pipeline/lua/enqueue.lua") == lua.read_bytes()
    for sql in (ROOT / "perth_pipeline" / "sql").glob("*.sql"):
        assert f"perth_pipeline/sql/{sql.name}" in names
    assert "perth_pipeline/batch.schema.json" in names
    assert "perth_pipeline/py.typed" in names and "workers/py.typed" in names
    assert "perth_pipeline/bench/harness.py" in names and "perth_pipeline/bench/bench.sql" in names
    # two packages and nothing else: no generic top-level name (a "benchmarks" package) in site-packages
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"perth_pipeline", "workers"}, top
