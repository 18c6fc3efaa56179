"""perth_pipeline.opjson: msgspec writes every operation byte for byte as the f-strings did.

The reference here is the encoder of operations as it was before msgspec (issue 15), copied and
frozen: f-strings, ``encode_basestring`` for strings, ``json.dumps`` (compact, non-ASCII as it
is, no NaN) for JSON fields. The workers measure JSON fields as compact JSON, so a byte of
difference matters; so does every byte of the rest (batches are cut by size).
"""

from __future__ import annotations

import base64
import json
import math
import sys
import uuid
from datetime import UTC, datetime, timedelta, timezone
from json.encoder import encode_basestring
from typing import Any
from uuid import UUID

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perth_pipeline import opjson, wire
from perth_pipeline.batch import encode_batches
from perth_pipeline.buffer import PANE, SESSION, TAB, TEMPLATE, Buffer, Drained, Item, Touch
from perth_pipeline.errors import InvalidRecord
from perth_pipeline.limits import MAX_JSON_DEPTH, MAX_JSON_INT, MIN_JSON_INT
from perth_pipeline.records import PaneHistoryChunk, PaneRecord, SessionRecord, TabRecord, TemplateRecord
from perth_pipeline.scrollback import Chunk

from ..helpers import make_buffer

# --- the reference: the f-string encoder before msgspec, frozen -----------------------------------


def _ref_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


_s = encode_basestring


def _ref_opt(value: str | None) -> str:
    return "null" if value is None else _s(value)


def _h(op: str) -> str:
    return f'{{"op":"{op}","version":'


class RefIds:
    def __init__(self) -> None:
        self._text: dict[int | None, str] = {}

    def __call__(self, value: UUID | None) -> str:
        key = None if value is None else value.int
        text = self._text.get(key)
        if text is None:
            text = str(value)
            self._text[key] = text
        return text


def _ref_delete(item: Item, ids: RefIds) -> str:
    kind, key, version = item.kind, item.key, item.version
    if kind == SESSION:
        return f'{_h(wire.SESSION_DELETE)}{version},"id":"{key[1]}"}}'
    if kind == TAB:
        return f'{_h(wire.TAB_DELETE)}{version},"id":"{key[1]}","session_id":"{ids(item.session_id)}"}}'
    if kind == PANE:
        return (
            f'{_h(wire.PANE_DELETE)}{version},"id":"{key[1]}","tab_id":"{ids(item.tab_id)}",'
            f'"session_id":"{ids(item.session_id)}"}}'
        )
    return f'{_h(wire.TEMPLATE_DELETE)}{version},"name":{_s(key[1])}}}'


def ref_item_json(item: Item, ids: RefIds) -> str:
    if item.deleted:
        return _ref_delete(item, ids)
    kind, record, version = item.kind, item.record, item.version
    if kind == PANE:
        assert isinstance(record, PaneRecord)
        return (
            f'{_h(wire.PANE_UPSERT)}{version},"session_id":"{ids(item.session_id)}",'
            f'"record":{{"id":"{record.id}","tab_id":"{ids(record.tab_id)}",'
            f'"pane_id":{_s(record.pane_id)},"pane_type":{_s(record.pane_type)},'
            f'"component_state":{_ref_json(item.snapshot)},"title":{_s(record.title)},'
            f'"cwd":{_ref_opt(record.cwd)},"command":{_ref_opt(record.command)}}}}}'
        )
    if kind == TAB:
        assert isinstance(record, TabRecord)
        return (
            f'{_h(wire.TAB_UPSERT)}{version},"record":{{"id":"{record.id}",'
            f'"session_id":"{ids(record.session_id)}","position":{record.position},'
            f'"name":{_s(record.name)},"layout_blob":{_ref_json(item.snapshot)}}}}}'
        )
    if kind == SESSION:
        assert isinstance(record, SessionRecord)
        return (
            f'{_h(wire.SESSION_UPSERT)}{version},"record":{{"id":"{record.id}",'
            f'"name":{_s(record.name)},"template_name":{_ref_opt(record.template_name)},'
            f'"created_at":"{record.created_at.isoformat()}","last_active":"{record.last_active.isoformat()}"}}}}'
        )
    assert isinstance(record, TemplateRecord)
    return (
        f'{_h(wire.TEMPLATE_UPSERT)}{version},"record":{{"id":"{record.id}",'
        f'"name":{_s(record.name)},"definition":{_ref_json(item.snapshot)}}}}}'
    )


