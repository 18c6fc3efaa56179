"""workers.applier: which advisory locks a batch takes, in what order, in which mode.

A session's key is taken exclusively when the batch deletes anything in that session (the
session, a tab, a pane), shared when it only writes rows there (upserts, touches, scrollback);
a template name's key is shared for a save, exclusive for a delete. Keys ascend, so that two
batches never wait for each other in a cycle. (The locking itself, against PostgreSQL, is in
tests/integration/test_shared_locks.py.)
"""

from __future__ import annotations

import base64
import random
import uuid
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import pytest
from hypothesis import given
from hypothesis import strategies as st

from perth_pipeline.locks import lock_key
from perth_pipeline.operations import (
    HistoryAppend,
    PaneDelete,
    PaneUpsert,
    SessionDelete,
    SessionTouch,
    SessionUpsert,
    TabDelete,
    TabUpsert,
    TemplateDelete,
    TemplateUpsert,
)
from perth_pipeline.records import PaneRecord, SessionRecord, TabRecord, TemplateRecord
from workers.reduction import reduce_batch

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def sid(high: int) -> UUID:
    """A session id whose first 8 bytes (its lock key, unsigned) are ``high``."""
    return UUID(int=(high << 64) | random.getrandbits(64))


def s_up(v: int, s: UUID) -> SessionUpsert:
    return SessionUpsert(version=v, record=SessionRecord(id=s, name="s", created_at=T0, last_active=T0))


def s_touch(v: int, s: UUID) -> SessionTouch:
    return SessionTouch(version=v, id=s, last_active=T0)


def s_del(v: int, s: UUID) -> SessionDelete:
    return SessionDelete(version=v, id=s)


def t_up(v: int, s: UUID, t: UUID | None = None) -> TabUpsert:
    record = TabRecord(id=t or uuid.uuid4(), session_id=s, position=0, name="t", layout_blob={"v": v})
    return TabUpsert(version=v, record=record)


def t_del(v: int, s: UUID) -> TabDelete:
    return TabDelete(version=v, id=uuid.uuid4(), session_id=s)


def p_up(v: int, s: UUID) -> PaneUpsert:
    record = PaneRecord(id=uuid.uuid4(), tab_id=uuid.uuid4(), pane_id="terminal_1", pane_type="terminal")
    return PaneUpsert(version=v, session_id=s, record=record)


def p_del(v: int, s: UUID) -> PaneDelete:
    return PaneDelete(version=v, id=uuid.uuid4(), tab_id=uuid.uuid4(), session_id=s)


def h_app(v: int, s: UUID) -> HistoryAppend:
    return HistoryAppend(
        version=v, pane_id=uuid.uuid4(), tab_id=uuid.uuid4(), session_id=s, chunk_index=0,
        raw_size=1, content=base64.b64encode(b"x"),
    )  # fmt: skip


def tpl_up(v: int, name: str) -> TemplateUpsert:
    return TemplateUpsert(version=v, record=TemplateRecord(id=uuid.uuid4(), name=name, definition={}))


def tpl_del(v: int, name: str) -> TemplateDelete:
    return TemplateDelete(version=v, name=name)


def modes(ops: list[Any]) -> dict[int, bool]:
    keys, exclusive = reduce_batch(ops).lock_keys()
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert len(exclusive) == len(keys)
    return dict(zip(keys, exclusive, strict=True))


UPSERT_ONLY = {
    "session upsert": s_up,
    "touch": s_touch,
    "tab upsert": t_up,
    "pane upsert": p_up,
    "history": h_app,
}
DELETES = {"session delete": s_del, "tab delete": t_del, "pane delete": p_del}


@pytest.mark.parametrize("make", UPSERT_ONLY.values(), ids=UPSERT_ONLY.keys())
def test_a_session_only_written_to_is_locked_shared(make: Any) -> None:
    s = sid(0x1234)
    assert modes([make(1, s), make(2, s)]) == {lock_key(s): False}


