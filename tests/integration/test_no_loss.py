"""A delay never becomes a loss: writes whose route the producer does not know yet are held, not dropped.

Each test is a situation a terminal meets in normal use (issue 11's scenarios 1 to 3), against a
real Redis and PostgreSQL, with burst workers standing for workers that are behind. Where the old
producer dropped a write after 60 s of not knowing its session, the tests move the producer's clock
on by an hour instead of waiting: no timer may decide a loss, however long the backlog.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import psycopg
import pytest

import perth_pipeline.flusher as flusher_module
import perth_pipeline.health as health_module
import perth_pipeline.inflight as inflight_module
import perth_pipeline.producer as producer_module
import perth_pipeline.reader as reader_module
import perth_pipeline.tasks as tasks_module
from perth_pipeline import NotFound, PaneHistoryChunk, PersistenceManager
from perth_pipeline.settings import Settings

from ..helpers import drain, pane, session, settle, tab, wait_for


class ShiftedTime:
    """The ``time`` module as the producer's modules see it, with a monotonic clock that can jump ahead."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def shifted(monkeypatch: pytest.MonkeyPatch) -> ShiftedTime:
    clock = ShiftedTime()
    modules = (producer_module, flusher_module, tasks_module, inflight_module, health_module, reader_module)
    for module in modules:
        monkeypatch.setattr(module, "time", clock)
    return clock


def chunk(pane_id: uuid.UUID, index: int, content: bytes) -> PaneHistoryChunk:
    return PaneHistoryChunk(pane_id=pane_id, chunk_index=index, content=content)


def test_a_closed_panes_last_output_holds_back_no_other_pane(settings: Settings) -> None:
    # scenario 1: the pty drains a moment after the pane closed; the other pane goes on writing
    s = session("closing a pane")
    t = tab(s.id)
    a, b = pane(t.id, 1), pane(t.id, 2)
    with PersistenceManager(settings=settings) as m:
        m.create_session(s)
        m.create_tab(t)
        m.create_pane(a)
        m.create_pane(b)
        settle(m, settings)
        m.delete_pane(a.id)
        settle(m, settings)  # the delete is committed (and forgotten by the buffer)
        superseded = m.stats()["superseded"]
        m.append_pane_history(chunk(a.id, 7, b"exit\r\n"))
        for i in range(5):
            m.append_pane_history(chunk(b.id, i, f"line {i}\n".encode()))
        settle(m, settings)
        assert m.stats()["superseded"] == superseded + 1  # a's last output: moot, counted
        tree = m.restore_session_tree(s.id)
        assert [p.id for p in tree.panes[t.id]] == [b.id]
        assert tree.history == {b.id: b"".join(f"line {i}\n".encode() for i in range(5))}


def test_an_update_after_a_restart_during_a_backlog_is_stored_however_long_the_backlog(
    settings: Settings, shifted: ShiftedTime
) -> None:
    # scenario 2: terminal 1 wrote and exited; the workers are stopped; terminal 2 restores
    # (nothing yet), then updates the pane from its own state
    s = session("restarted")
    t = tab(s.id)
    p = pane(t.id, title="old title")
    first = PersistenceManager(settings=settings)
    first.create_session(s)
    first.create_tab(t)
    first.create_pane(p)
    first.close(timeout=10)
    assert first.stats()["enqueued_jobs"] >= 1

    with PersistenceManager(settings=settings) as second:
        with pytest.raises(NotFound):
            second.restore_session_tree(s.id, wait=0.2)
        second.update_pane(p.model_copy(update={"title": "new title"}))
        assert not second.flush(timeout=0.3)
        shifted.offset += 3600.0  # an hour of backlog, as the producer's clock sees it
        assert not second.flush(timeout=1.5)  # route look-ups ran since: still held, not dropped
        assert second.stats()["unrouted"] == 1
        settle(second, settings)  # the workers are back: terminal 1's batch, then the update
        assert second.stats()["unrouted"] == 0
        tree = second.restore_session_tree(s.id)
        assert [x.title for x in tree.panes[t.id]] == ["new title"]


def test_two_terminals_writing_the_same_tabs_lose_nothing_to_a_long_backlog(
    settings: Settings, shifted: ShiftedTime
) -> None:
    # scenario 3: terminal A creates the tabs; terminal B adds a pane under one and deletes the other
    s = session("shared")
    kept, closed = tab(s.id, 0, name="kept"), tab(s.id, 1, name="closed")
    a = PersistenceManager(settings=settings)
    b = PersistenceManager(settings=settings)
    try:
        a.create_session(s)
        a.create_tab(kept)
        a.create_tab(closed)
        wait_for(lambda: a.stats()["enqueued_jobs"] >= 1, what="A's batch to be enqueued")
        added = pane(kept.id, 1, title="from B")
        b.create_pane(added)
        b.delete_tab(closed.id)
        shifted.offset += 3600.0
        assert not b.flush(timeout=1.5)
        assert b.stats()["unrouted"] == 2
        settle(a, settings)
        settle(b, settings)
        tree = a.restore_session_tree(s.id)
        assert [x.id for x in tree.tabs] == [kept.id]
        assert [x.id for x in tree.panes[kept.id]] == [added.id]
    finally:
        a.close(timeout=5)
        b.close(timeout=5)


def test_writes_under_a_tab_deleted_elsewhere_are_routed_by_its_tombstone(
    settings: Settings, pg: psycopg.Connection[Any]
) -> None:
    # B never held the tab or the pane: A created and deleted them. B's deletes are still sent
    # (the tombstones tell their session), and B's late scrollback of the pane it deleted is moot:
    # nothing waits forever, and the rows stay right.
    s = session("tombstones")
    gone = tab(s.id)
    doomed = pane(gone.id, 1)
    with PersistenceManager(settings=settings) as a:
        a.create_session(s)
        a.create_tab(gone)
        a.create_pane(doomed)
        settle(a, settings)
        a.delete_pane(doomed.id)
        settle(a, settings)  # (in one flush, the tab's delete would supersede the pane's)
        a.delete_tab(gone.id)
        settle(a, settings)
    with PersistenceManager(settings=settings) as b:
        b.delete_tab(gone.id)
        b.delete_pane(doomed.id)
        b.append_pane_history(chunk(doomed.id, 0, b"late"))
        settle(b, settings)
        assert b.stats()["unrouted"] == 0
        assert b.stats()["superseded"] >= 1  # the chunk of a pane this terminal deleted
    assert pg.execute("SELECT count(*) FROM tabs WHERE id = %s", (gone.id,)).fetchone() == (0,)
    assert pg.execute("SELECT count(*) FROM pane_history WHERE pane_id = %s", (doomed.id,)).fetchone() == (0,)
    drain(settings)