def ref_touch_json(touch: Touch) -> str:
    return (
        f'{_h(wire.SESSION_TOUCH)}{touch.version},"id":"{touch.session_id}",'
        f'"last_active":"{touch.last_active.isoformat()}"}}'
    )


def ref_chunk_json(chunk: Chunk, compressor: zstandard.ZstdCompressor | None, ids: RefIds) -> str:
    raw = chunk.chunk.content
    encoding, payload = "identity", raw
    if compressor is not None and len(raw) >= 128:
        packed = compressor.compress(raw)
        if len(packed) < len(raw):
            encoding, payload = "zstd", packed
    return (
        f'{_h(wire.HISTORY_APPEND)}{chunk.version},"pane_id":"{chunk.chunk.pane_id}",'
        f'"tab_id":"{ids(chunk.tab_id)}","session_id":"{ids(chunk.session_id)}",'
        f'"chunk_index":{chunk.chunk.chunk_index},"encoding":"{encoding}","raw_size":{len(raw)},'
        f'"content":"{base64.b64encode(payload).decode("ascii")}"}}'
    )


_ORDER = {SESSION: 0, TAB: 1, PANE: 2}


def ref_ops(drained: Drained, compressor: zstandard.ZstdCompressor | None) -> list[str]:
    """Every operation of ``drained`` as the reference writes it, in the order of encode_batches."""
    ids = RefIds()
    items = sorted(drained.items, key=lambda i: _ORDER.get(i.kind, 3))
    return (
        [ref_touch_json(t) for t in drained.touches]
        + [ref_item_json(i, ids) for i in items]
        + [ref_chunk_json(c, compressor, ids) for c in drained.chunks]
    )


# --- comparing --------------------------------------------------------------------------------------


def assert_same(drained: Drained, compressor: zstandard.ZstdCompressor | None = None) -> None:
    """Each operation byte for byte; and the batches, cut as the reference's texts would be."""
    ids, ref = opjson.Ids(), RefIds()
    for item in drained.items:
        assert opjson.item_json(item, ids) == ref_item_json(item, ref)
    for touch in drained.touches:
        assert opjson.touch_json(touch) == ref_touch_json(touch)
    for chunk in drained.chunks:
        assert opjson.chunk_json(chunk, compressor, ids) == ref_chunk_json(chunk, compressor, ref)
    expected = ref_ops(drained, compressor)
    for max_bytes in (1 << 20, 600):
        batches = encode_batches(
            drained, origin="p1-test", max_ops=5, max_bytes=max_bytes, compressor=compressor
        )
        cuts, texts = [], iter(expected)
        for batch in batches:
            ops = batch.data.split(b'"ops":[', 1)[1].removesuffix(b"]}],{}]")
            cut = [next(texts) for _ in range(batch.ops)]
            assert ops == ",".join(cut).encode()
            cuts.append(batch.ops)
        assert next(texts, None) is None
        assert sum(cuts) == len(expected)


# --- generated records ---------------------------------------------------------------------------

_CHARS = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")  # what validation takes
_EDGE_TEXT = ['é "quoted" \\ back\nslash\t\u2028 \U0001f600 </script>', "\x7f\x1f\x01\b\f\r", "1e5", "2.5"]
TEXT = st.text(_CHARS, max_size=24) | st.sampled_from(_EDGE_TEXT)
NAME = st.text(_CHARS, min_size=1, max_size=24)
EDGE_FLOATS = [1e16, 1e15, 1.0, -0.0, 0.0, 5e-324, 1e-5, 1e-4, 1e-7, 0.1, 1e22, 1.5e300, sys.float_info.max]
EDGE_INTS = [MIN_JSON_INT, MAX_JSON_INT, 2**63, 2**63 - 1, 2**53 + 1, 0, -1]
INTS = st.integers(MIN_JSON_INT, MAX_JSON_INT) | st.sampled_from(EDGE_INTS)
FLOATS = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(EDGE_FLOATS)
PLAIN = st.none() | st.booleans() | INTS | TEXT
JSON_VALUES = st.recursive(
    PLAIN | FLOATS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=12,
)
#: flat objects of strings, integers, booleans and nulls (msgspec takes them as they are), and any
JSON_OBJECTS = st.dictionaries(TEXT, PLAIN, max_size=6) | st.dictionaries(TEXT, JSON_VALUES, max_size=6)
OFFSETS = st.integers(-(14 * 60 - 1), 14 * 60 - 1).map(lambda m: timezone(timedelta(minutes=m)))
TIMESTAMPS = st.datetimes(
    min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31), timezones=st.just(UTC) | OFFSETS
)
PANE_TYPES = st.sampled_from(["terminal", "a", "bloodbank-feed", "x.y_z-1"])
UUIDS = st.uuids() | st.sampled_from([UUID(int=0), UUID(int=2**128 - 1)])


