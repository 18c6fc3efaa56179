"""A stored version far ahead of every clock never makes a producer's later writes unsendable."""

from __future__ import annotations

from typing import Any

import psycopg

from perth_pipeline import PersistenceManager
from perth_pipeline.records import MAX_VERSION
from perth_pipeline.settings import Settings

from ..helpers import now, session, settle, tab


def test_a_producer_that_restores_a_poisoned_row_still_commits_its_writes(
    settings: Settings, pg: psycopg.Connection[Any]
) -> None:
    s = session("poisoned")
    pg.execute(
        "INSERT INTO sessions (id, name, created_at, last_active, version, origin) "
        "VALUES (%s, %s, %s, %s, %s, 'by-hand')",
        (s.id, s.name, s.created_at, s.last_active, MAX_VERSION),
    )
    with PersistenceManager(settings=settings) as m:
        assert m.restore_session(s.id).name == "poisoned"
        t = tab(s.id, name="after the restore")
        m.create_tab(t)
        m.touch_session(s.id)
        settle(m, settings)
        assert m.stats()["refused_jobs"] == 0
        assert [x.name for x in m.restore_tabs(s.id)] == ["after the restore"]
        assert m.restore_session(s.id).last_active >= now(-60)
