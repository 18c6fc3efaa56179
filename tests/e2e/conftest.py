"""Fixtures of the process-level tests: a throwaway PostgreSQL that a test may stop and restart."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from perth_pipeline.store import Store
from perth_pipeline.testing import ThrowawayPostgres

from ..helpers import require


@pytest.fixture
def throwaway_pg() -> Iterator[ThrowawayPostgres]:
    """A PostgreSQL of the test's own, on a free port, with the schema applied."""
    try:
        server = ThrowawayPostgres().start()
    except (RuntimeError, OSError) as exc:
        require(False, f"no throwaway PostgreSQL (PostgreSQL binaries or the 'embedded' extra): {exc}")
        raise
    try:
        store = Store(server.url)
        store.init_db()
        store.close()
        yield server
    finally:
        server.close()
