"""Two terminals over shared sessions, tabs, panes and scrollback, delivered late, twice, out of order.

Hypothesis drives two producers (each a write-behind buffer with its own clock and origin) that
write to the same entities: one creates a tab, the other adds panes under it, deletes it, writes
scrollback to a pane it never held. Their batches travel through a "network" that delivers them
to a real PostgreSQL with the workers' applier in any order, twice, or loses them (given back to
their producer, as a failed or vanished job is); a route look-up does what the producer's flusher
does once a second (unrouted ids, asked of the database's rows and tombstones).

At the end everything is delivered. Then every producer has sent everything it accepted (nothing
held for want of a route, except writes whose parent no one ever stored), and two models agree
with the database (tests/model.py: the last writer by (version, origin), tombstones, cascades):

* fed every operation that was applied, it gives every stored row: the apply is right whatever
  the order of arrival;
* fed every write call the terminals made (with the version their clock gave it), it gives the
  tree that a restore reads (sessions, their tabs, their panes, their scrollback): no accepted
  write is lost, only moot ones (scrollback of a pane deleted at the time, what is written under
  a parent that no one stored: invisible either way).
"""

from __future__ import annotations

import base64
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule

from perth_pipeline import PaneHistoryChunk, PaneRecord, SessionRecord, TabRecord
from perth_pipeline.batch import EncodedBatch, encode_batches
from perth_pipeline.buffer import PANE, SESSION, TAB, Buffer
from perth_pipeline.clock import HybridClock
from perth_pipeline.operations import (
    BATCH_ADAPTER,
    Batch,
    HistoryAppend,
    PaneDelete,
    PaneUpsert,
    SessionDelete,
    SessionUpsert,
    TabDelete,
    TabUpsert,
)
from perth_pipeline.store import Store
from workers.applier import Applier

from ..model import Tables, Write, differences, expected_tables, origin_ranker, read_tables

SESSIONS = [UUID(int=n) for n in (1, 2)]
TAB_SESSION = {UUID(int=101): SESSIONS[0], UUID(int=102): SESSIONS[0], UUID(int=103): SESSIONS[1]}
PANE_TAB = {
    UUID(int=201): UUID(int=101),
    UUID(int=202): UUID(int=101),
    UUID(int=203): UUID(int=102),
    UUID(int=204): UUID(int=103),
}
TABS, PANES = sorted(TAB_SESSION), sorted(PANE_TAB)
T0 = datetime(2025, 6, 1, tzinfo=UTC)
ORIGINS = ("terminal-a", "terminal-b")
# DELETE, not TRUNCATE: a truncation is a file operation per table (tens of ms on some disks), and an
# example starts from empty tables dozens of times per run
_CLEAR = ";".join(
    f"DELETE FROM {t}"
    for t in ("sessions", "tabs", "panes", "pane_history", "templates", "tombstones", "template_tombstones")
)

producers = st.integers(0, 1)


@dataclass
class InFlight:
    producer: int
    encoded: EncodedBatch
    batch: Batch


