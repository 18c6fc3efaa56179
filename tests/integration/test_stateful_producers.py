"""Two terminals over shared sessions, tabs, panes and scrollback, delivered late, twice, out of order.

Hypothesis drives two producers (each a write-behind buffer with its own clock and origin) that
write to the same entities: one creates a tab, the other adds panes under it, deletes it, writes
scrollback to a pane it never held. Their batches travel through a "network" that delivers them
to a real PostgreSQL with the workers' applier in any order, twice, or loses them (given back to
their producer, as a failed or vanished job is); a route look-up does what the producer's flusher
does once a second (unrouted ids, asked of the database's rows and tombstones).

At the end everything is delivered. Then every producer has sent everything it accepted (nothing
held for want of a route, except writes whose parent no one ever stored), and the stored rows are
exactly what the versioned semantics give for everything sent (tests/model.py): the last writer
by (version, origin), tombstones and cascades, whatever the order of arrival.
"""

from __future__ import annotations

import json
import random
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
from perth_pipeline.records import BATCH_ADAPTER, Batch
from perth_pipeline.store import Store
from workers.applier import Applier

from ..model import Write, differences, expected_tables, origin_ranker, read_tables

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
        self.buffers = [
            Buffer(
                max_entities=1000,
                max_pending_history_bytes=1 << 20,
                max_json_bytes=1 << 16,
                max_chunk_bytes=1 << 16,
                clock=HybridClock(),
            )
            for _ in ORIGINS
        ]
        self.network: list[InFlight] = []
        self.sent: list[Write] = []
        self.applier = Applier()

    # --- what the terminals write -----------------------------------------------------------

    @rule(p=producers, sid=st.sampled_from(SESSIONS), minutes=st.integers(0, 30))
    def put_session(self, p: int, sid: UUID, minutes: int) -> None:
        when = T0 + timedelta(minutes=minutes)
        self.buffers[p].put_session(SessionRecord(id=sid, name=f"s{p}", created_at=T0, last_active=when))

    @rule(p=producers, tid=st.sampled_from(TABS), position=st.integers(0, 3))
    def put_tab(self, p: int, tid: UUID, position: int) -> None:
        record = TabRecord(id=tid, session_id=TAB_SESSION[tid], position=position, name=f"t{p}")
        self.buffers[p].put_tab(record)

    @rule(p=producers, pid=st.sampled_from(PANES), title=st.sampled_from(["", "vim", "htop"]))
    def put_pane(self, p: int, pid: UUID, title: str) -> None:
        record = PaneRecord(
            id=pid, tab_id=PANE_TAB[pid], pane_id=f"terminal_{pid.int}", pane_type="terminal", title=title
        )
        self.buffers[p].put_pane(record)

    @rule(p=producers, sid=st.sampled_from(SESSIONS))
    def delete_session(self, p: int, sid: UUID) -> None:
        self.buffers[p].delete(SESSION, sid)

    @rule(p=producers, tid=st.sampled_from(TABS))
    def delete_tab(self, p: int, tid: UUID) -> None:
        self.buffers[p].delete(TAB, tid)

    @rule(p=producers, pid=st.sampled_from(PANES))
    def delete_pane(self, p: int, pid: UUID) -> None:
        self.buffers[p].delete(PANE, pid)

    @rule(p=producers, pid=st.sampled_from(PANES), index=st.integers(0, 2), content=st.binary(max_size=8))
    def append(self, p: int, pid: UUID, index: int, content: bytes) -> None:
        self.buffers[p].append_history(PaneHistoryChunk(pane_id=pid, chunk_index=index, content=content))

    # --- the flushers, the route look-ups, the network ------------------------------------------

    @rule(p=producers, budget=st.integers(1, 8), max_ops=st.integers(1, 4))
    def flush(self, p: int, budget: int, max_ops: int) -> None:
        self._send(p, self.buffers[p].drain(budget), max_ops)

    @rule(p=producers)
    def look_up_routes(self, p: int) -> None:
        tabs, panes = self.buffers[p].unrouted()
        if tabs or panes:
            routes = self.store.routes(tabs, panes)
            self.buffers[p].learn_routes(routes.tabs, routes.panes, gone_panes=routes.gone_panes)

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


@pytest.fixture
def machine(pg: psycopg.Connection[Any], database_url: str) -> Iterator[type[SharedEntities]]:
    store = Store(database_url)
    SharedEntities.conn = pg
    SharedEntities.store = store
    try:
        yield SharedEntities
    finally:
        store.close()


def test_two_terminals_sharing_entities_lose_nothing_in_any_order(machine: type[SharedEntities]) -> None:
    case = machine.TestCase()
    case.settings = settings(
        max_examples=40,
        stateful_step_count=40,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    case.runTest()
