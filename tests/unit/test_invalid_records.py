"""Bad input is refused in the caller's thread, naming the field, and nothing invalid reaches the queue.

Two places refuse it (docs/design.md, the public surface): pydantic's ``ValidationError`` when a
record is built, and ``InvalidRecord`` (a ``ValueError``) from a write call, for what a
record can still carry after validation: values set with ``model_copy(update=...)``
(which pydantic does not validate), JSON fields mutated in the caller's hands, sizes
over the producer's own (lower) limits, and arguments that are not records or ids.
"""

from __future__ import annotations

import json
import math
import uuid
import zlib
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import fakeredis
import pytest
from pydantic import ValidationError

from perth_pipeline import (
    InvalidRecord,
    PaneHistoryChunk,
    PaneRecord,
    PersistenceManager,
    SessionRecord,
    TabRecord,
    TemplateRecord,
)
from perth_pipeline.limits import MAX_CHUNK_BYTES, MAX_JSON_BYTES
from perth_pipeline.operations import BATCH_ADAPTER
from perth_pipeline.settings import Settings

from ..helpers import now, pane, session, tab, wait_for

NAIVE = datetime(2024, 5, 1, 12, 0)  # no tzinfo
SID, TID, PID = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
HUGE_JSON = {"blob": "x" * MAX_JSON_BYTES}  # over the wire format's limit
BIG = {"blob": "x" * (300 << 10)}  # under it, over the producer's default (256 KiB)


def all_sent(manager: PersistenceManager) -> bool:
    """Nothing dirty and nothing in transit: every write so far is on the queue."""
    return not manager.buffer.has_dirty() and not manager.stats()["sending"]


def _session(**kw: Any) -> dict[str, Any]:
    return {"id": SID, "name": "main", "created_at": now(), "last_active": now(), **kw}


def _tab(**kw: Any) -> dict[str, Any]:
    return {"id": TID, "session_id": SID, "position": 0, "name": "editor", **kw}


def _pane(**kw: Any) -> dict[str, Any]:
    return {"id": PID, "tab_id": TID, "pane_id": "terminal_1", "pane_type": "terminal", **kw}


def _chunk(**kw: Any) -> dict[str, Any]:
    return {"pane_id": PID, "chunk_index": 0, "content": b"ls\n", **kw}


def _template(**kw: Any) -> dict[str, Any]:
    return {"id": uuid.uuid4(), "name": "dev", **kw}


# (record class, fields, the field the error must name)
BUILD_CASES: list[tuple[type[Any], dict[str, Any], str]] = [
    (SessionRecord, _session(id="not-a-uuid"), "id"),
    (SessionRecord, _session(name=""), "name"),
    (SessionRecord, _session(name="x" * 257), "name"),
    (SessionRecord, _session(name=42), "name"),
    (SessionRecord, _session(name="a\x00b"), "name"),
    (SessionRecord, _session(template_name=""), "template_name"),
    (SessionRecord, _session(created_at=NAIVE), "created_at"),
    (SessionRecord, _session(last_active=NAIVE), "last_active"),
    (SessionRecord, _session(last_active="yesterday"), "last_active"),
    (SessionRecord, _session(colour="red"), "colour"),  # extra="forbid"
    (TabRecord, _tab(position=-1), "position"),
    (TabRecord, _tab(position="first"), "position"),
    (TabRecord, _tab(position=2**31), "position"),
    (TabRecord, _tab(session_id=12), "session_id"),
    (TabRecord, _tab(name=""), "name"),
    (TabRecord, _tab(layout_blob=[1, 2]), "layout_blob"),
    (TabRecord, _tab(layout_blob={"ratio": math.nan}), "layout_blob"),
    (TabRecord, _tab(layout_blob={"ratio": math.inf}), "layout_blob"),
    (TabRecord, _tab(layout_blob={"s": "a\x00b"}), "layout_blob"),
    (TabRecord, _tab(layout_blob=HUGE_JSON), "layout_blob"),
    (TabRecord, _tab(layout_blob={"when": NAIVE}), "layout_blob"),
    (PaneRecord, _pane(pane_id=""), "pane_id"),
    (PaneRecord, _pane(pane_id="t" * 129), "pane_id"),
    (PaneRecord, _pane(pane_type="Terminal!"), "pane_type"),
    (PaneRecord, _pane(pane_type=""), "pane_type"),
    (PaneRecord, _pane(title="t" * 1025), "title"),
    (PaneRecord, _pane(title="vim\x00"), "title"),
    (PaneRecord, _pane(cwd="/home/\x00"), "cwd"),
    (PaneRecord, _pane(command="c" * 16385), "command"),
    (PaneRecord, _pane(component_state={"unread": math.nan}), "component_state"),
    (PaneRecord, _pane(component_state={"set": {1, 2}}), "component_state"),
    (PaneRecord, _pane(component_state=HUGE_JSON), "component_state"),
    (PaneRecord, _pane(tab_id=None), "tab_id"),
    (PaneHistoryChunk, _chunk(chunk_index=-1), "chunk_index"),
    (PaneHistoryChunk, _chunk(content=12), "content"),
    (PaneHistoryChunk, _chunk(content=b"x" * (MAX_CHUNK_BYTES + 1)), "content"),
    (TemplateRecord, _template(name=""), "name"),
    (TemplateRecord, _template(definition="tabs"), "definition"),
    (TemplateRecord, _template(definition={"tabs": [-math.inf]}), "definition"),
]