class SharedEntities(RuleBasedStateMachine):
    conn: psycopg.Connection[Any]
    store: Store

    def __init__(self) -> None:
        super().__init__()
        self.conn.execute(_CLEAR)
        self.clocks = [HybridClock() for _ in ORIGINS]  # one each: a clock is not shared
        self.buffers = [
            Buffer(
                max_entities=1000,
                max_pending_history_bytes=1 << 20,
                max_json_bytes=1 << 16,
                max_chunk_bytes=1 << 16,
                clock=clock,
            )
            for clock in self.clocks
        ]
        self.network: list[InFlight] = []
        self.sent: list[Write] = []  # every operation applied (what the workers stored)
        self.accepted: list[Write] = []  # every write call, as the terminal made it
        self.now = T0
        self.applier = Applier()

    # --- what the terminals write -----------------------------------------------------------

    @rule(p=producers, sid=st.sampled_from(SESSIONS), minutes=st.integers(0, 30))
    def put_session(self, p: int, sid: UUID, minutes: int) -> None:
        # last_active is the terminals' wall clock: it never goes back (a terminal's buffer keeps the
        # highest it holds, so a lower one after another terminal's delete would not be stored)
        self.now += timedelta(minutes=minutes)
        record = SessionRecord(id=sid, name=f"s{p}", created_at=T0, last_active=self.now)
        self._write(
            p, lambda: self.buffers[p].put_session(record), lambda v: SessionUpsert(version=v, record=record)
        )

    @rule(p=producers, tid=st.sampled_from(TABS), position=st.integers(0, 3))
    def put_tab(self, p: int, tid: UUID, position: int) -> None:
        record = TabRecord(id=tid, session_id=TAB_SESSION[tid], position=position, name=f"t{p}")
        self._write(p, lambda: self.buffers[p].put_tab(record), lambda v: TabUpsert(version=v, record=record))

    @rule(p=producers, pid=st.sampled_from(PANES), title=st.sampled_from(["", "vim", "htop"]))
    def put_pane(self, p: int, pid: UUID, title: str) -> None:
        record = PaneRecord(
            id=pid, tab_id=PANE_TAB[pid], pane_id=f"terminal_{pid.int}", pane_type="terminal", title=title
        )
        session_id = TAB_SESSION[record.tab_id]
        self._write(
            p, lambda: self.buffers[p].put_pane(record),
            lambda v: PaneUpsert(version=v, session_id=session_id, record=record),
        )  # fmt: skip

    @rule(p=producers, sid=st.sampled_from(SESSIONS))
    def delete_session(self, p: int, sid: UUID) -> None:
        self._write(
            p, lambda: self.buffers[p].delete(SESSION, sid), lambda v: SessionDelete(version=v, id=sid)
        )

    @rule(p=producers, tid=st.sampled_from(TABS))
    def delete_tab(self, p: int, tid: UUID) -> None:
        session_id = TAB_SESSION[tid]
        self._write(
            p,
            lambda: self.buffers[p].delete(TAB, tid),
            lambda v: TabDelete(version=v, id=tid, session_id=session_id),
        )

    @rule(p=producers, pid=st.sampled_from(PANES))
    def delete_pane(self, p: int, pid: UUID) -> None:
        tab_id = PANE_TAB[pid]
        self._write(
            p, lambda: self.buffers[p].delete(PANE, pid),
            lambda v: PaneDelete(version=v, id=pid, tab_id=tab_id, session_id=TAB_SESSION[tab_id]),
        )  # fmt: skip

    @rule(p=producers, pid=st.sampled_from(PANES), index=st.integers(0, 2), content=st.binary(max_size=8))
    def append(self, p: int, pid: UUID, index: int, content: bytes) -> None:
        chunk = PaneHistoryChunk(pane_id=pid, chunk_index=index, content=content)
        tab_id = PANE_TAB[pid]
        self._write(
            p, lambda: self.buffers[p].append_history(chunk),
            lambda v: HistoryAppend(
                version=v, pane_id=pid, tab_id=tab_id, session_id=TAB_SESSION[tab_id], chunk_index=index,
                raw_size=len(content), content=base64.b64encode(content),
            ),
        )  # fmt: skip

    # --- the flushers, the route look-ups, the network ------------------------------------------

    @rule(p=producers, budget=st.integers(1, 8), max_ops=st.integers(1, 4))
    def flush(self, p: int, budget: int, max_ops: int) -> None:
        self._send(p, self.buffers[p].drain(budget), max_ops)

    @rule(p=producers)
    def look_up_routes(self, p: int) -> None:
        tabs, panes = self.buffers[p].unrouted()
        if tabs or panes:
            routes = self.store.routes(tabs, panes)
            # as the producer does (PersistenceManager._resolve_routes): a pane the database knows
            # only by its tombstone is routed by it, not dropped as gone (it may be created again)
            self.buffers[p].learn_routes(routes.tabs, routes.panes)

    @precondition(lambda self: self.network)
    @rule(data=st.data(), outcome=st.sampled_from(["commit", "twice", "lost", "applied-then-lost"]))
    def deliver(self, data: st.DataObject, outcome: str) -> None:
        """Any batch in flight (not the oldest first: children may arrive before parents) ends."""
        flight = self.network.pop(data.draw(st.integers(0, len(self.network) - 1)))
        if outcome != "lost":
            self._apply(flight)
        if outcome == "twice":
            self._apply(flight)
        buffer, encoded = self.buffers[flight.producer], flight.encoded
        if outcome in ("commit", "twice"):
            buffer.confirm(encoded.items)
        else:  # failed, vanished, never enqueued: the producer sends the current state again
            buffer.redirty(encoded.items, encoded.touches, encoded.chunks)

    @precondition(lambda self: self.network)
    @rule()
    def catch_up(self) -> None:
        """The workers catch up: what is in flight is committed, oldest first."""
        while self.network:
            flight = self.network.pop(0)
            self._apply(flight)
            self.buffers[flight.producer].confirm(flight.encoded.items)

    def teardown(self) -> None:
        """Everything is delivered (in a shuffled order); then nothing is lost and the rows are right."""
        shuffle = random.Random(len(self.sent))
        for _ in range(50):
            for p, buffer in enumerate(self.buffers):
                self.look_up_routes(p)
                while buffer.has_dirty():
                    drained = buffer.drain(1000)
                    if not len(drained):
                        break
                    self._send(p, drained, 1000)
            if not self.network:
                break
            shuffle.shuffle(self.network)
            while self.network:
                flight = self.network.pop()
                self._apply(flight)
                self.buffers[flight.producer].confirm(flight.encoded.items)
        for p, buffer in enumerate(self.buffers):
            self._only_moot_writes_wait(p, buffer)
        ranker = origin_ranker(self.conn, ORIGINS)
        expected, actual = expected_tables(self.sent, ranker), read_tables(self.conn)
        assert not differences(actual, expected), differences(actual, expected)
        moot = [w for w in self.accepted if self._moot(w)]
        written = expected_tables([w for w in self.accepted if w not in moot], ranker)
        # a moot chunk may have been sent (before its pane's delete was known) or not: either is right
        either = {(w.op.pane_id, w.op.chunk_index) for w in moot}
        lost = differences(_restorable(actual, either), _restorable(written, either))
        assert not lost, lost

    def _write(self, p: int, call: Any, op: Any) -> None:
        """A write call of terminal ``p``, remembered with the version its clock gave it."""
        clock = self.clocks[p]
        before = clock.last
        call()
        # a chunk dropped at once as moot gets no version: it was written now
        version = clock.last if clock.last != before else max(time.time_ns(), before + 1)
        self.accepted.append(Write(ORIGINS[p], op(version)))

    def _moot(self, write: Write) -> bool:
        """Scrollback appended to a pane that was deleted (it, its tab or its session) and not
        created again since: its output after the close, which a producer drops at once
        (docs/producer.md, What it drops). Deleted by the terminal that appends (even if the other
        wrote the pane since: its own close decides), or by anyone after the pane had been created."""
        op = write.op
        if not isinstance(op, HistoryAppend):
            return False
        ancestors = {op.pane_id, op.tab_id, op.session_id}
        deleted, created, first_created = 0, 0, None  # before the chunk, by anyone
        own_deleted, own_created = 0, 0  # before the chunk, by the terminal that appends
        for other in self.accepted:
            v, own = other.op.version, other.origin == write.origin
            if v >= op.version:
                continue
            if isinstance(other.op, SessionDelete | TabDelete | PaneDelete) and other.op.id in ancestors:
                deleted = max(deleted, v)
                own_deleted = max(own_deleted, v) if own else own_deleted
            elif isinstance(other.op, PaneUpsert) and other.op.record.id == op.pane_id:
                created = max(created, v)
                own_created = max(own_created, v) if own else own_created
                first_created = v if first_created is None else min(first_created, v)
        after_its_life = first_created is not None and first_created < deleted and created < deleted
        return after_its_life or own_deleted > own_created

    def _only_moot_writes_wait(self, p: int, buffer: Buffer) -> None:
        # What may still wait for a route is only what no one ever stored a parent for (it would be
        # invisible if sent): a tab id with neither row nor tombstone, a pane with neither.
        tabs, panes = buffer.unrouted()
        for tab_id in tabs:
            assert self.conn.execute("SELECT 1 FROM tabs WHERE id = %s", (tab_id,)).fetchone() is None, p
            assert self._tombstone(tab_id) is None, (p, tab_id)
        for pane_id in panes:
            assert self.conn.execute("SELECT 1 FROM panes WHERE id = %s", (pane_id,)).fetchone() is None, p
            assert self._tombstone(pane_id) is None, (p, pane_id)
        if not tabs and not panes:
            assert buffer.min_unsent_seq() is None, (p, buffer.gauges())

    def _tombstone(self, ident: UUID) -> Any:
        row = self.conn.execute(
            "SELECT 1 FROM tombstones WHERE id = %s AND (tab_id IS NOT NULL OR kind = 'tab')", (ident,)
        )
        return row.fetchone()

    def _send(self, p: int, drained: Any, max_ops: int) -> None:
        if not len(drained):
            return
        for encoded in encode_batches(drained, origin=ORIGINS[p], max_ops=max_ops, max_bytes=1 << 20):
            batch = BATCH_ADAPTER.validate_python(json.loads(encoded.data)[2][0])  # the workers' validation
            self.network.append(InFlight(p, encoded, batch))

    def _apply(self, flight: InFlight) -> None:
        self.applier.apply(self.conn, flight.batch)
        self.sent.extend(Write(flight.batch.origin, op) for op in flight.batch.ops)


