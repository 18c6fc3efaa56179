"""The producer against fakeredis: what lands on the queue, coalescing, validation."""

from __future__ import annotations

import json
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest

from perth_pipeline import InvalidRecord, PaneHistoryChunk, PersistenceManager, TabRecord
from perth_pipeline.operations import BATCH_ADAPTER, Batch
from perth_pipeline.settings import Settings

from ..helpers import pane, session, tab, wait_for


@pytest.fixture
def fake() -> Iterator[fakeredis.FakeRedis]:
    client = fakeredis.FakeRedis()
    yield client
    client.close()


@pytest.fixture
def manager(fake: fakeredis.FakeRedis) -> Iterator[PersistenceManager]:
    # a long interval: batches are cut only when a test calls flush(), so what they hold is deterministic
    settings = Settings(redis_url=None, database_url=None, queue="unit", flush_interval=30.0)
    m = PersistenceManager(settings=settings, redis_client=fake)
    yield m
    m.close(timeout=1)


def queued_jobs(fake: fakeredis.FakeRedis, queue: str = "unit") -> list[dict[str, Any]]:
    jobs = []
    for job_id in fake.lrange(f"rq:queue:{queue}", 0, -1):
        raw = fake.hgetall(b"rq:job:" + job_id)
        data = zlib.decompress(raw[b"data"])
        jobs.append({"hash": raw, "data": data})
    return jobs


def sent_batches(manager: PersistenceManager, fake: fakeredis.FakeRedis) -> list[Batch]:
    manager.flush(timeout=0.05)  # sends; nothing commits without a worker
    wait_for(
        lambda: not manager.buffer.has_dirty() and not manager.stats()["sending"],
        what="the buffer to be sent",
    )
    batches = []
    for job in queued_jobs(fake):
        func, instance, args, kwargs = json.loads(job["data"])  # JSON, not pickle
        assert func == "workers.jobs.apply_batch"
        assert instance is None and kwargs == {} and len(args) == 1
        batches.append(BATCH_ADAPTER.validate_python(args[0]))
    return batches


def test_jobs_on_the_queue_are_json_batches(manager: PersistenceManager, fake: fakeredis.FakeRedis) -> None:
    s = session()
    t = tab(s.id)
    p = pane(t.id)
    manager.create_session(s)
    manager.create_tab(t)
    manager.create_pane(p)
    batches = sent_batches(manager, fake)
    assert len(batches) == 1
    ops = batches[0].ops
    assert [op.op for op in ops] == ["session.upsert", "tab.upsert", "pane.upsert"]
    assert ops[2].record == p  # type: ignore[union-attr]
    assert ops[2].session_id == s.id  # type: ignore[union-attr]
    job = queued_jobs(fake)[0]["hash"]
    description = job[b"description"].decode()
    assert "3 ops" in description and str(s.id)[:8] in description
    assert p.title not in description  # the dashboard shows counts and ids, never the user's data


def test_repeated_updates_of_one_pane_become_one_operation(
    manager: PersistenceManager, fake: fakeredis.FakeRedis
) -> None:
    s = session()
    t = tab(s.id)
    p = pane(t.id)
    manager.create_session(s)
    manager.create_tab(t)
    for i in range(10):
        manager.update_pane(p.model_copy(update={"title": f"title {i}"}))
    batches = sent_batches(manager, fake)
    pane_ops = [op for b in batches for op in b.ops if op.op == "pane.upsert"]
    assert len(pane_ops) == 1
    assert pane_ops[0].record.title == "title 9"  # type: ignore[union-attr]
    assert manager.stats()["coalesced"] == 9


def test_a_delete_supersedes_earlier_upserts_and_everything_under_it(
    manager: PersistenceManager, fake: fakeredis.FakeRedis
) -> None:
    s = session()
    t = tab(s.id)
    p = pane(t.id)
    manager.create_session(s)
    manager.create_tab(t)
    manager.create_pane(p)
    manager.update_pane(p.model_copy(update={"title": "x"}))
    manager.append_pane_history(PaneHistoryChunk(pane_id=p.id, chunk_index=0, content=b"ls\n"))
    manager.delete_tab(t.id)
    ops = [op for b in sent_batches(manager, fake) for op in b.ops]
    assert [op.op for op in ops] == ["session.upsert", "tab.delete"]


def test_scrollback_chunks_are_appended_in_order(
    manager: PersistenceManager, fake: fakeredis.FakeRedis
) -> None:
    s = session()
    t = tab(s.id)
    p = pane(t.id)
    manager.create_session(s)
    manager.create_tab(t)
    manager.create_pane(p)
    for i in range(5):
        manager.append_pane_history(
            PaneHistoryChunk(pane_id=p.id, chunk_index=i, content=b"line %d\n" % i * 40)
        )
    ops = [op for b in sent_batches(manager, fake) for op in b.ops if op.op == "history.append"]
    assert [op.chunk_index for op in ops] == [0, 1, 2, 3, 4]  # type: ignore[union-attr]


def test_what_a_write_call_accepted_is_what_is_sent(
    manager: PersistenceManager, fake: fakeredis.FakeRedis
) -> None:
    s = session()
    layout: dict[str, Any] = {"split": {"sizes": [30, 70]}}
    t = TabRecord(id=uuid.uuid4(), session_id=s.id, position=0, name="t", layout_blob=layout)
    manager.create_session(s)
    manager.create_tab(t)
    t.layout_blob["split"]["sizes"].append(99)  # the caller mutates its dict afterwards
    t.layout_blob["extra"] = True
    ops = [op for b in sent_batches(manager, fake) for op in b.ops if op.op == "tab.upsert"]
    assert ops[0].record.layout_blob == {"split": {"sizes": [30, 70]}}  # type: ignore[union-attr]


def test_invalid_input_raises_in_the_caller_and_reaches_no_queue(
    manager: PersistenceManager, fake: fakeredis.FakeRedis
) -> None:
    s = session()
    manager.create_session(s)
    with pytest.raises(InvalidRecord) as info:
        manager.create_tab(s)  # type: ignore[arg-type]
    assert info.value.field == "tab"
    with pytest.raises(InvalidRecord) as info:
        manager.delete_pane("not-a-uuid")
    assert info.value.field == "pane_id"
    bad = tab(s.id).model_copy(update={"layout_blob": {"x": float("nan")}})
    with pytest.raises(InvalidRecord) as info:
        manager.create_tab(bad)
    assert info.value.field == "layout_blob"
    with pytest.raises(ValueError):  # InvalidRecord is a ValueError too
        manager.create_pane(pane(uuid.uuid4(), component_state={"blob": "x" * (300 << 10)}))
    ops = [op for b in sent_batches(manager, fake) for op in b.ops]
    assert [op.op for op in ops] == ["session.upsert"]
    assert manager.stats()["invalid"] == 4