@pytest.mark.parametrize(("model", "fields", "field"), BUILD_CASES)
def test_building_an_invalid_record_raises_naming_the_field(
    model: type[Any], fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as info:
        model(**fields)
    assert isinstance(info.value, ValueError)
    assert field in {str(part) for error in info.value.errors() for part in error["loc"]}


@pytest.fixture
def fake() -> Iterator[fakeredis.FakeRedis]:
    client = fakeredis.FakeRedis()
    yield client
    client.close()


@pytest.fixture
def manager(fake: fakeredis.FakeRedis) -> Iterator[PersistenceManager]:
    settings = Settings(redis_url=None, database_url=None, queue="invalid", flush_interval=0.01)
    m = PersistenceManager(settings=settings, redis_client=fake)
    yield m
    m.close(timeout=1)


def _valid() -> tuple[SessionRecord, TabRecord, PaneRecord]:
    s = session()
    t = tab(s.id)
    return s, t, pane(t.id)


Call = Callable[[PersistenceManager], None]


def _mutated_tab(mutate: Callable[[dict[str, Any]], None]) -> Call:
    def call(m: PersistenceManager) -> None:
        _, t, _ = _valid()
        mutate(t.layout_blob)  # after validation, in the caller's hands
        m.create_tab(t)

    return call


def _cyclic(blob: dict[str, Any]) -> None:
    blob["self"] = blob


def _deep(blob: dict[str, Any]) -> None:
    node = blob
    for _ in range(500):
        node["child"] = {}
        node = node["child"]


_s, _t, _p = _valid()
_ok_template = TemplateRecord(id=uuid.uuid4(), name="ok")

# (what the caller does, the field InvalidRecord must name)
CALL_CASES: list[tuple[str, Call, str]] = [
    ("not a record", lambda m: m.create_session(_t), "session"),  # type: ignore[arg-type]
    ("a dict", lambda m: m.create_tab(_t.model_dump()), "tab"),  # type: ignore[arg-type]
    ("None", lambda m: m.update_pane(None), "pane"),  # type: ignore[arg-type]
    ("bytes", lambda m: m.append_pane_history(b"ls"), "chunk"),  # type: ignore[arg-type]
    ("a name", lambda m: m.save_template("dev"), "template"),  # type: ignore[arg-type]
    ("bad id", lambda m: m.delete_session("not-a-uuid"), "session_id"),
    ("int id", lambda m: m.delete_tab(42), "tab_id"),  # type: ignore[arg-type]
    ("None id", lambda m: m.delete_pane(None), "pane_id"),  # type: ignore[arg-type]
    ("touch", lambda m: m.touch_session("yesterday"), "session_id"),
    ("empty name", lambda m: m.delete_template(""), "name"),
    ("long name", lambda m: m.delete_template("t" * 257), "name"),
    ("NUL name", lambda m: m.delete_template("a\x00"), "name"),
    ("int name", lambda m: m.delete_template(7), "name"),  # type: ignore[arg-type]
    # model_copy(update=...) is not validated by pydantic: the write call checks
    (
        "naive last_active",
        lambda m: m.update_session(_s.model_copy(update={"last_active": NAIVE})),
        "last_active",
    ),
    (
        "naive created_at",
        lambda m: m.update_session(_s.model_copy(update={"created_at": NAIVE})),
        "created_at",
    ),
    ("empty name", lambda m: m.update_session(_s.model_copy(update={"name": ""})), "name"),
    ("NUL name", lambda m: m.update_session(_s.model_copy(update={"name": "x\x00"})), "name"),
    ("negative", lambda m: m.update_tab(_t.model_copy(update={"position": -3})), "position"),
    ("str position", lambda m: m.update_tab(_t.model_copy(update={"position": "1"})), "position"),
    ("str id", lambda m: m.update_tab(_t.model_copy(update={"session_id": str(_s.id)})), "session_id"),
    ("long title", lambda m: m.update_pane(_p.model_copy(update={"title": "t" * 1025})), "title"),
    ("NUL cwd", lambda m: m.update_pane(_p.model_copy(update={"cwd": "/\x00"})), "cwd"),
    # a lone surrogate (text decoded with errors="surrogateescape") cannot be encoded
    ("surrogate title", lambda m: m.update_pane(_p.model_copy(update={"title": "vim \udc80"})), "title"),
    ("surrogate name", lambda m: m.update_session(_s.model_copy(update={"name": "\udcff"})), "name"),
    ("pane type", lambda m: m.update_pane(_p.model_copy(update={"pane_type": "Bad Type"})), "pane_type"),
    ("empty pane_id", lambda m: m.update_pane(_p.model_copy(update={"pane_id": ""})), "pane_id"),
    (
        "list state",
        lambda m: m.update_pane(_p.model_copy(update={"component_state": [1]})),
        "component_state",
    ),
    (
        "negative chunk",
        lambda m: m.append_pane_history(
            PaneHistoryChunk(pane_id=_p.id, chunk_index=0, content=b"").model_copy(update={"chunk_index": -1})
        ),
        "chunk_index",
    ),
    (
        "str content",
        lambda m: m.append_pane_history(
            PaneHistoryChunk(pane_id=_p.id, chunk_index=0, content=b"").model_copy(update={"content": "ls"})
        ),
        "content",
    ),
    ("template", lambda m: m.save_template(_ok_template.model_copy(update={"name": ""})), "name"),
    # JSON fields mutated after validation
    ("NaN", _mutated_tab(lambda b: b.update(ratio=math.nan)), "layout_blob"),
    ("inf", _mutated_tab(lambda b: b.update(sizes=[1.0, -math.inf])), "layout_blob"),
    ("NUL", _mutated_tab(lambda b: b.update(name="a\x00b")), "layout_blob"),
    ("NUL key", _mutated_tab(lambda b: b.update({"a\x00": 1})), "layout_blob"),
    ("surrogate in JSON", _mutated_tab(lambda b: b.update(name="caf\udce9")), "layout_blob"),
    ("surrogate key", _mutated_tab(lambda b: b.update({"\udce9": 1})), "layout_blob"),
    ("nested surrogate", _mutated_tab(lambda b: b.update(deep={"list": ["ok", "\ud800"]})), "layout_blob"),
    ("int key", _mutated_tab(lambda b: b.update({1: "one"})), "layout_blob"),
    ("a set", _mutated_tab(lambda b: b.update(ids={1, 2})), "layout_blob"),
    ("datetime", _mutated_tab(lambda b: b.update(at=NAIVE)), "layout_blob"),
    ("an object", _mutated_tab(lambda b: b.update(obj=object())), "layout_blob"),
    ("cyclic", _mutated_tab(_cyclic), "layout_blob"),
    ("too deep", _mutated_tab(_deep), "layout_blob"),
    # within the wire format's limits, over the producer's own (settings)
    (
        "300 KiB state",
        lambda m: m.create_pane(pane(_t.id, component_state=BIG)),
        "component_state",
    ),
    (
        "300 KiB layout",
        lambda m: m.create_tab(tab(_s.id, layout_blob={"blob": ["y" * 1000] * 300})),
        "layout_blob",
    ),
    (
        "300 KiB definition",
        lambda m: m.save_template(TemplateRecord(id=uuid.uuid4(), name="big", definition=BIG)),
        "definition",
    ),
    (
        "300 KiB chunk",
        lambda m: m.append_pane_history(
            PaneHistoryChunk(pane_id=_p.id, chunk_index=0, content=b"z" * (300 << 10))
        ),
        "content",
    ),
]


@pytest.mark.parametrize(("what", "call", "field"), CALL_CASES, ids=[c[0] for c in CALL_CASES])
def test_a_write_call_refuses_invalid_input_naming_the_field(
    manager: PersistenceManager, fake: fakeredis.FakeRedis, what: str, call: Call, field: str
) -> None:
    with pytest.raises(InvalidRecord) as info:
        call(manager)
    assert isinstance(info.value, ValueError)
    assert info.value.field == field, info.value
    assert manager.stats()["invalid"] == 1
    # the flusher runs; nothing reaches the queue
    assert manager.flush(timeout=0.2)
    assert fake.llen("rq:queue:invalid") == 0


def test_nothing_invalid_reaches_the_queue(manager: PersistenceManager, fake: fakeredis.FakeRedis) -> None:
    s, t, p = _valid()
    refused = 0
    for _, call, _ in CALL_CASES:
        with pytest.raises(InvalidRecord):
            call(manager)
        refused += 1
    manager.create_session(s)
    manager.create_tab(t)
    manager.create_pane(p)
    manager.append_pane_history(PaneHistoryChunk(pane_id=p.id, chunk_index=0, content=b"ok\n"))
    manager.flush(timeout=0.05)
    wait_for(lambda: all_sent(manager), what="the valid writes to be sent")
    ops = []
    for job_id in fake.lrange("rq:queue:invalid", 0, -1):
        func, _, args, _ = json.loads(zlib.decompress(fake.hget(b"rq:job:" + job_id, "data")))
        assert func == "workers.jobs.apply_batch"
        ops += BATCH_ADAPTER.validate_python(args[0]).ops  # what the workers validate
    assert sorted(op.op for op in ops) == ["history.append", "pane.upsert", "session.upsert", "tab.upsert"]
    assert manager.stats()["invalid"] == refused


def test_a_tab_or_pane_that_changes_parent_is_refused(manager: PersistenceManager) -> None:
    s, t, p = _valid()
    manager.create_session(s)
    manager.create_tab(t)
    manager.create_pane(p)
    with pytest.raises(InvalidRecord) as info:
        manager.update_tab(t.model_copy(update={"session_id": uuid.uuid4()}))
    assert info.value.field == "session_id"
    with pytest.raises(InvalidRecord) as info:
        manager.update_pane(p.model_copy(update={"tab_id": uuid.uuid4()}))
    assert info.value.field == "tab_id"


def test_an_aware_datetime_in_any_zone_is_accepted(manager: PersistenceManager) -> None:
    from datetime import timezone

    later = datetime.now(timezone(timedelta(hours=9, minutes=30)))  # Adelaide, not UTC
    manager.create_session(session(created_at=later, last_active=later))
    assert manager.stats()["invalid"] == 0