def _restorable(tables: Tables, ignored_chunks: set[Any]) -> Tables:
    """What a restore reads: sessions, the tabs of those, the panes of those, their scrollback."""
    sessions = tables["sessions"]
    tabs = {k: r for k, r in tables["tabs"].items() if r[0] in sessions}
    panes = {k: r for k, r in tables["panes"].items() if r[0] in tabs}
    history = {k: r for k, r in tables["pane_history"].items() if k[0] in panes and k not in ignored_chunks}
    return {"sessions": sessions, "tabs": tabs, "panes": panes, "pane_history": history}


@pytest.fixture
def machine(pg: psycopg.Connection[Any], database_url: str) -> Iterator[type[SharedEntities]]:
    store = Store(database_url)
    SharedEntities.conn = pg
    SharedEntities.store = store
    try:
        yield SharedEntities
    finally:
        store.close()


# About 10 s when it passes (0.05 s an example). When it fails, Hypothesis shrinks for up to 300 s
# (its own bound) before it prints the example: the timeout lets it finish. Thirty steps are enough
# to reach every failure it has found so far, and keep the shrinking within that bound.
@pytest.mark.timeout(400)
def test_two_terminals_sharing_entities_lose_nothing_in_any_order(machine: type[SharedEntities]) -> None:
    case = machine.TestCase()
    case.settings = settings(
        max_examples=200,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    case.runTest()


# --- cases Hypothesis found (or might take long to find), replayed every run ----------------------

S1, T101, P201, P204 = SESSIONS[0], TABS[0], PANES[0], PANES[3]


def test_a_tab_created_again_after_a_delete_of_unknown_route_keeps_its_session(
    machine: type[SharedEntities],
) -> None:
    state = machine()
    state.delete_tab(p=0, tid=T101)  # a tab this terminal never held: the delete waits for its session
    state.flush(p=0, budget=1, max_ops=1)
    state.put_tab(p=0, tid=T101, position=0)  # created again: its record names its session
    state.look_up_routes(p=0)  # the database knows nothing of it yet
    state.put_tab(p=0, tid=T101, position=1)  # an update of the tab it holds (not InvalidRecord)
    state.put_session(p=0, sid=S1, minutes=0)
    state.teardown()  # and the tab is stored


def test_scrollback_of_a_pane_another_terminal_created_again_is_not_dropped(
    machine: type[SharedEntities],
) -> None:
    state = machine()
    state.put_session(p=0, sid=S1, minutes=0)
    state.put_tab(p=0, tid=T101, position=0)
    state.put_pane(p=0, pid=P201, title="")
    state.delete_pane(p=0, pid=P201)
    state.flush(p=0, budget=8, max_ops=8)
    state.catch_up()  # the database: a tombstone of the pane, no row
    state.put_pane(p=0, pid=P201, title="again")  # created again; its batch is not applied yet
    state.append(p=1, pid=P201, index=0, content=b"x")  # written after the re-creation
    state.flush(p=1, budget=8, max_ops=8)  # the chunk waits for its route
    state.look_up_routes(p=1)  # the tombstone is older than the chunk: not a reason to drop it
    state.teardown()


def test_a_chunk_of_a_pane_no_one_stored_holds_back_no_other_pane(machine: type[SharedEntities]) -> None:
    state = machine()
    state.put_session(p=0, sid=SESSIONS[1], minutes=0)
    state.put_tab(p=0, tid=PANE_TAB[P204], position=0)
    state.put_pane(p=0, pid=P204, title="")
    state.flush(p=0, budget=8, max_ops=8)
    state.catch_up()
    state.append(p=1, pid=P201, index=0, content=b"lost pane")  # its pane is never stored
    state.append(p=1, pid=P204, index=0, content=b"x")  # a pane the database holds
    for _ in range(3):
        state.flush(p=1, budget=8, max_ops=8)
        state.look_up_routes(p=1)
    state.teardown()
