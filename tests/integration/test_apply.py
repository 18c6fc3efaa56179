"""The apply function itself, on a real PostgreSQL: idempotent, commutative, tombstones, any order.

Each test applies batches in several orders (and twice) and checks that every
order gives the same rows, and the rows the versioned model says
(tests/model.py), never what arrival order would suggest.
"""

from __future__ import annotations

import base64
import itertools
import threading
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from perth_pipeline.operations import (
    Batch,
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
from perth_pipeline.store import Store, connect
from workers.applier import Applier

from ..helpers import wait_for
from ..model import Tables, Write, differences, expected_tables, origin_ranker, read_tables

T0 = datetime(2025, 1, 1, tzinfo=UTC)
_TRUNCATE = ";".join(
    f"DELETE FROM {t}"
    for t in ("sessions", "tabs", "panes", "pane_history", "templates", "tombstones", "template_tombstones")
)

S1, S2 = uuid.UUID(int=0x51), uuid.UUID(int=0x52)
T1, T2, T3 = uuid.UUID(int=0x71), uuid.UUID(int=0x72), uuid.UUID(int=0x73)
P1, P2, P3 = uuid.UUID(int=0x91), uuid.UUID(int=0x92), uuid.UUID(int=0x93)
TAB_SESSION = {T1: S1, T2: S1, T3: S2}
PANE_TAB = {P1: T1, P2: T1, P3: T3}


def at(version: int) -> datetime:
    # last_active follows the version, as it does for a terminal (both come from its clock)
    return T0 + timedelta(seconds=version)


def s_up(v: int, sid: UUID = S1, name: str = "session") -> SessionUpsert:
    record = SessionRecord(id=sid, name=name, created_at=T0, last_active=at(v))
    return SessionUpsert(version=v, record=record)


def t_up(v: int, tid: UUID = T1, name: str = "tab", position: int = 0) -> TabUpsert:
    record = TabRecord(
        id=tid, session_id=TAB_SESSION[tid], position=position, name=name, layout_blob={"v": v}
    )
    return TabUpsert(version=v, record=record)


def p_up(v: int, pid: UUID = P1, title: str = "pane") -> PaneUpsert:
    tid = PANE_TAB[pid]
    record = PaneRecord(
        id=pid, tab_id=tid, pane_id=f"terminal_{pid.int}", pane_type="terminal", title=title,
        component_state={"v": v}, cwd="/home", command=None,
    )  # fmt: skip
    return PaneUpsert(version=v, session_id=TAB_SESSION[tid], record=record)


def h_app(v: int, pid: UUID = P1, index: int = 0, content: bytes = b"$ ls\n") -> HistoryAppend:
    tid = PANE_TAB[pid]
    return HistoryAppend(
        version=v, pane_id=pid, tab_id=tid, session_id=TAB_SESSION[tid], chunk_index=index,
        raw_size=len(content), content=base64.b64encode(content),
    )  # fmt: skip


def s_del(v: int, sid: UUID = S1) -> SessionDelete:
    return SessionDelete(version=v, id=sid)


def t_del(v: int, tid: UUID = T1) -> TabDelete:
    return TabDelete(version=v, id=tid, session_id=TAB_SESSION[tid])


def p_del(v: int, pid: UUID = P1) -> PaneDelete:
    tid = PANE_TAB[pid]
    return PaneDelete(version=v, id=pid, tab_id=tid, session_id=TAB_SESSION[tid])


def tpl_up(v: int, name: str = "dev") -> TemplateUpsert:
    record = TemplateRecord(id=uuid.UUID(int=v), name=name, definition={"v": v})
    return TemplateUpsert(version=v, record=record)


def tpl_del(v: int, name: str = "dev") -> TemplateDelete:
    return TemplateDelete(version=v, name=name)


def batch(origin: str, *ops: Any) -> Batch:
    return Batch(id=uuid.uuid4(), origin=origin, created_at=T0, ops=list(ops))


def writes_of(batches: Sequence[Batch]) -> list[Write]:
    return [Write(b.origin, op) for b in batches for op in b.ops]


@pytest.fixture
def apply_in(pg: psycopg.Connection[Any]) -> Iterator[Any]:
    applier = Applier()

    def run(batches: Sequence[Batch]) -> Tables:
        pg.execute(_TRUNCATE)
        for b in batches:
            applier.apply(pg, b)
        return read_tables(pg)

    yield run


def model(pg: psycopg.Connection[Any], batches: Sequence[Batch]) -> Tables:
    return expected_tables(writes_of(batches), origin_ranker(pg, [b.origin for b in batches]))


def assert_every_order_gives_the_model(
    pg: psycopg.Connection[Any], apply_in: Any, batches: Sequence[Batch]
) -> Tables:
    expected = model(pg, batches)
    for order in itertools.permutations(batches):
        actual = apply_in(order)
        assert not differences(actual, expected), (
            [b.ops[0].op for b in order],
            differences(actual, expected),
        )
    return expected


def test_the_same_batch_twice_gives_the_same_rows(pg: psycopg.Connection[Any], apply_in: Any) -> None:
    b = batch("a", s_up(1), t_up(2), p_up(3), h_app(4), tpl_up(5), p_del(6, P2))
    once = apply_in([b])
    assert apply_in([b, b]) == once
    assert not differences(once, model(pg, [b]))
    assert set(once["sessions"]) == {S1} and set(once["panes"]) == {P1}


def test_two_batches_in_both_orders_give_the_same_rows(pg: psycopg.Connection[Any], apply_in: Any) -> None:
    older = batch("a", s_up(1, name="old"), t_up(2, name="old"), p_up(3, title="old"), tpl_up(4))
    newer = batch("a", s_up(5, name="new"), t_up(6, name="new"), p_up(7, title="new"), tpl_up(8))
    expected = assert_every_order_gives_the_model(pg, apply_in, [older, newer])
    assert expected["sessions"][S1][0] == "new"
    assert expected["tabs"][T1][2] == "new"
    assert expected["panes"][P1][4] == "new"
    assert expected["templates"]["dev"][1] == {"v": 8}


def test_a_child_batch_before_its_parent(
    pg: psycopg.Connection[Any], apply_in: Any, database_url: str
) -> None:
    parent = batch("a", s_up(1))
    children = batch("a", t_up(2), p_up(3), h_app(4))
    # the children alone are stored, but no top-down read reaches them without their session
    apply_in([children])
    store = Store(database_url)
    try:
        assert store.session(S1) is None
        assert [r for r, _ in store.sessions()] == []
    finally:
        store.close()
    expected = assert_every_order_gives_the_model(pg, apply_in, [parent, children])
    assert set(expected["tabs"]) == {T1} and set(expected["pane_history"]) == {(P1, 0)}


def test_a_delete_before_the_create(pg: psycopg.Connection[Any], apply_in: Any) -> None:
    create = batch("a", s_up(1), t_up(2), p_up(3), h_app(4), tpl_up(5))
    delete = batch("a", s_del(10), tpl_del(11))
    expected = assert_every_order_gives_the_model(pg, apply_in, [create, delete])
    for table in ("sessions", "tabs", "panes", "pane_history", "templates"):
        assert expected[table] == {}, table
    assert expected["tombstones"] == {S1: ("session", 10, "a")}
    # the delete first: the late, older create must not bring anything back
    assert apply_in([delete, create]) == expected
    # a later create does come back
    recreate = batch("a", s_up(12, name="again"))
    rows = apply_in([delete, create, recreate])
    assert rows["sessions"][S1][0] == "again" and rows["tabs"] == {}


def test_a_delete_and_a_recreation_in_one_batch(pg: psycopg.Connection[Any], apply_in: Any) -> None:
    before = batch("a", s_up(1, name="first"), t_up(2, T1), t_up(3, T2), p_up(4), h_app(5))
    # what a producer sends for delete_session + create_session of the same id between two flushes
    again = batch("a", s_del(10), s_up(11, name="second"), t_up(12, T2, name="kept"))
    expected = assert_every_order_gives_the_model(pg, apply_in, [before, again])
    assert expected["sessions"][S1][0] == "second"
    assert set(expected["tabs"]) == {T2} and expected["tabs"][T2][2] == "kept"
    assert expected["panes"] == {} and expected["pane_history"] == {}
    # and split over batches, in any order, the same
    split = [
        batch("a", s_del(10)),
        batch("a", s_up(11, name="second")),
        batch("a", t_up(12, T2, name="kept")),
    ]
    assert_every_order_gives_the_model(pg, apply_in, [before, *split])
    assert apply_in([*split, before]) == expected


def test_two_origins_writing_the_same_entity(pg: psycopg.Connection[Any], apply_in: Any) -> None:
    # equal versions: the origin breaks the tie, in every order
    a = batch("producer-a", s_up(5, name="from a"), t_up(6, name="from a"), p_up(7, title="from a"))
    b = batch("producer-b", s_up(5, name="from b"), t_up(6, name="from b"), p_up(7, title="from b"))
    expected = assert_every_order_gives_the_model(pg, apply_in, [a, b])
    winner = max(["producer-a", "producer-b"], key=origin_ranker(pg, ["producer-a", "producer-b"]))
    assert expected["sessions"][S1][-1] == winner
    assert expected["sessions"][S1][0] == f"from {winner[-1]}"
    # a higher version wins whatever its origin
    later = batch("producer-a", p_up(9, title="later from a"))
    rows = assert_every_order_gives_the_model(pg, apply_in, [a, b, later])
    assert rows["panes"][P1][4] == "later from a"
    # a delete from one origin kills the other origin's older writes, not its newer ones
    kill = batch("producer-b", t_del(8))
    rows = assert_every_order_gives_the_model(pg, apply_in, [a, b, later, kill])
    assert rows["tabs"] == {} and set(rows["panes"]) == {P1}  # the pane was written after the delete


def test_touches_only_move_last_active_forward(pg: psycopg.Connection[Any], apply_in: Any) -> None:
    create = batch("a", s_up(5))
    late = at(5) + timedelta(hours=1)
    touch = batch("b", SessionTouch(version=1, id=S1, last_active=late))
    stale = batch("b", SessionTouch(version=2, id=S1, last_active=T0))
    for order in ([create, touch, stale], [create, stale, touch], [create, touch, touch]):
        rows = apply_in(order)
        assert rows["sessions"][S1][3] == late
        assert rows["sessions"][S1][4:] == (5, "a")  # a touch changes no version and no other field
    # a touch of a session that is not stored creates nothing
    assert apply_in([touch])["sessions"] == {}


def test_concurrent_appliers_converge_to_the_model(pg: psycopg.Connection[Any], database_url: str) -> None:
    """Batches of the same sessions applied at once on four connections: the session locks hold."""
    batches = []
    version = itertools.count(1)
    for round_ in range(30):
        origin = "ab"[round_ % 2]
        ops: list[Any] = [s_up(next(version), S1), t_up(next(version), T1), t_up(next(version), T2)]
        ops += [p_up(next(version), P1), h_app(next(version), P1, round_ % 4), p_up(next(version), P2)]
        if round_ % 3 == 0:
            ops.append([t_del, p_del, s_del][round_ % 9 // 3](next(version)))
        batches.append(batch(origin, *ops))
    pg.execute(_TRUNCATE)
    errors: list[BaseException] = []

    def work(share: list[Batch]) -> None:
        applier = Applier()
        with connect(database_url) as conn:
            for b in share:
                try:
                    applier.apply(conn, b)
                except BaseException as exc:  # reported by the main thread
                    errors.append(exc)

    threads = [threading.Thread(target=work, args=(batches[n::4],)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)
    expected = model(pg, batches)
    assert not differences(read_tables(pg), expected)


def test_a_cascade_waits_for_a_concurrent_batch_of_the_same_session(
    pg: psycopg.Connection[Any], database_url: str
) -> None:
    """The session lock: a delete must not miss a child that a concurrent transaction is inserting.

    Batch A inserts pane P (version 5, below the delete), then waits on a scrollback row the
    test holds, its insert uncommitted. Batch B deletes P's tab (version 10). Without the lock,
    B's cascade cannot see A's uncommitted pane, commits, and A then commits a pane below
    its tab's tombstone. With it, B waits for A and removes the pane.
    """
    pg.execute(_TRUNCATE)
    with connect(database_url) as conn:
        Applier().apply(conn, batch("a", s_up(1), t_up(2), h_app(3, P1, 0)))
    holder = psycopg.connect(database_url)
    holder.execute("SELECT 1 FROM pane_history WHERE pane_id = %s AND chunk_index = 0 FOR UPDATE", (P1,))
    done: dict[str, BaseException | None] = {}

    def run(name: str, b: Batch) -> None:
        with connect(database_url) as conn:
            conn.execute("SELECT set_config('application_name', %s, false)", (f"perth-test-{name}",))
            try:
                Applier().apply(conn, b)
                done[name] = None
            except BaseException as exc:  # reported by the main thread
                done[name] = exc

    def waiting(name: str) -> bool:
        row = pg.execute(
            "SELECT wait_event_type FROM pg_stat_activity WHERE application_name = %s",
            (f"perth-test-{name}",),
        ).fetchone()
        return row is not None and row[0] == "Lock"

    a = threading.Thread(target=run, args=("a", batch("a", p_up(5, P1), h_app(6, P1, 0))))
    b = threading.Thread(target=run, args=("b", batch("b", t_del(10, T1))))
    try:
        a.start()
        wait_for(lambda: waiting("a"), timeout=30, what="batch A to hold its pane and wait")
        b.start()
        wait_for(lambda: "b" in done or waiting("b"), timeout=30, what="batch B to finish or wait")
    finally:
        holder.rollback()
        holder.close()
        a.join(timeout=30)
        b.join(timeout=30)
    assert done == {"a": None, "b": None}
    rows = read_tables(pg)
    assert rows["panes"] == {} and rows["pane_history"] == {}  # both written below the tab's delete
    assert rows["tombstones"] == {T1: ("tab", 10, "b")}


def test_applying_after_a_reconnect_recreates_the_staging_tables(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new connection often gets the id() of the one it replaces: the applier must not be fooled.

    (It was: keyed by id(), it skipped creating its temporary tables on such a connection, and the
    database's "relation does not exist" sent the batch to the failed registry as refused.) Every
    id() is made equal here, as after such a reuse.
    """
    import workers.applier

    monkeypatch.setattr(workers.applier, "id", lambda obj: 1, raising=False)
    applier = Applier()
    for n in (1, 2, 3):
        with connect(database_url) as conn:
            applier.apply(conn, batch("a", s_up(n)))


# --- property: any split into batches, any order, duplicates: the model's rows ----------------------

_ENTITY_OPS = [
    *[lambda v, s=s: s_up(v, s) for s in (S1, S2)],
    *[lambda v, s=s: s_del(v, s) for s in (S1, S2)],
    *[lambda v, t=t: t_up(v, t, position=v % 3) for t in (T1, T2, T3)],
    *[lambda v, t=t: t_del(v, t) for t in (T1, T2, T3)],
    *[lambda v, p=p: p_up(v, p, title=f"t{v}") for p in (P1, P2, P3)],
    *[lambda v, p=p: p_del(v, p) for p in (P1, P2, P3)],
    *[lambda v, p=p, i=i: h_app(v, p, i, b"x" * v) for p in (P1, P3) for i in (0, 1)],
    *[lambda v, n=n: tpl_up(v, n) for n in ("dev", "ops")],
    *[lambda v, n=n: tpl_del(v, n) for n in ("dev", "ops")],
]


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[Batch], list[Batch]]:
    """Writes of two producers (versions unique per producer, tied across), cut into batches, two orders."""
    writes = draw(
        st.lists(
            st.tuples(st.sampled_from("ab"), st.integers(1, 40), st.integers(0, len(_ENTITY_OPS) - 1)),
            min_size=1,
            max_size=30,
            unique_by=lambda w: (w[0], w[1]),
        )
    )
    batches: list[Batch] = []
    for origin in "ab":
        ops = [_ENTITY_OPS[k](v) for o, v, k in writes if o == origin]
        while ops:
            size = draw(st.integers(1, len(ops)))
            batches.append(batch(origin, *ops[:size]))
            ops = ops[size:]
    first = draw(st.permutations(batches))
    again = draw(st.permutations(batches))
    repeated = draw(st.lists(st.sampled_from(batches), max_size=3))
    return list(first), list(again) + repeated


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=histories())
def test_any_order_of_any_split_gives_the_models_rows(
    pg: psycopg.Connection[Any], apply_in: Any, history: tuple[list[Batch], list[Batch]]
) -> None:
    first, second = history
    expected = model(pg, first)
    one = apply_in(first)
    assert not differences(one, expected), differences(one, expected)
    assert apply_in(second) == one


def test_tombstones_keep_the_ancestors_of_what_was_deleted_in_any_order(
    pg: psycopg.Connection[Any], apply_in: Any
) -> None:
    # a producer that never held a deleted tab or pane learns from its tombstone where it lived
    first = batch("a", t_del(10, T1), p_del(11, P3), s_del(12, S2))
    again = batch("b", t_del(20, T1), p_del(5, P3))
    for order in ([first, again], [again, first], [first, first, again]):
        apply_in(order)
        rows = pg.execute(
            "SELECT id, kind, version, tab_id, session_id FROM tombstones ORDER BY id"
        ).fetchall()
        assert rows == [
            (S2, "session", 12, None, S2),
            (T1, "tab", 20, None, S1),
            (P3, "pane", 11, T3, S2),
        ]


def test_a_tombstone_without_ancestors_takes_them_from_any_delete_of_its_id(
    pg: psycopg.Connection[Any], apply_in: Any
) -> None:
    # tombstones written before schema migration 2 (or by an older cleanup) have no ancestors: a
    # delete of the same id arriving later fills them, even an older one, and changes nothing else
    for order in ([], [batch("b", t_del(20, T1), p_del(5, P3))]):
        apply_in(order)
        pg.execute(
            "INSERT INTO tombstones (id, kind, version, origin, deleted_at) VALUES "
            "(%s, 'tab', 15, 'z', now() - interval '3 days'), "
            "(%s, 'pane', 11, 'z', now() - interval '3 days') "
            "ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version, origin = 'z', "
            "tab_id = NULL, session_id = NULL, deleted_at = now() - interval '3 days'",
            (T1, P3),
        )
        late = batch("a", t_del(10, T1), p_del(11, P3))
        for _ in range(2):  # once, and delivered again
            Applier().apply(pg, late)
        rows = pg.execute(
            "SELECT id, kind, version, origin, tab_id, session_id, deleted_at < now() - interval '2 days' "
            "FROM tombstones ORDER BY id"
        ).fetchall()
        assert rows == [(T1, "tab", 15, "z", None, S1, True), (P3, "pane", 11, "z", T3, S2, True)]


def test_every_batch_is_activity_of_the_sessions_it_writes_under(pg: psycopg.Connection[Any]) -> None:
    applier = Applier()
    applier.apply(pg, batch("a", s_up(1, S1), s_up(1, S2), t_up(2, T1), t_up(2, T3), p_up(3, P1)))
    # a terminal that never touches its sessions: only pane, scrollback and delete writes follow
    for later in (
        batch("a", p_up(4, P1, title="typing")),
        batch("a", h_app(5, P1)),
        batch("a", p_del(6, P3)),  # under S2 (the pane was never stored: still a write)
    ):
        pg.execute("UPDATE sessions SET activity_at = now() - interval '40 days', last_active = %s", (T0,))
        applier.apply(pg, later)
        raised = {
            r[0]
            for r in pg.execute("SELECT id FROM sessions WHERE activity_at > now() - interval '1 minute'")
        }
        assert raised == {later.ops[0].session_id}
        assert pg.execute("SELECT DISTINCT last_active FROM sessions").fetchall() == [(T0,)]
    # within a minute of the last raise, batches leave the session row alone (no new row version)
    applier.apply(pg, batch("a", p_up(7, P1, title="more"), p_del(9, P3)))
    before = pg.execute("SELECT id, xmin::text, activity_at FROM sessions ORDER BY id").fetchall()
    applier.apply(pg, batch("a", p_up(10, P1, title="again"), h_app(11, P1, index=1), p_del(12, P3)))
    assert pg.execute("SELECT id, xmin::text, activity_at FROM sessions ORDER BY id").fetchall() == before


def test_a_batch_waiting_on_another_raise_of_activity_skips_the_row(
    pg: psycopg.Connection[Any], database_url: str
) -> None:
    # two batches of one session share its lock: the second to raise its activity waits for the
    # first's row lock, then finds the value raised and leaves the row alone (no deadlock, no error)
    Applier().apply(pg, batch("a", s_up(1, S1), t_up(2, T1), p_up(3, P1)))
    pg.execute("UPDATE sessions SET activity_at = now() - interval '40 days'")
    other = psycopg.connect(database_url)  # stands for the first batch, mid-transaction
    other.execute("UPDATE sessions SET activity_at = now() WHERE id = %s RETURNING activity_at", (S1,))
    done: dict[str, BaseException | None] = {}

    def run() -> None:
        with connect(database_url) as conn:
            conn.execute("SELECT set_config('application_name', 'perth-test-raise', false)")
            try:
                Applier().apply(conn, batch("b", p_up(4, P1, title="later")))
                done["b"] = None
            except BaseException as exc:  # reported by the main thread
                done["b"] = exc

    thread = threading.Thread(target=run)
    try:
        thread.start()
        wait_for(
            lambda: (
                pg.execute(
                    "SELECT wait_event_type FROM pg_stat_activity WHERE application_name = 'perth-test-raise'"
                ).fetchone()
                == ("Lock",)
            ),
            timeout=30,
            what="the batch to wait on the session row",
        )
        raised = other.execute("SELECT activity_at FROM sessions WHERE id = %s", (S1,)).fetchone()
        other.commit()
    finally:
        other.rollback()
        other.close()
        thread.join(timeout=30)
    assert done == {"b": None}
    assert pg.execute("SELECT activity_at FROM sessions WHERE id = %s", (S1,)).fetchone() == raised
    assert pg.execute("SELECT title FROM panes WHERE id = %s", (P1,)).fetchone() == ("later",)