def _buffer() -> Buffer:
    buffer: Buffer = make_buffer(max_json_bytes=1 << 20, max_chunk_bytes=1 << 16)
    return buffer


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ids=st.lists(UUIDS, min_size=4, max_size=4, unique=True),
    names=st.tuples(NAME, NAME, st.none() | NAME, NAME),
    times=st.tuples(TIMESTAMPS, TIMESTAMPS, TIMESTAMPS),
    fields=st.tuples(JSON_OBJECTS, JSON_OBJECTS, JSON_OBJECTS),
    pane=st.tuples(NAME, PANE_TYPES, TEXT, st.none() | TEXT, st.none() | TEXT),
    position=st.integers(0, 2**31 - 1),
    content=st.binary(max_size=600),
)
def test_what_the_write_calls_accept_is_written_as_the_f_strings_wrote_it(
    *,
    ids: list[UUID],
    names: tuple[str, str, str | None, str],
    times: tuple[datetime, datetime, datetime],
    fields: tuple[dict[str, Any], dict[str, Any], dict[str, Any]],
    pane: tuple[str, str, str, str | None, str | None],
    position: int,
    content: bytes,
) -> None:
    s_id, t_id, p_id, tpl_id = ids
    b = _buffer()
    try:
        b.put_session(
            SessionRecord(
                id=s_id, name=names[0], template_name=names[2], created_at=times[0], last_active=times[1]
            )
        )
        b.put_tab(
            TabRecord(id=t_id, session_id=s_id, position=position, name=names[1], layout_blob=fields[0])
        )
        pane_id, pane_type, title, cwd, command = pane
        b.put_pane(
            PaneRecord(
                id=p_id, tab_id=t_id, pane_id=pane_id, pane_type=pane_type,
                component_state=fields[1], title=title, cwd=cwd, command=command,
            )
        )  # fmt: skip
        b.put_template(TemplateRecord(id=tpl_id, name=names[3], definition=fields[2]))
    except (InvalidRecord, ValueError):
        return  # refused on acceptance (a float in a JSON object may push it past a bound)
    b.touch_session(uuid.uuid4(), times[2])
    b.append_history(PaneHistoryChunk(pane_id=p_id, chunk_index=0, content=content))
    b.append_history(PaneHistoryChunk(pane_id=p_id, chunk_index=1, content=content * 3))
    drained = b.drain(100)
    assert len(drained.items) == 4
    for compressor in (None, zstandard.ZstdCompressor(level=3)):
        assert_same(drained, compressor)
    b.delete(PANE, p_id)
    b.delete(TEMPLATE, names[3])
    b.delete(TAB, t_id)
    b.delete(SESSION, s_id)
    assert_same(b.drain(100))


# --- edge cases, one by one ------------------------------------------------------------------------

SESSION_ID, TAB_ID, PANE_ID = UUID(int=1), UUID("0e0e0e0e-1e5e-4e0e-8e0e-0e0e0e0e0e0e"), uuid.uuid4()
NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def _pane_item(record: PaneRecord, snapshot: Any = None, session_id: UUID | None = SESSION_ID) -> Item:
    snapshot = record.component_state if snapshot is None else snapshot
    key = (PANE, record.id.int)
    return Item(PANE, (PANE, record.id), 7, 1, record, snapshot, False, record.tab_id, session_id, key)


def _pane(**fields: Any) -> PaneRecord:
    return PaneRecord(**{"id": PANE_ID, "tab_id": TAB_ID, "pane_id": "t", "pane_type": "terminal", **fields})


def _accepted(value: dict[str, Any]) -> Drained:
    """A pane, a tab and a template holding ``value`` as their JSON field, through the write calls."""
    b = _buffer()
    b.put_session(SessionRecord(id=SESSION_ID, name="s", created_at=NOW, last_active=NOW))
    b.put_tab(TabRecord(id=TAB_ID, session_id=SESSION_ID, position=0, name="t", layout_blob=value))
    b.put_pane(_pane(component_state=value))
    b.put_template(TemplateRecord(id=uuid.uuid4(), name="tpl", definition=value))
    drained: Drained = b.drain(100)
    return drained


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": [1.5, "x"]}
    for _ in range(depth - 1):
        value = {"n": value}
    return value


