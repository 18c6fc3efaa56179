"""perth_pipeline.buffer.Receipt: what the producer keeps of a batch in flight, and what it gives back.

A receipt holds the keys of a batch's upserts (not their data) and its deletes. When the batch
is lost (its job failed or vanished), ``redirty_receipt`` makes those keys dirty again and the
next drain sends the entities as they are NOW (an update made in between wins over what the
lost batch carried); lost deletes go again as they were; ``confirm_deletes`` forgets deletes
once they are committed, and only those. (The producer's side of this, on fakeredis, is in
test_producer_resync.py; the order of a lost delete and a re-creation in test_buffer_resync.py.)

A lost write whose key was written again since (dirty under a younger seq) is resent under the
lost write's seq, so that ``min_unsent_seq`` (and ``PersistenceManager.flush``) still wait for it.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from perth_pipeline import TemplateRecord
from perth_pipeline.buffer import PANE, SESSION, TAB, TEMPLATE, Drained, Item, Receipt

from ..helpers import make_buffer, pane, session, tab


def by_key(drained: Drained) -> dict[tuple[str, Any], Item]:
    out: dict[tuple[str, Any], Item] = {}
    for item in drained.items:
        assert item.key not in out or item.deleted != out[item.key].deleted, "sent twice"
        if not item.deleted:
            out[item.key] = item
        else:
            out.setdefault(item.key, item)
    return out


def test_a_receipt_keeps_keys_and_deletes_not_the_data() -> None:
    b = make_buffer()
    s = session()
    t = tab(s.id)
    b.put_session(s)
    b.put_tab(t)
    b.delete(TEMPLATE, "gone")
    drained = b.drain(100)
    receipt = Receipt.of(drained.items)
    upserts = [i for i in drained.items if not i.deleted]
    assert receipt.upserts == [(i.ref, i.seq) for i in upserts]
    assert all(isinstance(part, int | str) for ref, seq in receipt.upserts for part in (*ref, seq))
    assert receipt.deletes == [i for i in drained.items if i.deleted]


def test_a_lost_batch_is_sent_again_with_the_entities_current_state() -> None:
    b = make_buffer()
    s = session("before")
    t = tab(s.id, layout_blob={"v": 1})
    p = pane(t.id, component_state={"v": 1}, title="before")
    tpl = TemplateRecord(id=uuid.uuid4(), name="dev", definition={"v": 1})
    b.put_session(s)
    b.put_tab(t)
    b.put_pane(p)
    b.put_template(tpl)
    lost = b.drain(100)  # batch A, in flight
    receipt = Receipt.of(lost.items)

    # updates after A was drained: some go out in batch B (also in flight), one stays dirty
    t2 = t.model_copy(update={"layout_blob": {"v": 2}})
    p2 = p.model_copy(update={"title": "after", "component_state": {"v": 2}})
    tpl2 = tpl.model_copy(update={"definition": {"v": 2}})
    b.put_tab(t2)
    b.put_pane(p2)
    b.put_template(tpl2)
    newer = b.drain(100)
    s2 = s.model_copy(update={"name": "after", "last_active": s.last_active + timedelta(minutes=1)})
    b.put_session(s2)  # still dirty when A's loss is noticed

    assert b.redirty_receipt(receipt) == 3  # the session is dirty anyway: not counted twice
    again = by_key(b.drain(100))
    assert set(again) == {(SESSION, s.id), (TAB, t.id), (PANE, p.id), (TEMPLATE, "dev")}
    assert again[(SESSION, s.id)].record == s2
    assert again[(TAB, t.id)].record == t2 and again[(TAB, t.id)].snapshot == {"v": 2}
    assert again[(PANE, p.id)].record == p2 and again[(PANE, p.id)].snapshot == {"v": 2}
    assert again[(TEMPLATE, "dev")].record == tpl2 and again[(TEMPLATE, "dev")].snapshot == {"v": 2}
    # the versions of the current state: a worker that applies B after this keeps the same rows
    newer_versions = {i.key: i.version for i in newer.items}
    for key, version in newer_versions.items():
        assert again[key].version == version
    assert not b.has_dirty()


def test_flush_waits_for_the_writes_of_a_lost_batch() -> None:
    b = make_buffer()
    s = session()
    t = tab(s.id)
    b.put_session(s)
    b.put_tab(t)
    lost = b.drain(100)
    b.put_pane(pane(t.id))  # a younger write, still dirty
    assert b.min_unsent_seq() == b.seq
    b.redirty_receipt(Receipt.of(lost.items))
    assert b.min_unsent_seq() == lost.min_seq


def test_flush_waits_for_a_lost_write_whose_key_was_written_again() -> None:
    b = make_buffer()
    s = session()
    b.put_session(s)  # seq 1
    lost = b.drain(100)  # batch A, in flight
    b.put_session(s.model_copy(update={"name": "renamed"}))  # seq 2, dirty
    b.redirty_receipt(Receipt.of(lost.items))  # A failed
    # flush(target=1) must not return True until the session is committed: the oldest unsent
    # write is A's (1), carried now by the dirty key
    assert b.min_unsent_seq() == lost.min_seq
    resent = b.drain(100)
    assert resent.min_seq == lost.min_seq and [i.record.name for i in resent.items] == ["renamed"]
    assert b.min_unsent_seq() is None


def test_a_lost_upsert_of_an_entity_deleted_since_is_not_sent_again() -> None:
    b = make_buffer()
    s = session()
    t = tab(s.id)
    p = pane(t.id)
    b.put_session(s)
    b.put_tab(t)
    b.put_pane(p)
    lost = Receipt.of(b.drain(100).items)
    b.delete(PANE, p.id)
    delete = b.drain(100)
    b.confirm_deletes(Receipt.of(delete.items).deletes)  # the pane's delete committed
    b.redirty_receipt(lost)
    assert {i.key for i in b.drain(100).items} == {(SESSION, s.id), (TAB, t.id)}


def test_lost_deletes_are_sent_again_as_they_were() -> None:
    b = make_buffer()
    s = session()
    t = tab(s.id)
    p = pane(t.id)
    b.put_session(s)
    b.put_tab(t)
    b.put_pane(p)
    b.put_template(TemplateRecord(id=uuid.uuid4(), name="dev", definition={}))
    b.confirm(b.drain(100).items)
    b.delete(PANE, p.id)
    b.delete(TEMPLATE, "dev")
    b.delete(SESSION, uuid.uuid4())  # a session this buffer never held
    lost = b.drain(100)
    receipt = Receipt.of(lost.items)
    assert len(receipt.deletes) == 3 and receipt.upserts == []

    assert b.redirty_receipt(receipt) == 3
    again = b.drain(100)
    sent = {(i.key, i.version, i.deleted, i.tab_id, i.session_id) for i in again.items}
    assert sent == {(i.key, i.version, True, i.tab_id, i.session_id) for i in lost.items}
    assert {i.key: (i.tab_id, i.session_id) for i in again.items}[(PANE, p.id)] == (t.id, s.id)


def test_confirm_deletes_forgets_committed_deletes_only() -> None:
    b = make_buffer()
    s = session()
    t = tab(s.id)
    b.put_session(s)
    b.put_tab(t)
    b.confirm(b.drain(100).items)
    assert b.gauges()["held_entries"] == 2

    # delete, re-create, delete again: the first delete's commit must not forget the second
    b.delete(TAB, t.id)
    first = Receipt.of(b.drain(100).items)
    b.put_tab(t)
    b.delete(TAB, t.id)
    second_drain = b.drain(100)
    second = Receipt.of(second_drain.items)
    b.confirm_deletes(first.deletes)
    assert b.gauges()["held_entries"] == 2  # the newer delete is still held until it commits

    # a delete that is dirty again (its batch was lost meanwhile) is not forgotten either
    b.redirty_receipt(second)
    b.confirm_deletes(second.deletes)
    assert b.gauges()["held_entries"] == 2
    resent = b.drain(100)
    assert [(i.key, i.version, i.deleted) for i in resent.items] == [
        ((TAB, t.id), i.version, True) for i in second_drain.items
    ]

    b.confirm_deletes(Receipt.of(resent.items).deletes)
    assert b.gauges()["held_entries"] == 1  # only the session
    assert b.gauges()["live_entities"] == 1
    assert not b.has_dirty() and len(b.drain(100)) == 0


def test_confirm_deletes_does_not_forget_an_entity_re_created_since() -> None:
    b = make_buffer()
    s = session()
    b.put_session(s)
    b.confirm(b.drain(100).items)
    b.delete(SESSION, s.id)
    receipt = Receipt.of(b.drain(100).items)
    again = s.model_copy(update={"name": "re-created"})
    b.put_session(again)
    b.confirm_deletes(receipt.deletes)
    (item,) = b.drain(100).items
    assert item.key == (SESSION, s.id) and not item.deleted and item.record == again
    assert b.gauges()["live_entities"] == 1


def test_lost_touches_go_again_unless_a_newer_one_is_pending() -> None:
    b = make_buffer()
    stored = uuid.uuid4()  # a session the buffer does not hold (the terminal restarted)
    at = datetime(2025, 1, 1, tzinfo=UTC)
    b.touch_session(stored, at)
    lost = b.drain(100)
    assert b.redirty_receipt(Receipt.of(lost.items), lost.touches) == 1
    assert b.drain(100).touches == lost.touches
    b.touch_session(stored, at + timedelta(seconds=5))
    assert b.redirty_receipt(Receipt.of([]), lost.touches) == 0  # the newer touch stands
    (touch,) = b.drain(100).touches
    assert touch.last_active == at + timedelta(seconds=5)