@pytest.mark.parametrize("make", DELETES.values(), ids=DELETES.keys())
def test_a_session_something_is_deleted_in_is_locked_exclusively(make: Any) -> None:
    s = sid(0x1234)
    assert modes([make(5, s)]) == {lock_key(s): True}
    # with upserts of it around, in either order: still exclusive
    assert modes([s_up(1, s), t_up(2, s), make(5, s), p_up(6, s), h_app(7, s)]) == {lock_key(s): True}
    assert modes([make(5, s), s_touch(6, s), t_up(7, s)]) == {lock_key(s): True}


def test_each_session_has_its_own_mode_and_keys_ascend_as_signed_integers() -> None:
    # first 8 bytes >= 0x80...: a negative key, which sorts before every positive one
    high, low, mid = sid(0xFFFF_0000_0000_0001), sid(0x0000_0000_0000_0002), sid(0x7FFF_FFFF_FFFF_FFFF)
    negative = sid(0x8000_0000_0000_0000)
    ops = [t_up(1, low), p_del(2, high), h_app(3, mid), s_touch(4, negative), t_del(5, negative)]
    keys, exclusive = reduce_batch(ops).lock_keys()
    assert lock_key(negative) < lock_key(high) < 0 < lock_key(low) < lock_key(mid)
    assert keys == [lock_key(negative), lock_key(high), lock_key(low), lock_key(mid)]
    assert exclusive == [True, True, False, False]


def test_a_sessions_key_is_the_first_8_bytes_of_its_id_signed() -> None:
    s = UUID("fedcba98-7654-3210-0123-456789abcdef")
    (key,), _ = reduce_batch([s_up(1, s)]).lock_keys()
    assert key == lock_key(s) == int.from_bytes(bytes.fromhex("fedcba9876543210"), "big", signed=True)


def test_two_sessions_sharing_a_key_take_it_once_exclusively_if_either_deletes() -> None:
    a, b = sid(0x42), sid(0x42)
    assert a != b and lock_key(a) == lock_key(b)
    assert modes([s_up(1, a), t_up(2, b)]) == {lock_key(a): False}
    assert modes([s_up(1, a), t_del(2, b)]) == {lock_key(a): True}
    assert modes([p_del(1, a), t_up(2, b)]) == {lock_key(a): True}


def test_templates_upserted_shared_deleted_exclusively() -> None:
    assert modes([tpl_up(1, "dev")]) == {lock_key("dev"): False}
    assert modes([tpl_del(1, "dev")]) == {lock_key("dev"): True}
    assert modes([tpl_up(1, "dev"), tpl_del(2, "dev")]) == {lock_key("dev"): True}
    assert modes([tpl_del(2, "dev"), tpl_up(1, "dev")]) == {lock_key("dev"): True}
    assert modes([tpl_up(1, "dev"), tpl_del(2, "ops")]) == {lock_key("dev"): False, lock_key("ops"): True}


def test_sessions_and_templates_together() -> None:
    s = sid(0x99)
    got = modes([tpl_up(1, "dev"), t_up(2, s), tpl_del(3, "old")])
    assert got == {lock_key(s): False, lock_key("dev"): False, lock_key("old"): True}
    assert lock_key("dev") != lock_key(s)  # a template name never takes a session's key by its text
    assert lock_key(str(s)) != lock_key(s)


_KINDS = [*UPSERT_ONLY.values(), *DELETES.values()]


@given(
    st.lists(
        st.tuples(st.integers(0, 4), st.sampled_from(range(len(_KINDS)))),
        min_size=1,
        max_size=30,
    ),
    st.randoms(use_true_random=False),
)
def test_any_batch_locks_each_of_its_sessions_exclusively_iff_it_deletes_in_it(
    picks: list[tuple[int, int]], rnd: random.Random
) -> None:
    sessions = [UUID(int=rnd.getrandbits(128)) for _ in range(5)]
    ops = [_KINDS[kind](v + 1, sessions[s]) for v, (s, kind) in enumerate(picks)]
    deleting = {sessions[s] for s, kind in picks if _KINDS[kind] in DELETES.values()}
    expected: dict[int, bool] = {}
    for s, _ in picks:
        key = lock_key(sessions[s])
        expected[key] = expected.get(key, False) or sessions[s] in deleting
    rnd.shuffle(ops)
    assert modes(ops) == expected
