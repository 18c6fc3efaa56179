"""What a write call accepts, the workers store; what no reader could take back is never stored.

On real Redis and PostgreSQL, workers in-process (burst). Each case was once accepted by one side
and refused, dropped or made unreadable by the other: a JSON field at the workers' size limit, an
integer beyond 64 bits, a timestamp past year 9999 in UTC, a version far ahead of every clock
(stored, or issued by a host clock past 2262).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import psycopg
import pytest
import redis
from rq import Queue
from rq.serializers import JSONSerializer

import perth_pipeline.clock as clock_module
from perth_pipeline import InvalidRecord, PersistenceManager
from perth_pipeline.batch import JOB_FUNCTION
from perth_pipeline.limits import MAX_CLOCK_SKEW_NS, MAX_JSON_BYTES, MAX_VERSION, json_size
from perth_pipeline.settings import Settings
from perth_pipeline.wire import FORMAT_VERSION
from workers.worker import PerthJob

from ..helpers import drain, now, pane, session, settle, tab


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


def _json_of_exactly(size: int) -> dict[str, Any]:
    """``size`` bytes of compact JSON: many small members, escapes, accents, a backslash before u0000."""
    value: dict[str, Any] = {"path": "C:\\u0000", "screen": "\x1bé" * 1000, "pad": ""}
    value["rows"] = [[i % 10, None, True] for i in range((size - json_size(value)) // 16)]
    value["pad"] = "x" * (size - json_size(value))
    assert json_size(value) == size
    return value


def test_json_at_the_workers_limit_is_stored_and_past_it_refused_at_the_call(settings: Settings) -> None:
    settings = settings.model_copy(update={"max_json_bytes": MAX_JSON_BYTES})
    s = session("limits")
    t = tab(s.id)
    at = _json_of_exactly(MAX_JSON_BYTES)
    with PersistenceManager(settings=settings) as m:
        m.create_session(s)
        m.create_tab(t)
        p = pane(t.id, component_state=at)
        m.create_pane(p)
        settle(m, settings)
        over = {**at, "pad": at["pad"] + "x"}
        escapes = {"screen": "\x1b" * 200_000}  # 200 KB of characters, 1.2 MB of JSON
        for state in (over, escapes, {"n": 10**5000}, {"n": 2**64}):
            with pytest.raises(InvalidRecord) as refused:
                m.update_pane(p.model_copy(update={"component_state": state}))
            assert refused.value.field == "component_state"
        settle(m, settings)
        assert m.stats()["refused_jobs"] == 0
        (stored,) = m.restore_panes(t.id)
        assert stored.component_state == at


def test_the_workers_refuse_what_no_reader_could_take_back(
    settings: Settings, rconn: redis.Redis, pg: psycopg.Connection[Any]
) -> None:
    s = session("refusals")
    t, late = tab(s.id, 0, name="ok"), tab(s.id, 1, name="from the future")
    payload = {
        "format": FORMAT_VERSION,
        "id": str(uuid.uuid4()),
        "origin": "limits-test",
        "created_at": now().isoformat(),
        "ops": [
            {"op": "session.upsert", "version": 1, "record": s.model_dump(mode="json")},
            {"op": "tab.upsert", "version": 2, "record": t.model_dump(mode="json")},
            {
                "op": "tab.upsert",
                "version": time.time_ns() + MAX_CLOCK_SKEW_NS + 3600 * 10**9,
                "record": late.model_dump(mode="json"),
            },
            {
                "op": "pane.upsert",
                "version": 3,
                "session_id": str(s.id),
                "record": {**pane(t.id).model_dump(mode="json"), "component_state": {"n": 2**64}},
            },
            {
                "op": "session.touch",
                "version": 4,
                "id": str(s.id),
                "last_active": "9999-12-31T22:00:00-05:00",
            },
        ],
    }
    queue = Queue(settings.queue, connection=rconn, serializer=JSONSerializer)
    job = queue.enqueue_job(queue.create_job(JOB_FUNCTION, args=(payload,)))
    assert drain(settings)
    stored = PerthJob.fetch(job.id, connection=rconn, serializer=JSONSerializer)
    result = stored.latest_result()
    reason = result.exc_string if result is not None and result.exc_string else ""
    for field in ("ops[2].tab.upsert.version", "ops[3].pane.upsert.record.component_state", "ops[4]"):
        assert field in reason, reason
    assert "last_active: Value error, must lie between 0001-01-02 and 9999-12-30 UTC" in reason
    assert stored.meta.get("perth_refused")
    assert pg.execute("SELECT name FROM tabs WHERE session_id = %s", (s.id,)).fetchall() == [("ok",)]
    assert pg.execute("SELECT count(*) FROM panes WHERE session_id = %s", (s.id,)).fetchone() == (0,)
    with PersistenceManager(settings=settings) as m:  # readable: nothing past year 9999 was stored
        assert m.restore_session(s.id).last_active == s.last_active


def test_a_producer_whose_clock_is_past_2262_still_commits_its_writes(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = session("2262")
    t = tab(s.id, name="before")
    with PersistenceManager(settings=settings) as m:
        m.create_session(s)
        m.create_tab(t)
        settle(m, settings)
        monkeypatch.setattr(clock_module, "_time_ns", lambda: 2**63 + 10**15)
        for name in ("after", "after, again"):
            m.update_tab(t.model_copy(update={"name": name}))
            settle(m, settings)
        assert m.stats()["refused_jobs"] == 0
        assert [x.name for x in m.restore_tabs(s.id)] == ["after, again"]
