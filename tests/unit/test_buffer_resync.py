"""The buffer when deliveries fail: what is given back, in what order, and what it holds on to.

Deterministic cases of docs/design.md, rule 3, that the property tests
(test_buffer_properties.py) reach only rarely: each is a sequence that once lost a
write, or memory.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from perth_pipeline import PaneHistoryChunk
from perth_pipeline.buffer import PANE, SESSION, TAB, Drained
from perth_pipeline.scrollback import CHUNK_OVERHEAD

from ..helpers import make_buffer, pane, session, tab


def ops(drained: Drained) -> list[tuple[str, uuid.UUID | str, bool]]:
    return [(i.kind, i.key[1], i.deleted) for i in drained.items]


def test_a_delete_re_created_before_it_was_sent_goes_first() -> None:
    b = make_buffer()
    s = session()
    t = tab(s.id)
    b.put_session(s)
    b.put_tab(t)
    b.confirm(b.drain(100).items)
    b.delete(TAB, t.id)
    b.put_tab(t.model_copy(update={"name": "again"}))
    drained = b.drain(100)
    assert ops(drained) == [(TAB, t.id, True), (TAB, t.id, False)]
    delete, upsert = drained.items
    assert delete.version < upsert.version  # the cascade of the delete stays below the new tab
    assert delete.session_id == s.id


def test_a_lost_delete_goes_again_before_a_re_creation() -> None:
    b = make_buffer()
    s = session()
    t = tab(s.id)
    p = pane(t.id)
    b.put_session(s)
    b.put_tab(t)
    b.put_pane(p)
    b.confirm(b.drain(100).items)  # committed: the pane row exists
    b.delete(TAB, t.id)
    lost = b.drain(100)  # the delete is in flight...
    b.put_tab(t)  # ... the tab is created again ...
    b.redirty(lost.items)  # ... and the delete never arrives
    drained = b.drain(100)
    assert ops(drained) == [(TAB, t.id, True), (TAB, t.id, False)]
    assert drained.items[0].version == lost.items[0].version


def test_a_lost_delete_of_an_entity_superseded_since_is_sent_again() -> None:
    b = make_buffer()
    s = session()
    t1, t2 = tab(s.id, 0), tab(s.id, 1)
    p = pane(t1.id)
    for record in (s, t1, t2):
        b.put_session(record) if record is s else b.put_tab(record)  # type: ignore[arg-type]
    b.put_pane(p)
    b.confirm(b.drain(100).items)
    b.delete(PANE, p.id)
    lost = b.drain(100)  # the pane's delete, in flight
    b.put_pane(p.model_copy(update={"tab_id": t2.id}))  # the id again, under another tab
    b.delete(TAB, t2.id)  # which goes: the pane with it (only its new life is under t2)
    b.confirm(b.drain(100).items)
    b.redirty(lost.items)  # the first delete is lost: the row under t1 must still go
    assert (PANE, p.id, True) in ops(b.drain(100))


def test_a_child_re_created_under_another_parent_survives_the_old_parents_delete() -> None:
    b = make_buffer()
    s1, s2 = session(), session()
    t = tab(s1.id)
    b.put_session(s1)
    b.put_session(s2)
    b.put_tab(t)
    b.delete(TAB, t.id)
    b.confirm(b.drain(100).items)
    moved = t.model_copy(update={"session_id": s2.id})
    b.put_tab(moved)
    b.delete(SESSION, s1.id)
    drained = b.drain(100)
    assert (TAB, t.id, False) in ops(drained)
    assert b.gauges()["live_entities"] == 2  # s2 and the tab


def test_a_pane_under_a_tab_the_buffer_does_not_hold_goes_with_its_session() -> None:
    b = make_buffer()
    sid, tid = uuid.uuid4(), uuid.uuid4()
    b.learn_routes(tabs={tid: sid})  # as after restore_tabs: stored, not held
    p = pane(tid)
    b.put_pane(p)
    b.append_history(PaneHistoryChunk(pane_id=p.id, chunk_index=0, content=b"x"))
    b.delete(SESSION, sid)
    drained = b.drain(100)
    assert ops(drained) == [(SESSION, sid, True)]
    assert drained.chunks == []
    assert b.gauges()["live_entities"] == 0


def test_flush_waits_for_the_oldest_unsent_write_of_a_coalesced_key() -> None:
    b = make_buffer()
    s = session()
    b.put_session(s)
    first = b.seq
    b.put_session(session())
    b.put_session(s.model_copy(update={"name": "renamed"}))  # coalesced into the first write
    assert b.min_unsent_seq() == first


def test_the_oldest_unsent_write_is_known_after_deliveries_fail_in_any_order() -> None:
    b = make_buffer()
    sessions = [session(str(i)) for i in range(6)]
    for s in sessions[:3]:
        b.put_session(s)
    older = b.drain(100)
    for s in sessions[3:]:
        b.put_session(s)
    newer = b.drain(100)
    b.put_session(session("dirty"))
    b.redirty(newer.items)
    b.redirty(older.items)  # the oldest comes back last, behind younger keys
    assert b.min_unsent_seq() == older.min_seq
    assert len(b.drain(100)) == 7
    b.put_session(session("next"))
    assert b.min_unsent_seq() == b.seq  # exact again once the given-back keys are sent


def test_given_back_chunks_keep_their_order_and_the_oldest_go_past_the_bound() -> None:
    b = make_buffer(max_pending_history_bytes=5 * (200 + CHUNK_OVERHEAD))
    s = session()
    t = tab(s.id)
    p = pane(t.id)
    b.put_session(s)
    b.put_tab(t)
    b.put_pane(p)
    b.drain(3)
    for i in range(4):
        b.append_history(PaneHistoryChunk(pane_id=p.id, chunk_index=i, content=b"a" * 200))
    first = b.drain(2)
    second = b.drain(2)
    for i in range(4, 7):
        b.append_history(PaneHistoryChunk(pane_id=p.id, chunk_index=i, content=b"b" * 200))
    b.redirty((), (), first.chunks)
    b.redirty((), (), second.chunks)  # 7 chunks of 200 bytes pending: the 2 oldest go
    assert [c.chunk.chunk_index for c in b.drain(100).chunks] == [2, 3, 4, 5, 6]
    assert b.counters["dropped_chunks"] == 2
    assert b.counters["dropped_chunk_bytes"] == 400
    assert b.gauges()["pending_history_bytes"] == 0


def test_memory_for_deleted_entities_is_released_once_their_deletes_commit() -> None:
    b = make_buffer()
    s = session()
    t = tab(s.id)
    b.put_session(s)
    b.put_tab(t)
    b.confirm(b.drain(100).items)
    for _ in range(200):  # panes come and go in a long-lived tab
        p = pane(t.id)
        b.put_pane(p)
        b.append_history(PaneHistoryChunk(pane_id=p.id, chunk_index=0, content=b"x"))
        b.confirm(b.drain(100).items)
        b.delete(PANE, p.id)
        b.confirm(b.drain(100).items)
    assert b.gauges()["held_entries"] == 2
    assert sum(len(children) for children in b._routes.children.values()) == 1  # the tab under its session


def test_last_active_of_a_held_session_never_goes_back() -> None:
    b = make_buffer()
    t0 = datetime(2024, 5, 1, tzinfo=UTC)
    s = session(last_active=t0 + timedelta(minutes=5))
    b.put_session(s)
    b.put_session(s.model_copy(update={"name": "renamed", "last_active": t0}))  # a stale copy
    (item,) = b.drain(100).items
    assert item.record is not None and item.record.last_active == t0 + timedelta(minutes=5)  # type: ignore[union-attr]
    assert item.record.name == "renamed"  # type: ignore[union-attr]
