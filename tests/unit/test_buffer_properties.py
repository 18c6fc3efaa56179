"""Property tests of the write-behind buffer (docs/design.md, rules 2 and 3).

Hypothesis drives a terminal through any sequence of creates, updates, deletes,
re-creations, touches and scrollback chunks, interleaved with flushes whose
batches are committed, committed twice, committed out of order, or lost (failed,
vanished, never enqueued: given back with ``redirty``). What the buffer sent is
encoded as the wire format, parsed back by the workers' models and applied to a
model of the database that follows ``perth_pipeline/sql/apply.sql`` (versions,
tombstones, cascades by version). Once everything is delivered, the stored rows
equal the terminal's final state.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from perth_pipeline import InvalidRecord, PaneHistoryChunk, PaneRecord, SessionRecord, TabRecord
from perth_pipeline.batch import EncodedBatch, encode_batches
from perth_pipeline.buffer import PANE, SESSION, TAB, TEMPLATE, Buffer
from perth_pipeline.operations import (
    BATCH_ADAPTER,
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
from perth_pipeline.records import TemplateRecord

SESSIONS = [UUID(int=n) for n in (1, 2)]
TABS = [UUID(int=n) for n in (101, 102)]
PANES = [UUID(int=n) for n in (201, 202)]
TEMPLATES = ["dev", "ops"]
TIMES = [datetime(2024, 5, 1, tzinfo=UTC) + timedelta(minutes=m) for m in (0, 7, 30, 90)]

# A session, tab and pane stored by an earlier run of the terminal: the buffer does not hold
# them, it only knows their ancestors (as after restore_tabs / restore_panes).
OLD_SESSION, OLD_TAB, OLD_PANE = UUID(int=9), UUID(int=109), UUID(int=209)
STORED_VERSION = 1000


def _newer(version: int, row: dict[str, Any] | None) -> bool:
    return row is None or row["version"] < version


@dataclass
class StoredModel:
    """The database after apply.sql, reduced to what decides the rows (one producer: no origins)."""

    sessions: dict[UUID, dict[str, Any]] = field(default_factory=dict)
    tabs: dict[UUID, dict[str, Any]] = field(default_factory=dict)
    panes: dict[UUID, dict[str, Any]] = field(default_factory=dict)
    history: dict[tuple[UUID, int], dict[str, Any]] = field(default_factory=dict)
    templates: dict[str, dict[str, Any]] = field(default_factory=dict)
    tombstones: dict[UUID, int] = field(default_factory=dict)
    template_tombstones: dict[str, int] = field(default_factory=dict)

    def _dead(self, version: int, *ids: UUID) -> bool:
        return any(self.tombstones.get(i, 0) > version for i in ids)

    def apply(self, ops: list[Any]) -> None:
        """One batch, as the worker applies it: per key the highest version, deletes first."""
        deletes, template_deletes, upserts = _reduce(ops)
        for entity_id, (kind, version) in deletes.items():
            self._delete(kind, entity_id, version)
        for op in upserts:
            if not isinstance(op, TemplateUpsert):
                getattr(self, f"_{type(op).__name__}")(op)
        for name, version in template_deletes.items():
            self.template_tombstones[name] = max(self.template_tombstones.get(name, 0), version)
            if self.templates.get(name, {"version": version})["version"] < version:
                del self.templates[name]
        for op in upserts:
            if isinstance(op, TemplateUpsert):
                name = op.record.name
                if self.template_tombstones.get(name, 0) <= op.version and _newer(
                    op.version, self.templates.get(name)
                ):
                    self.templates[name] = {"record": op.record, "version": op.version}

    def _delete(self, kind: str, entity_id: UUID, version: int) -> None:
        """The tombstone, and the cascade by version: rows written below it, under it, go."""
        self.tombstones[entity_id] = max(self.tombstones.get(entity_id, 0), version)
        parent_field = {"session": "session_id", "tab": "tab_id", "pane": "id"}[kind]
        for table in (self.sessions, self.tabs, self.panes):
            for key in [k for k, row in table.items() if row["version"] < version]:
                if key == entity_id or table[key].get(parent_field) == entity_id:
                    del table[key]
        for key in [k for k, row in self.history.items() if row["version"] < version]:
            if entity_id in (key[0], self.history[key]["tab_id"], self.history[key]["session_id"]):
                del self.history[key]

    def _SessionUpsert(self, op: SessionUpsert) -> None:
        r, v = op.record, op.version
        row = self.sessions.get(r.id)
        if self._dead(v, r.id):
            return
        if _newer(v, row):
            last = r.last_active if row is None else max(row["last_active"], r.last_active)
            self.sessions[r.id] = {**r.model_dump(), "last_active": last, "version": v}
        elif row is not None:  # last_active is a max register
            row["last_active"] = max(row["last_active"], r.last_active)

    def _SessionTouch(self, op: SessionTouch) -> None:
        row = self.sessions.get(op.id)
        if row is not None:
            row["last_active"] = max(row["last_active"], op.last_active)

    def _TabUpsert(self, op: TabUpsert) -> None:
        r, v = op.record, op.version
        if not self._dead(v, r.id, r.session_id) and _newer(v, self.tabs.get(r.id)):
            self.tabs[r.id] = {**r.model_dump(), "version": v}

    def _PaneUpsert(self, op: PaneUpsert) -> None:
        r, v = op.record, op.version
        if not self._dead(v, r.id, r.tab_id, op.session_id) and _newer(v, self.panes.get(r.id)):
            self.panes[r.id] = {**r.model_dump(), "session_id": op.session_id, "version": v}

    def _HistoryAppend(self, op: HistoryAppend) -> None:
        key, v = (op.pane_id, op.chunk_index), op.version
        assert op.encoding == "identity"  # no compressor in these tests
        if not self._dead(v, op.pane_id, op.tab_id, op.session_id) and _newer(v, self.history.get(key)):
            self.history[key] = {
                "content": op.content,
                "tab_id": op.tab_id,
                "session_id": op.session_id,
                "version": v,
            }


def _reduce(ops: list[Any]) -> tuple[dict[UUID, tuple[str, int]], dict[str, int], list[Any]]:
    """As workers.applier.reduce_batch: per key, the highest delete and the highest upsert."""
    deletes: dict[UUID, tuple[str, int]] = {}
    template_deletes: dict[str, int] = {}
    upserts: dict[tuple[str, Any], Any] = {}
    for op in ops:
        if isinstance(op, SessionDelete | TabDelete | PaneDelete):
            if op.id not in deletes or deletes[op.id][1] < op.version:
                deletes[op.id] = (op.op.split(".")[0], op.version)
        elif isinstance(op, TemplateDelete):
            template_deletes[op.name] = max(template_deletes.get(op.name, 0), op.version)
        else:
            key = (op.op, _key_of(op))
            if key not in upserts or upserts[key].version < op.version:
                upserts[key] = op
    return deletes, template_deletes, list(upserts.values())


def _key_of(op: Any) -> Any:
    if isinstance(op, SessionTouch):
        return op.id
    if isinstance(op, HistoryAppend):
        return (op.pane_id, op.chunk_index)
    return op.record.name if isinstance(op, TemplateUpsert) else op.record.id


@dataclass
class Sent:
    batch: EncodedBatch
    ops: list[Any]


class BufferMachine(RuleBasedStateMachine):
    """A terminal writing through one buffer to a database, with deliveries that may fail."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = Buffer(
            max_entities=10_000,
            max_pending_history_bytes=1 << 20,
            max_json_bytes=1 << 16,
            max_chunk_bytes=1 << 12,
        )
        self.stored = StoredModel()
        # the terminal's own state (what must end up stored)
        self.sessions: dict[UUID, SessionRecord] = {}
        self.tabs: dict[UUID, TabRecord] = {}
        self.panes: dict[UUID, PaneRecord] = {}
        self.templates: dict[str, TemplateRecord] = {}
        self.history: dict[tuple[UUID, int], bytes] = {}
        self.held: set[tuple[str, Any]] = set()  # entities written through the buffer, still live
        self.sent: list[Sent] = []
        self.now = TIMES[1]  # the terminal's clock: activity times only move forward

    @initialize()
    def restore_a_stored_session(self) -> None:
        """What an earlier run stored; the buffer learns only the ancestors (as restores do)."""
        s = SessionRecord(id=OLD_SESSION, name="old", created_at=TIMES[0], last_active=TIMES[1])
        t = TabRecord(id=OLD_TAB, session_id=OLD_SESSION, position=0, name="old tab")
        p = PaneRecord(id=OLD_PANE, tab_id=OLD_TAB, pane_id="terminal_0", pane_type="terminal")
        self.sessions[s.id], self.tabs[t.id], self.panes[p.id] = s, t, p
        self.history[(OLD_PANE, 0)] = b"old scrollback"
        v = STORED_VERSION
        self.stored.sessions[s.id] = {**s.model_dump(), "version": v}
        self.stored.tabs[t.id] = {**t.model_dump(), "version": v}
        self.stored.panes[p.id] = {**p.model_dump(), "session_id": OLD_SESSION, "version": v}
        self.stored.history[(OLD_PANE, 0)] = {
            "content": b"old scrollback",
            "tab_id": OLD_TAB,
            "session_id": OLD_SESSION,
            "version": v,
        }
        self.buffer.observe_version(v)
        self.buffer.learn_routes(tabs={OLD_TAB: OLD_SESSION}, panes={OLD_PANE: (OLD_TAB, OLD_SESSION)})

    # --- the terminal ------------------------------------------------------------------------

    @rule(
        sid=st.sampled_from([*SESSIONS, OLD_SESSION]),
        name=st.sampled_from(["main", "work", "x" * 256]),
        created=st.sampled_from(TIMES),
        minutes=st.integers(0, 20),
        stale=st.booleans(),
    )
    def put_session(self, sid: UUID, name: str, created: datetime, minutes: int, stale: bool) -> None:
        self.now += timedelta(minutes=minutes)
        previous = self.sessions.get(sid)
        # an update may carry the last_active of the terminal's own copy, older than a touch
        # since; a session is (re)created active now
        active = previous.last_active - timedelta(minutes=1) if previous and stale else self.now
        record = SessionRecord(id=sid, name=name, created_at=created, last_active=active)
        self.buffer.put_session(record)
        if previous is not None:  # last_active only grows (a max register, docs/design.md, rule 4)
            record = record.model_copy(update={"last_active": max(active, previous.last_active)})
        self.sessions[sid] = record
        self.held.add((SESSION, sid))

    @rule(sid=st.sampled_from([*SESSIONS, OLD_SESSION]), minutes=st.integers(0, 20))
    def touch(self, sid: UUID, minutes: int) -> None:
        if sid not in self.sessions:
            return  # a terminal touches the sessions it has
        self.now += timedelta(minutes=minutes)
        self.buffer.touch_session(sid, self.now)
        current = self.sessions[sid]
        if self.now > current.last_active:
            self.sessions[sid] = current.model_copy(update={"last_active": self.now})

    @precondition(lambda self: self.sessions)
    @rule(
        tid=st.sampled_from([*TABS, OLD_TAB]),
        data=st.data(),
        position=st.integers(0, 3),
        layout=st.sampled_from([{}, {"direction": "vertical"}, {"split": [30, 70], "nested": {"a": [1]}}]),
    )
    def put_tab(self, tid: UUID, data: st.DataObject, position: int, layout: dict[str, Any]) -> None:
        sid = data.draw(st.sampled_from(sorted(self.sessions)))
        current = self.tabs.get(tid)
        values = {"id": tid, "session_id": sid, "position": position, "name": f"tab {position}"}
        record = TabRecord(**values, layout_blob=copy.deepcopy(layout))
        if current is not None and current.session_id != sid:
            if (TAB, tid) in self.held:  # a tab does not move to another session
                with pytest.raises(InvalidRecord):
                    self.buffer.put_tab(record)
            return
        self.buffer.put_tab(record)
        # what a write call accepted is what gets stored: the caller's dict changes nothing after
        record.layout_blob["mutated"] = True
        for value in record.layout_blob.values():
            if isinstance(value, list):
                value.append(99)
        self.tabs[tid] = TabRecord(**values, layout_blob=copy.deepcopy(layout))
        self.held.add((TAB, tid))

    @precondition(lambda self: self.tabs)
    @rule(
        pid=st.sampled_from([*PANES, OLD_PANE]),
        data=st.data(),
        title=st.sampled_from(["", "vim", "htop"]),
        state=st.sampled_from([{}, {"scroll": 3}, {"feed": {"unread": [1, 2]}}]),
    )
    def put_pane(self, pid: UUID, data: st.DataObject, title: str, state: dict[str, Any]) -> None:
        tid = data.draw(st.sampled_from(sorted(self.tabs)))
        current = self.panes.get(pid)
        record = PaneRecord(
            id=pid, tab_id=tid, pane_id=f"terminal_{pid.int}", pane_type="terminal", title=title,
            component_state=state,
        )  # fmt: skip
        if current is not None and current.tab_id != tid:
            if (PANE, pid) in self.held:  # a pane does not move to another tab
                with pytest.raises(InvalidRecord):
                    self.buffer.put_pane(record)
            return
        self.buffer.put_pane(record)
        self.panes[pid] = record
        self.held.add((PANE, pid))

    @rule(name=st.sampled_from(TEMPLATES), n=st.integers(0, 2))
    def save_template(self, name: str, n: int) -> None:
        record = TemplateRecord(id=UUID(int=300 + n), name=name, definition={"tabs": list(range(n))})
        self.buffer.put_template(record)
        self.templates[name] = record
        self.held.add((TEMPLATE, name))

    @rule(sid=st.sampled_from([*SESSIONS, OLD_SESSION]))
    def delete_session(self, sid: UUID) -> None:
        self.buffer.delete(SESSION, sid)
        self._forget_session(sid)

    @precondition(lambda self: self.tabs)
    @rule(data=st.data())
    def delete_tab(self, data: st.DataObject) -> None:
        # a terminal deletes the tabs it has (of an unknown tab, the session is unknown too)
        tid = data.draw(st.sampled_from(sorted(self.tabs)))
        self.buffer.delete(TAB, tid)
        self._forget_tab(tid)

    @precondition(lambda self: self.panes)
    @rule(data=st.data())
    def delete_pane(self, data: st.DataObject) -> None:
        pid = data.draw(st.sampled_from(sorted(self.panes)))
        self.buffer.delete(PANE, pid)
        self._forget_pane(pid)

    @rule(name=st.sampled_from(TEMPLATES))
    def delete_template(self, name: str) -> None:
        self.buffer.delete(TEMPLATE, name)
        self.templates.pop(name, None)
        self.held.discard((TEMPLATE, name))

    @precondition(lambda self: self.panes)
    @rule(data=st.data(), index=st.integers(0, 3), content=st.binary(min_size=0, max_size=40))
    def append_history(self, data: st.DataObject, index: int, content: bytes) -> None:
        pid = data.draw(st.sampled_from(sorted(self.panes)))
        self.buffer.append_history(PaneHistoryChunk(pane_id=pid, chunk_index=index, content=content))
        self.history[(pid, index)] = content

    def _forget_session(self, sid: UUID) -> None:
        self.sessions.pop(sid, None)
        self.held.discard((SESSION, sid))
        for tid in [t.id for t in self.tabs.values() if t.session_id == sid]:
            self._forget_tab(tid)

    def _forget_tab(self, tid: UUID) -> None:
        self.tabs.pop(tid, None)
        self.held.discard((TAB, tid))
        for pid in [p.id for p in self.panes.values() if p.tab_id == tid]:
            self._forget_pane(pid)

    def _forget_pane(self, pid: UUID) -> None:
        self.panes.pop(pid, None)
        self.held.discard((PANE, pid))
        for key in [k for k in self.history if k[0] == pid]:
            del self.history[key]

    # --- the flusher and the workers ---------------------------------------------------------------

    @rule(budget=st.integers(1, 12), max_ops=st.integers(1, 5))
    def flush(self, budget: int, max_ops: int) -> None:
        drained = self.buffer.drain(budget)
        if not len(drained):
            return
        for batch in encode_batches(drained, origin="p-test", max_ops=max_ops, max_bytes=1 << 20):
            func, _, args, kwargs = json.loads(batch.data)
            assert func == "workers.jobs.apply_batch" and kwargs == {}
            parsed = BATCH_ADAPTER.validate_python(args[0])  # the workers' own validation
            self.sent.append(Sent(batch, list(parsed.ops)))

    @precondition(lambda self: self.sent)
    @rule(data=st.data(), outcome=st.sampled_from(["commit", "twice", "lost", "applied-then-lost"]))
    def deliver(self, data: st.DataObject, outcome: str) -> None:
        """One batch ends: committed (maybe twice), or lost (failed, vanished, never enqueued)."""
        sent = self.sent.pop(data.draw(st.integers(0, len(self.sent) - 1)))  # in any order
        b = sent.batch
        if outcome in ("commit", "twice", "applied-then-lost"):
            self.stored.apply(sent.ops)
        if outcome == "twice":
            self.stored.apply(sent.ops)
        if outcome in ("commit", "twice"):
            self.buffer.confirm(b.items)
        else:
            self.buffer.redirty(b.items, b.touches, b.chunks)

    @precondition(lambda self: self.sent)
    @rule()
    def commit_all(self) -> None:
        """The workers catch up: every batch sent so far is committed, in order."""
        for sent in self.sent:
            self.stored.apply(sent.ops)
            self.buffer.confirm(sent.batch.items)
        self.sent.clear()

    @invariant()
    def the_entity_count_is_what_the_terminal_holds(self) -> None:
        assert self.buffer.gauges()["live_entities"] == len(self.held)

    def teardown(self) -> None:
        """Deliver everything, then the stored rows are the terminal's state, nothing more."""
        for sent in self.sent:
            self.stored.apply(sent.ops)
            self.buffer.confirm(sent.batch.items)
        for _ in range(100):
            drained = self.buffer.drain(1000)
            if not len(drained):
                break
            for batch in encode_batches(drained, origin="p-test", max_ops=1000, max_bytes=1 << 20):
                self.stored.apply(list(BATCH_ADAPTER.validate_python(json.loads(batch.data)[2][0]).ops))
                self.buffer.confirm(batch.items)
        assert not self.buffer.has_dirty()
        s = self.stored
        assert {k: _record(SessionRecord, v) for k, v in s.sessions.items()} == self.sessions
        assert {k: _record(TabRecord, v) for k, v in s.tabs.items()} == self.tabs
        assert {k: _record(PaneRecord, v) for k, v in s.panes.items()} == self.panes
        assert {k: v["record"] for k, v in s.templates.items()} == self.templates
        assert {k: v["content"] for k, v in s.history.items()} == self.history
        # nothing is left behind once every delete is committed
        assert self.buffer.gauges()["held_entries"] == len(self.held)


def _record(model: type[Any], row: dict[str, Any]) -> Any:
    """A stored row as the record a restore gives back."""
    return model.model_validate({k: v for k, v in row.items() if k in model.model_fields})


TestBufferProperties = BufferMachine.TestCase
TestBufferProperties.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
