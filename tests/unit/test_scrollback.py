"""Pending scrollback: no head-of-line blocking, moot chunks dropped at once, memory as it really costs."""

from __future__ import annotations

import tracemalloc
import uuid

from perth_pipeline import PaneHistoryChunk
from perth_pipeline.buffer import Buffer
from perth_pipeline.scrollback import CHUNK_OVERHEAD

from ..helpers import make_buffer, pane, session, tab


def chunk(pane_id: uuid.UUID, index: int, content: bytes = b"x") -> PaneHistoryChunk:
    return PaneHistoryChunk(pane_id=pane_id, chunk_index=index, content=content)


def held_pane(b: Buffer) -> tuple[uuid.UUID, uuid.UUID]:
    """A session, tab and pane the buffer holds, drained: (tab id, pane id)."""
    s = session()
    t = tab(s.id)
    p = pane(t.id)
    b.put_session(s)
    b.put_tab(t)
    b.put_pane(p)
    b.drain(10)
    return t.id, p.id


def test_an_unroutable_chunk_holds_back_no_other_panes_chunks() -> None:
    b = make_buffer()
    _, known = held_pane(b)
    stranger = uuid.uuid4()  # a pane this buffer never held (its creator's batch is still queued)
    b.append_history(chunk(stranger, 0))
    for i in range(5):
        b.append_history(chunk(known, i))
    drained = b.drain(100)
    assert [c.chunk.chunk_index for c in drained.chunks] == [0, 1, 2, 3, 4]
    assert {c.chunk.pane_id for c in drained.chunks} == {known}
    assert b.gauges()["unrouted"] == 1
    assert b.unrouted() == ([], [stranger])
    assert b.min_unsent_seq() is not None  # flush() waits for the parked chunk


def test_a_parked_chunk_goes_once_its_route_is_learnt_and_never_by_time() -> None:
    b = make_buffer()
    stranger, tab_id, session_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    b.append_history(chunk(stranger, 0, b"first"))
    b.append_history(chunk(stranger, 1, b"second"))
    for _ in range(3):
        assert len(b.drain(100)) == 0
    assert b.gauges()["unrouted"] == 2
    b.learn_routes(panes={stranger: (tab_id, session_id)})
    drained = b.drain(100)
    assert [(c.chunk.chunk_index, c.session_id) for c in drained.chunks] == [(0, session_id), (1, session_id)]
    assert b.gauges()["unrouted"] == 0
    assert b.min_unsent_seq() is None


def test_a_chunk_of_a_deleted_pane_is_dropped_at_once_and_counted() -> None:
    b = make_buffer()
    _, p = held_pane(b)
    b.delete("pane", p)
    (deleted,) = b.drain(10).items
    b.confirm([deleted])  # committed: the buffer forgets the pane
    superseded = b.counters["superseded"]
    b.append_history(chunk(p, 3, b"exit\r\n"))
    assert b.counters["superseded"] == superseded + 1
    assert b.gauges()["pending_history_chunks"] == 0
    assert b.min_unsent_seq() is None


def test_chunks_of_panes_under_a_deleted_tab_are_dropped_and_a_recreated_pane_writes_again() -> None:
    b = make_buffer()
    tab_id, p = held_pane(b)
    b.delete("tab", tab_id)
    b.append_history(chunk(p, 0))
    assert b.gauges()["pending_history_chunks"] == 0
    t = tab(uuid.uuid4())
    b.put_tab(t)
    b.put_pane(pane(t.id, id=p))  # the same pane id, created again under another tab
    b.append_history(chunk(p, 1))
    assert [c.chunk.chunk_index for c in b.drain(100).chunks] == [1]


def test_a_pane_known_only_by_its_tombstone_is_routed_by_it_and_its_chunks_are_sent() -> None:
    # another terminal deleted the pane (the route look-up read its tombstone) and may have created
    # it again since: the chunks are not moot for this terminal, the workers judge them by version
    b = make_buffer()
    stranger = uuid.uuid4()
    b.append_history(chunk(stranger, 0))
    assert len(b.drain(10)) == 0
    assert b.unrouted() == ([], [stranger])
    route = (uuid.uuid4(), uuid.uuid4())
    b.learn_routes(panes={stranger: route})  # from the tombstone: the producer does not tell it apart
    b.append_history(chunk(stranger, 1))
    b.unrouted()  # the flusher's look-up releases what is parked
    sent = b.drain(10).chunks
    assert [(c.chunk.chunk_index, c.tab_id, c.session_id) for c in sent] == [(0, *route), (1, *route)]
    assert b.gauges()["pending_history_chunks"] == 0
    assert b.counters["superseded"] == 0


def test_chunks_of_a_pane_this_terminal_deleted_stay_moot_whatever_the_database_says() -> None:
    b = make_buffer()
    tab_id, p = held_pane(b)
    b.delete("pane", p)
    b.learn_routes(panes={p: (tab_id, uuid.uuid4())})  # a look-up (of a tombstone) routes it
    b.append_history(chunk(p, 0))  # the pty drains after the close: moot
    assert b.gauges()["pending_history_chunks"] == 0
    assert b.counters["superseded"] == 1


def test_the_bound_counts_what_a_chunk_costs_in_memory() -> None:
    # 300,000 one-byte chunks during an outage used to cost ~200 MB under a "32 MiB" bound
    bound = 4 << 20
    b = make_buffer(max_pending_history_bytes=bound)
    _, p = held_pane(b)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(30_000):
            b.append_history(chunk(p, i, bytes([i % 251])))
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    gauges = b.gauges()
    assert gauges["pending_history_memory"] <= bound
    kept = gauges["pending_history_chunks"]
    assert kept == bound // (1 + CHUNK_OVERHEAD)
    assert b.counters["dropped_chunks"] == 30_000 - kept
    # what the bound counts is at least what the chunks really hold (within 10 %: the deque's blocks)
    assert used <= 1.1 * gauges["pending_history_memory"], (used, gauges)


def test_the_oldest_chunk_goes_first_parked_or_not() -> None:
    cost = 100 + CHUNK_OVERHEAD
    b = make_buffer(max_pending_history_bytes=3 * cost)
    _, known = held_pane(b)
    stranger = uuid.uuid4()
    b.append_history(chunk(stranger, 0, b"s" * 100))
    b.append_history(chunk(known, 0, b"k" * 100))
    assert len(b.drain(1)) == 1  # known's chunk 0 sent; stranger's parked
    b.append_history(chunk(known, 1, b"k" * 100))
    b.append_history(chunk(known, 2, b"k" * 100))
    b.append_history(chunk(known, 3, b"k" * 100))  # four pending: the oldest (parked) goes
    assert b.counters["dropped_chunks"] == 1
    assert b.gauges()["unrouted"] == 0
    assert [c.chunk.chunk_index for c in b.drain(10).chunks] == [1, 2, 3]
