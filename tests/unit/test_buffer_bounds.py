"""Memory stays bounded (docs/design.md, rule 3): the entity bound and the scrollback byte bound."""

from __future__ import annotations

import json
import logging
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest

from perth_pipeline import PaneHistoryChunk, PersistenceManager
from perth_pipeline.operations import BATCH_ADAPTER
from perth_pipeline.scrollback import CHUNK_OVERHEAD
from perth_pipeline.settings import Settings

from ..helpers import pane, session, tab, wait_for

QUEUE = "bounds"


def all_sent(manager: PersistenceManager) -> bool:
    """Nothing dirty and nothing in transit: every write so far is on the queue."""
    return not manager.buffer.has_dirty() and not manager.stats()["sending"]


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


def make_manager(server: fakeredis.FakeServer, **overrides: Any) -> PersistenceManager:
    values: dict[str, Any] = {
        "redis_url": None,
        "database_url": None,
        "queue": QUEUE,
        "flush_interval": 0.01,
        "breaker_base": 0.02,
        "breaker_max": 0.1,
    }
    values.update(overrides)
    return PersistenceManager(settings=Settings(**values), redis_client=fakeredis.FakeRedis(server=server))


@pytest.fixture
def managers() -> Iterator[list[PersistenceManager]]:
    made: list[PersistenceManager] = []
    yield made
    for m in made:
        m.close(timeout=1)


def sent_ops(manager: PersistenceManager, server: fakeredis.FakeServer) -> list[Any]:
    """Everything on the queue, once the manager has sent all it holds."""
    manager.flush(timeout=0.05)
    wait_for(lambda: all_sent(manager), what="the buffer to be sent")
    client = fakeredis.FakeRedis(server=server)
    ops = []
    for job_id in client.lrange(f"rq:queue:{QUEUE}", 0, -1):
        _, _, args, _ = json.loads(zlib.decompress(client.hget(b"rq:job:" + job_id, "data")))
        ops += BATCH_ADAPTER.validate_python(args[0]).ops
    return ops


def ids_of(ops: list[Any]) -> set[uuid.UUID]:
    return {op.record.id for op in ops if hasattr(op, "record")} | {
        op.pane_id for op in ops if op.op == "history.append"
    }


def test_past_the_entity_bound_new_entities_and_what_is_under_them_are_dropped_and_counted(
    server: fakeredis.FakeServer, managers: list[PersistenceManager], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="perth_pipeline")
    m = make_manager(server, max_entities=10)
    managers.append(m)
    s = session()
    tabs = [tab(s.id, i) for i in range(9)]
    m.create_session(s)
    for t in tabs:
        m.create_tab(t)  # 10 live entities: the bound
    over = tab(s.id, 9)
    under = pane(over.id)
    m.create_tab(over)  # dropped ...
    m.create_pane(under)  # ... and what is under it
    m.append_pane_history(PaneHistoryChunk(pane_id=under.id, chunk_index=0, content=b"lost"))
    for i in range(100):
        m.create_tab(tab(s.id, 10 + i))
    for t in tabs:
        m.update_tab(t.model_copy(update={"name": "still kept"}))  # held entities still change
    stats = m.stats()
    assert stats["dropped_entities"] == 102
    assert stats["dropped_chunks"] == 1
    assert stats["live_entities"] == 10
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "full" in warnings[0].getMessage()
    ops = sent_ops(m, server)
    assert ids_of(ops) == {s.id} | {t.id for t in tabs}
    last_names = {op.record.id: op.record.name for op in ops if op.op == "tab.upsert"}  # in send order
    assert set(last_names.values()) == {"still kept"}


def test_room_made_by_deletes_admits_new_entities_again(
    server: fakeredis.FakeServer, managers: list[PersistenceManager]
) -> None:
    m = make_manager(server, max_entities=10)
    managers.append(m)
    s = session()
    tabs = [tab(s.id, i) for i in range(9)]
    m.create_session(s)
    for t in tabs:
        m.create_tab(t)
    late = tab(s.id, 9)
    m.create_tab(late)
    m.create_pane(pane(late.id))
    assert m.stats()["dropped_entities"] == 2
    m.delete_tab(tabs[0].id)
    m.delete_tab(tabs[1].id)
    m.update_tab(late)  # a record is whole: written again, it is complete state
    below = pane(late.id)
    m.create_pane(below)
    assert m.stats()["dropped_entities"] == 2
    assert {late.id, below.id} <= ids_of(sent_ops(m, server))


def test_the_scrollback_byte_bound_drops_the_oldest_pending_chunks_and_counts_them(
    server: fakeredis.FakeServer, managers: list[PersistenceManager]
) -> None:
    server.connected = False  # Redis is down: scrollback piles up in memory
    bound = 10 * (100 + CHUNK_OVERHEAD)  # ten chunks of 100 bytes, counted as what they cost
    m = make_manager(server, max_pending_history_bytes=bound)
    managers.append(m)
    s = session()
    t = tab(s.id)
    p = pane(t.id)
    m.create_session(s)
    m.create_tab(t)
    m.create_pane(p)
    for i in range(20):
        m.append_pane_history(PaneHistoryChunk(pane_id=p.id, chunk_index=i, content=bytes([i]) * 100))
        assert m.stats()["pending_history_memory"] <= bound
    stats = m.stats()
    assert stats["pending_history_bytes"] == 1000
    assert stats["dropped_chunks"] == 10
    assert stats["dropped_chunk_bytes"] == 1000
    server.connected = True
    chunks = [op for op in sent_ops(m, server) if op.op == "history.append"]
    assert [c.chunk_index for c in chunks] == list(range(10, 20))  # the newest, in order
    assert m.stats()["dropped_chunks"] == 10
