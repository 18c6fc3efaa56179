"""Writes whose session the buffer does not know are held, dirty, until a route is learnt; never dropped."""

from __future__ import annotations

import uuid

from perth_pipeline.buffer import PANE, TAB

from ..helpers import make_buffer, pane, session, tab


def test_a_pane_under_a_tab_the_buffer_does_not_hold_waits_for_its_route() -> None:
    b = make_buffer()
    tab_id = uuid.uuid4()
    p = pane(tab_id)
    b.put_pane(p)
    for _ in range(3):
        assert len(b.drain(100)) == 0
    assert b.unrouted() == ([tab_id], [])
    assert b.gauges() | {"unrouted": 1, "dirty": 1} == b.gauges()
    assert b.min_unsent_seq() == b.seq  # flush() waits for it
    sid = uuid.uuid4()
    b.learn_routes(tabs={tab_id: sid})
    (item,) = b.drain(100).items
    assert (item.key, item.session_id, item.tab_id) == ((PANE, p.id), sid, tab_id)
    assert b.min_unsent_seq() is None and b.gauges()["unrouted"] == 0


def test_held_writes_do_not_hold_back_the_others_and_keep_coalescing() -> None:
    b = make_buffer()
    strangers = [pane(uuid.uuid4(), n) for n in range(50)]
    for p in strangers:
        b.put_pane(p)
    assert len(b.drain(10)) == 0
    s = session()
    b.put_session(s)
    assert [i.key for i in b.drain(10).items] == [("session", s.id)]
    b.put_pane(strangers[0].model_copy(update={"title": "again"}))  # an update of a held pane
    assert b.counters["coalesced"] == 1
    assert b.gauges()["unrouted"] == 50


def test_a_tab_created_later_releases_the_panes_held_under_it() -> None:
    b = make_buffer()
    s = session()
    t = tab(s.id)
    p = pane(t.id)
    b.put_pane(p)  # the pane's create reached the producer before its tab's (another thread)
    assert len(b.drain(10)) == 0
    b.put_session(s)
    b.put_tab(t)
    keys = [i.key for i in b.drain(10).items]
    assert sorted(k[0] for k in keys) == ["pane", "session", "tab"]


def test_deletes_of_unknown_tabs_and_panes_wait_and_then_go_with_their_route() -> None:
    b = make_buffer()
    tab_id, pane_id, sid = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    b.delete(TAB, tab_id)
    b.delete(PANE, pane_id)
    assert len(b.drain(10)) == 0
    assert b.unrouted() == ([tab_id], [pane_id])
    b.learn_routes(tabs={tab_id: sid}, panes={pane_id: (tab_id, sid)})
    items = b.drain(10).items
    assert {(i.key, i.deleted, i.session_id) for i in items} == {
        ((TAB, tab_id), True, sid),
        ((PANE, pane_id), True, sid),
    }


def test_a_held_write_given_back_after_a_lost_batch_is_not_lost() -> None:
    b = make_buffer()
    tab_id, sid = uuid.uuid4(), uuid.uuid4()
    p = pane(tab_id)
    b.put_pane(p)
    b.learn_routes(tabs={tab_id: sid})
    lost = b.drain(10)
    assert len(lost.items) == 1
    b.redirty(lost.items)  # the batch vanished: sent again
    assert [i.key for i in b.drain(10).items] == [(PANE, p.id)]


def test_an_unsent_delete_of_a_pane_stored_under_another_session_survives_a_cascade() -> None:
    # found by the property test: the stored pane lives under session A; the terminal deletes it,
    # creates it again under a tab of session B, deletes it again, then deletes session B. B's
    # cascade does not reach the row under A: the pane's own delete must still be sent.
    b = make_buffer()
    old_tab, old_session, pid = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    b.learn_routes(panes={pid: (old_tab, old_session)})  # as after a restore
    b.delete(PANE, pid)
    s = session()
    t = tab(s.id)
    b.put_session(s)
    b.put_tab(t)
    b.put_pane(pane(t.id, id=pid))
    b.delete(PANE, pid)
    b.delete("session", s.id)
    sent = {(i.key, i.deleted) for i in b.drain(100).items}
    assert ((PANE, pid), True) in sent


def test_a_tab_created_again_after_a_delete_of_unknown_route_keeps_its_session() -> None:
    # found by the stateful test: the held delete's route look-up overwrote the session the new
    # record names, and the next update was refused as "a tab cannot move to another session"
    b = make_buffer()
    s = session()
    t = tab(s.id)
    b.delete(TAB, t.id)  # a tab this terminal never held
    assert len(b.drain(1)) == 0
    b.put_tab(t)
    b.unrouted()  # the database knows nothing of it yet
    b.put_tab(t.model_copy(update={"name": "again"}))
    items = b.drain(10).items
    assert [(i.key, i.deleted, i.session_id) for i in items] == [
        ((TAB, t.id), True, s.id),
        ((TAB, t.id), False, s.id),
    ]