JSON_FIELDS = [
    {},
    {"a": {}, "b": [], "c": [{}], "d": None},
    {"scroll": 12, "cols": 120, "rows": 40, "on": True, "off": False, "none": None},
    {"big": MAX_JSON_INT, "small": MIN_JSON_INT, "list": [MAX_JSON_INT, MIN_JSON_INT, 0, -1]},
    *({"f": f} for f in EDGE_FLOATS),
    {"fs": EDGE_FLOATS, "nested": {"f": 1e16, "g": [1e-5, {"h": 5e-324}]}},
    {"f": -0.0, "i": 1},
    {"s": "1e5", "t": "v1.2 file2.txt 10.0.0.1"},  # a digit and "." or "e" in a string: compact_json
    {"é": "ü \U0001f600 \u2028\u2029 \x7f", "ctl": "".join(chr(c) for c in range(1, 32)), 'q"\\': '"\\/'},
    {"deep": _nested(MAX_JSON_DEPTH - 2)},  # as deep as the write calls take,
]


@pytest.mark.parametrize("value", JSON_FIELDS, ids=range(len(JSON_FIELDS)))
def test_json_fields_are_written_as_compact_json_wrote_them(value: dict[str, Any]) -> None:
    drained = _accepted(value)
    assert_same(drained)
    text = opjson.item_json(next(i for i in drained.items if i.kind == PANE), opjson.Ids())
    assert json.loads(text)["record"]["component_state"] == value


STRINGS = [
    "",
    'é "quoted" \\ back\nslash\t\u2028 \U0001f600 </script>',
    "".join(chr(c) for c in range(1, 128)),
    "\u0301e\u0301 \ufeff \uffff \U0010ffff 中文 العربية",
]


@pytest.mark.parametrize("text", STRINGS, ids=range(len(STRINGS)))
def test_strings_are_escaped_as_encode_basestring_escapes_them(text: str) -> None:
    b = _buffer()
    name = text or "x"
    b.put_session(
        SessionRecord(id=SESSION_ID, name=name, template_name=name, created_at=NOW, last_active=NOW)
    )
    b.put_tab(TabRecord(id=TAB_ID, session_id=SESSION_ID, position=3, name=name))
    b.put_pane(_pane(pane_id=name, title=text, cwd=text, command=text, component_state={text: text}))
    b.put_template(TemplateRecord(id=uuid.uuid4(), name=name))
    drained = b.drain(100)
    assert_same(drained)
    b.delete(TEMPLATE, name)
    assert_same(b.drain(100))


TIMES = [
    datetime(2024, 5, 1, 12, 0, tzinfo=UTC),  # +00:00, never Z
    datetime(2024, 5, 1, 12, 0, 0, 1, tzinfo=UTC),
    datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30))),
    datetime(1, 1, 3, tzinfo=timezone(-timedelta(hours=14) + timedelta(minutes=1))),
    datetime(9999, 12, 29, 20, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-3))),
]


@pytest.mark.parametrize("when", TIMES, ids=range(len(TIMES)))
def test_timestamps_are_written_by_isoformat(when: datetime) -> None:
    b = _buffer()
    b.put_session(SessionRecord(id=SESSION_ID, name="s", created_at=when, last_active=when))
    b.touch_session(uuid.uuid4(), when)
    drained = b.drain(100)
    assert_same(drained)
    assert f'"last_active":"{when.isoformat()}"' in opjson.touch_json(drained.touches[0])


def test_uuids_are_lowercase_and_hyphenated() -> None:
    for value in (UUID(int=0), UUID(int=2**128 - 1), TAB_ID, uuid.uuid4()):
        b = _buffer()
        b.put_session(SessionRecord(id=SESSION_ID, name="s", created_at=NOW, last_active=NOW))
        b.put_tab(TabRecord(id=value, session_id=SESSION_ID, position=0, name="t"))
        b.put_pane(_pane(id=uuid.uuid4(), tab_id=value))
        drained = b.drain(100)
        assert_same(drained)
        assert str(value) in opjson.item_json(drained.items[-1], opjson.Ids())


