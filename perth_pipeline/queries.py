"""Named SQL queries, kept in ``.sql`` files beside the code and loaded by name."""

from __future__ import annotations

import functools
import re
from importlib import resources
from pathlib import Path

__all__ = ["load_queries", "schema_sql"]

_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


@functools.cache
def load_queries(filename: str) -> dict[str, str]:
    """``{name: sql}`` for a file of ``-- name: x`` sections in ``perth_pipeline/sql``."""
    text = resources.files("perth_pipeline").joinpath("sql", filename).read_text(encoding="utf-8")
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        sql = "\n".join(line for line in body.strip().splitlines() if not line.lstrip().startswith("--"))
        queries[name] = sql.strip()
    return queries


def schema_sql() -> str:
    """The text of ``schema.sql``: inside the package when installed from a wheel,
    at the repository root in a checkout or an editable install."""
    packaged = resources.files("perth_pipeline").joinpath("schema.sql")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    checkout = Path(__file__).resolve().parent.parent / "schema.sql"
    if checkout.is_file():
        return checkout.read_text(encoding="utf-8")
    raise FileNotFoundError("schema.sql is neither in the perth_pipeline package nor beside it")
