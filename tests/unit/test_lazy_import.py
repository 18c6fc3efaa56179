"""The package imports its producer on first use: ``perth-pipeline --help`` loads no backend driver.

Each check runs in a fresh interpreter (this one has imported everything long ago) and reports
the top-level packages it loaded; redis-py, RQ and psycopg must not be among them until a
``PersistenceManager`` is asked for.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DRIVERS = {"redis", "rq", "psycopg", "psycopg_pool", "zstandard"}

_REPORT = """
import json, sys
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def loaded_after(body: str) -> tuple[set[str], str]:
    """The top-level packages loaded by ``body``, and what it printed before the report."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(body) + _REPORT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    *output, report = result.stdout.strip().splitlines()
    return set(json.loads(report)), "\n".join(output)


def test_help_imports_neither_redis_nor_psycopg() -> None:
    loaded, output = loaded_after(
        """
        import sys
        from perth_pipeline.cli import main  # what the perth-pipeline console script runs
        sys.argv = ["perth-pipeline", "--help"]
        try:
            main()
        except SystemExit as exc:
            assert exc.code in (0, None), exc.code
        """
    )
    assert "Usage: perth-pipeline" in output and "restore" in output  # the help was printed
    assert "click" in loaded  # (the report does see what was imported)
    assert not loaded & DRIVERS, sorted(loaded & DRIVERS)


def test_the_package_loads_the_producer_on_first_use() -> None:
    loaded, _ = loaded_after("import perth_pipeline")
    assert not loaded & DRIVERS, sorted(loaded & DRIVERS)
    loaded, output = loaded_after(
        """
        import perth_pipeline
        from perth_pipeline import *
        from perth_pipeline.producer import PersistenceManager as Manager
        assert perth_pipeline.PersistenceManager is Manager
        assert PersistenceManager is Manager
        assert callable(install_signal_handlers)
        print(sorted(set(perth_pipeline.__all__) - set(dir(perth_pipeline))))
        """
    )
    assert output == "[]"  # every name of __all__ is there, and dir() lists it
    assert {"redis", "psycopg"} <= loaded