@pytest.mark.parametrize("size", [0, 1, 127, 128, 129, 4099])
def test_scrollback_is_base64_as_b64encode_writes_it(size: int) -> None:
    content = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    chunk = Chunk(
        PaneHistoryChunk(pane_id=PANE_ID, chunk_index=5, content=content), 0, 9, 3, TAB_ID, SESSION_ID
    )
    for compressor in (None, zstandard.ZstdCompressor()):
        assert opjson.chunk_json(chunk, compressor, opjson.Ids()) == ref_chunk_json(
            chunk, compressor, RefIds()
        )


def test_an_unknown_parent_is_written_as_the_f_strings_wrote_it() -> None:
    """(They write the text "None": the workers refuse it. Drains hold such items back.)"""
    pane = _pane()
    assert opjson.item_json(_pane_item(pane, session_id=None), opjson.Ids()) == ref_item_json(
        _pane_item(pane, session_id=None), RefIds()
    )
    for kind, tab_id in ((TAB, None), (PANE, None), (PANE, TAB_ID)):
        item = Item(kind, (kind, PANE_ID), 7, 1, None, None, True, tab_id, None, (kind, PANE_ID.int))
        assert opjson.item_json(item, opjson.Ids()) == ref_item_json(item, RefIds())
    chunk = Chunk(PaneHistoryChunk(pane_id=PANE_ID, chunk_index=0, content=b"x"), 0, 9, 3, None, None)
    assert opjson.chunk_json(chunk, None, opjson.Ids()) == ref_chunk_json(chunk, None, RefIds())


def test_what_msgspec_cannot_write_goes_the_f_strings_way() -> None:
    """Lone surrogates (refused by the write calls; msgspec raises) and integers past 64 bits."""
    with pytest.raises(ValueError):  # pydantic refuses it; the write calls too, past model_copy
        _pane(title="\udc80")
    with pytest.raises(InvalidRecord):
        _buffer().put_pane(_pane().model_copy(update={"title": "\udc80"}))
    with pytest.raises(InvalidRecord):
        _buffer().put_pane(_pane().model_copy(update={"component_state": {"k": ["\udc80"]}}))
    for item in (
        _pane_item(_pane().model_copy(update={"title": "bad \udc80"})),
        _pane_item(_pane(), snapshot={"s": "\ud800"}),
        _pane_item(_pane(), snapshot={"n": [{"s": "\udfff"}]}),
        _pane_item(_pane(), snapshot={"big": [10**30, -(10**30)]}),
    ):
        assert opjson.item_json(item, opjson.Ids()) == ref_item_json(item, RefIds())


def test_nan_is_refused_before_it_reaches_the_encoder() -> None:
    """msgspec would write NaN as null, json refuses it: the write calls refuse it first."""
    for value in (math.nan, math.inf, -math.inf):
        for state in ({"x": value}, {"x": [value]}):
            with pytest.raises(ValueError):
                _pane(component_state=state)
            with pytest.raises(InvalidRecord):  # (model_copy skips pydantic's checks)
                _buffer().put_pane(_pane().model_copy(update={"component_state": state}))


def test_the_usual_operations_take_the_msgspec_way(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any) -> str:
        raise AssertionError("written by the f-strings")

    for name in ("item_text", "touch_text", "chunk_text"):
        monkeypatch.setattr(opjson, name, refuse)
    b = _buffer()
    b.put_session(SessionRecord(id=SESSION_ID, name="s", created_at=NOW, last_active=NOW))
    b.put_tab(
        TabRecord(id=TAB_ID, session_id=SESSION_ID, position=0, name="t", layout_blob={"sizes": [50, 50]})
    )
    b.put_pane(_pane(component_state={"scroll": 3, "title": "é"}, cwd="/home/é"))
    b.put_template(TemplateRecord(id=uuid.uuid4(), name="dev", definition={"tabs": [{"name": "x"}]}))
    b.touch_session(uuid.uuid4(), NOW)  # (a touch of a session it holds goes into its upsert)
    b.append_history(PaneHistoryChunk(pane_id=PANE_ID, chunk_index=0, content=b"$ ls\n" * 40))
    drained = b.drain(100)
    batches = encode_batches(
        drained, origin="p", max_ops=100, max_bytes=1 << 20, compressor=zstandard.ZstdCompressor()
    )
    assert sum(batch.ops for batch in batches) == 6
    b.delete(TEMPLATE, "dev")
    b.delete(SESSION, SESSION_ID)
    assert encode_batches(b.drain(100), origin="p", max_ops=100, max_bytes=1 << 20)
