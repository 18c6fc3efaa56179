"""workers.decoder: msgspec takes a strict subset of what the models take, and gives the same rows.

The models (pydantic, ``perth_pipeline.operations``) are the wire format's definition; the decoder
is its fast path. Two properties hold it to them:

* whatever the decoder takes, the models take whole (no operation refused), and the rows the
  applier stages from either are equal (JSON fields compared as JSON values);
* what it declines goes the models' way (``workers.serializer``), so a refusal still names the
  field.

Mutations of a producer's batch (hypothesis) probe the first: wrong types, lax forms pydantic
coerces, bounds, escapes, numbers, timestamps, unknown fields and ops.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from perth_pipeline import PaneHistoryChunk, TemplateRecord
from perth_pipeline.batch import encode_batches
from perth_pipeline.buffer import PANE, SESSION, TAB, TEMPLATE
from perth_pipeline.limits import MAX_CLOCK_SKEW_NS, MAX_JSON_BYTES, MAX_JSON_DEPTH
from perth_pipeline.operations import BATCH_ADAPTER
from workers.applier import _stage
from workers.decoder import DecodedBatch, decode_apply_batch
from workers.jobs import PoisonBatch, parse_batch
from workers.reduction import reduce_batch
from workers.serializer import JobSerializer, ParsedBatch, parse_apply_batch

from ..helpers import make_buffer, pane, session, tab

PLAIN: dict[str, Any] = {
    "text": 'café "☕" \\ \n\t\u2028 \U0001f600 </script>',
    "nested": {"list": [1, 2.5, -0.0, None, True, False, 10**15], "empty": {}, "none": []},
    "": "empty key",
}


def producer_payload() -> dict[str, Any]:
    """One batch of every kind a producer sends, as its job data's batch (a JSON object)."""
    b = make_buffer(max_json_bytes=1 << 18, max_chunk_bytes=1 << 18)
    s = session()
    t = tab(s.id, layout_blob={"direction": "vertical", "x": PLAIN})
    b.put_session(s)
    b.put_tab(t)
    panes = [pane(t.id, n, component_state={"scroll": n, "state": PLAIN}, cwd="/tmp") for n in range(3)]
    for p in panes:
        b.put_pane(p)
    b.put_template(TemplateRecord(id=uuid.uuid4(), name="dev ☕", definition={"tabs": [PLAIN]}))
    b.touch_session(uuid.uuid4(), datetime.now(UTC))
    b.append_history(PaneHistoryChunk(pane_id=panes[0].id, chunk_index=0, content=b"$ ls\n" * 100))
    b.append_history(PaneHistoryChunk(pane_id=panes[1].id, chunk_index=3, content=b"$"))
    gone = pane(t.id, 9)
    b.put_pane(gone)
    b.delete(PANE, gone.id)  # deletes of a pane, a tab, a session and a template
    other = session("other")
    b.put_session(other)
    gone_tab = tab(other.id, 1)
    b.put_tab(gone_tab)
    b.delete(TAB, gone_tab.id)
    b.delete(SESSION, other.id)
    b.delete(TEMPLATE, "old")
    (encoded,) = encode_batches(
        b.drain(1000),
        origin="unit-test",
        max_ops=1000,
        max_bytes=1 << 22,
        compressor=zstandard.ZstdCompressor(),
    )
    payload: dict[str, Any] = json.loads(encoded.data)[2][0]
    return payload


PAYLOAD = producer_payload()
DEEP: list[Any] = []
for _ in range(MAX_JSON_DEPTH + 2):
    DEEP = [DEEP]


def job(payload: dict[str, Any], *, ascii_only: bool = False) -> bytes:
    """Job data as a producer writes it; ``ascii_only``: as RQ's JSONSerializer does (escapes)."""
    text = json.dumps(["workers.jobs.apply_batch", None, [payload], {}], ensure_ascii=ascii_only)
    return text.encode()


def rows(batch: Any, texts: dict[int, tuple[Any, str]]) -> dict[str, list[tuple[Any, ...]]]:
    """What the applier would stage, with JSON text read back as JSON values."""
    staged = _stage(reduce_batch(batch.ops), batch.origin, texts)
    out: dict[str, list[tuple[Any, ...]]] = {}
    for name, table in staged.items():
        out[name] = [tuple(_value(v) for v in row) for row in table]
    return out


def _value(value: Any) -> Any:
    # JSON fields are staged as text: compact JSON on the models' way, as it came on the decoder's
    if isinstance(value, str) and value.startswith("{"):
        try:
            return ("json", json.loads(value))
        except ValueError:  # (a name that only starts like JSON)
            pass
    return value


def models_rows(data: bytes) -> dict[str, list[tuple[Any, ...]]]:
    """The rows of the models' path, which must take the batch whole."""
    batch, valid, rejected = parse_batch(json.loads(data)[2][0])
    assert rejected == [] and len(valid) == len(batch.ops)
    texts: dict[int, tuple[Any, str]] = {}
    return rows(batch, texts)


def test_a_producers_batch_is_decoded_with_the_rows_of_the_models() -> None:
    data = job(PAYLOAD)
    decoded = decode_apply_batch(data)
    assert isinstance(decoded, DecodedBatch)
    model = BATCH_ADAPTER.validate_python(PAYLOAD)
    assert (decoded.id, decoded.origin, len(decoded.ops)) == (model.id, model.origin, len(model.ops))
    assert decoded.session_ids() == model.session_ids()
    assert rows(decoded, {}) == models_rows(data)
    assert set(rows(decoded, {})) == {
        "copy_sessions",
        "copy_touches",
        "copy_tabs",
        "copy_panes",
        "copy_history",
        "copy_deletes",
        "copy_templates",
        "copy_template_deletes",
    }


def test_the_serializer_takes_the_decoders_path_first() -> None:
    parsed = parse_apply_batch(job(PAYLOAD))
    assert isinstance(parsed, ParsedBatch) and isinstance(parsed.batch, DecodedBatch)


def _pane_op(payload: dict[str, Any]) -> dict[str, Any]:
    op: dict[str, Any] = next(o for o in payload["ops"] if o["op"] == "pane.upsert")
    return op


def _with(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """PAYLOAD with the value at ``path`` (from the first pane upsert) replaced; ``...`` deletes it."""
    payload = json.loads(json.dumps(PAYLOAD))
    node: Any = _pane_op(payload)
    for key in path[:-1]:
        node = node[key]
    if value is ...:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value
    return payload


@pytest.mark.parametrize(
    ("path", "value", "why"),
    [
        (("record", "pane_type"), "terminal\n", "$ before a newline"),
        (("record", "title"), "a\x00b", "NUL"),
        (("record", "component_state"), {"x": "\udc80"}, "lone surrogate"),
        (("record", "title"), "\udc80", "lone surrogate in a text field"),
        (("record", "component_state"), {"x": "a\x00b"}, "NUL in a JSON field"),
        (("record", "component_state"), {"x": 1e300}, "exponent"),
        (("record", "component_state"), {"x": 2**64}, "integer past u64"),
        (("record", "component_state"), {"x": 12345678901234567890}, "19-digit run"),
        (("record", "component_state"), [1, 2], "not an object"),
        (("record", "component_state"), {"x": "y" * (MAX_JSON_BYTES // 3)}, "near the size limit"),
        (("record", "component_state"), {"a": DEEP}, "nested deeper than the limit"),
        (("record", "cwd"), 5, "wrong type"),
        (("record", "unknown"), 1, "unknown field"),
        (("record", "pane_id"), ..., "missing field"),
        (("version",), str(time.time_ns()), "a number as text (pydantic coerces it)"),
        (("version",), time.time_ns() + MAX_CLOCK_SKEW_NS + 10**12, "ahead of the clock"),
        (("session_id",), "urn:uuid:" + str(uuid.uuid4()), "uuid form"),
        (("op",), "pane.upsertx", "unknown op"),
    ],
)
def test_what_the_decoder_is_not_sure_of_goes_the_models_way(
    path: tuple[Any, ...], value: Any, why: str
) -> None:
    if value == {"x": "\udc80"}:  # (json.dumps writes a lone surrogate only escaped, ASCII)
        data = job(PAYLOAD).replace(b'"scroll":', b'"x":"\\udc80","scroll":', 1)
    elif value == "\udc80":
        data = job(PAYLOAD).replace(b'"title": "', b'"title": "\\udc80', 1)
    else:
        data = job(_with(path, value))
    assert decode_apply_batch(data) is None, why


def test_a_touch_with_a_timestamp_of_another_form_goes_the_models_way() -> None:
    payload = json.loads(json.dumps(PAYLOAD))
    touch = next(o for o in payload["ops"] if o["op"] == "session.touch")
    for form in (
        "2026-01-01 10:00:00+00:00",
        "2026-01-01T10:00:00",
        "2026-01-01T10:00:00+00:00:30",
        "1767261600",
    ):
        touch["last_active"] = form
        assert decode_apply_batch(job(payload)) is None, form


def test_a_batch_the_decoder_declines_is_still_judged_by_the_models() -> None:
    payload = _with(("record", "pane_type"), "Bad Type")
    data = job(payload)
    assert decode_apply_batch(data) is None
    _, valid, rejected = parse_batch(json.loads(data)[2][0])
    assert len(valid) == len(PAYLOAD["ops"]) - 1
    assert len(rejected) == 1 and ".record.pane_type:" in rejected[0]


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.sampled_from(
        [
            "",
            "terminal",
            "terminal\n",
            "Terminal",
            "x" * 129,
            "y" * 1025,
            str(uuid.uuid4()),
            uuid.uuid4().hex,
            str(uuid.uuid4()).upper(),
            "{" + str(uuid.uuid4()) + "}",
            "2026-01-01T10:00:00Z",
            "2026-01-01T10:00:00.1234567+00:00",
            "9999-12-31T23:00:00+00:00",
            "0001-01-01T00:00:00+00:00",
            "identity",
            "zstd",
            "aGVsbG8=",
            "aGVsbG8",
            "1",
            "1.0",
        ]
    ),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(
        st.text(max_size=5), st.integers() | st.floats(allow_nan=False) | st.text(max_size=5), max_size=3
    ),
)


def _mutate(payload: dict[str, Any], index: int, key_path: list[str], value: Any, delete: bool) -> None:
    node: Any = payload["ops"][index % len(payload["ops"])]
    for key in key_path[:-1]:
        if not isinstance(node, dict) or not isinstance(node.get(key), dict):
            break
        node = node[key]
    if isinstance(node, dict):
        if delete:
            node.pop(key_path[-1], None)
        else:
            node[key_path[-1]] = value


_KEYS = st.sampled_from(
    [
        ["version"],
        ["op"],
        ["id"],
        ["session_id"],
        ["tab_id"],
        ["pane_id"],
        ["chunk_index"],
        ["raw_size"],
        ["content"],
        ["encoding"],
        ["last_active"],
        ["name"],
        ["extra"],
        ["record", "id"],
        ["record", "name"],
        ["record", "pane_id"],
        ["record", "pane_type"],
        ["record", "title"],
        ["record", "cwd"],
        ["record", "command"],
        ["record", "position"],
        ["record", "session_id"],
        ["record", "tab_id"],
        ["record", "template_name"],
        ["record", "created_at"],
        ["record", "last_active"],
        ["record", "component_state"],
        ["record", "layout_blob"],
        ["record", "definition"],
        ["record", "extra"],
    ]
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mutations=st.lists(
        st.tuples(st.integers(min_value=0, max_value=50), _KEYS, _VALUES, st.booleans()),
        min_size=1,
        max_size=3,
    ),
    ascii_only=st.booleans(),
)
def test_whatever_the_decoder_takes_the_models_take_with_the_same_rows(
    mutations: list[tuple[int, list[str], Any, bool]], ascii_only: bool
) -> None:
    payload = json.loads(json.dumps(PAYLOAD))
    for index, keys, value, delete in mutations:
        _mutate(payload, index, keys, value, delete)
    try:
        data = job(payload, ascii_only=ascii_only)
    except (ValueError, UnicodeEncodeError):  # (a lone surrogate from st.text: not JSON text at all)
        return
    decoded = decode_apply_batch(data)
    if decoded is None:
        return
    try:
        expected = models_rows(data)
    except PoisonBatch as exc:  # pragma: no cover - the failure this test looks for
        raise AssertionError(f"the decoder took a batch the models refuse: {exc}") from None
    assert rows(decoded, {}) == expected


def test_a_decoded_batch_serializes_back_to_the_same_batch() -> None:
    data = job(PAYLOAD)
    loaded = JobSerializer.loads(data)
    assert isinstance(loaded[2][0].batch, DecodedBatch)
    dumped = JobSerializer.dumps(loaded)  # (RQ's JSON: ASCII, an emoji as a surrogate pair)
    assert json.loads(dumped) == json.loads(data)
    again = JobSerializer.loads(dumped)  # ("\u00e9" in a JSON field looks like an exponent: the models')
    assert rows(again[2][0].batch, again[2][0].json_texts) == rows(loaded[2][0].batch, {})


def test_escapes_in_text_fields_a_surrogate_pair_too_are_decoded_as_the_models_decode_them() -> None:
    data = job(PAYLOAD).replace(b'"title": "', b'"title": "\\ud83d\\ude00 \\u00e9 \\n ', 1)
    decoded = decode_apply_batch(data)
    assert isinstance(decoded, DecodedBatch)
    titles = [row[5] for row in rows(decoded, {})["copy_panes"]]
    assert any(title.startswith("\U0001f600 \u00e9 \n ") for title in titles)
    assert rows(decoded, {}) == models_rows(data)


def test_the_decoders_structs_the_encoders_and_the_models_name_the_same_fields() -> None:
    """Three declarations of one wire format (the models, the producer's msgspec structs, the
    worker's): a field added to one and not the others fails here, not on the queue."""
    import msgspec

    from perth_pipeline import operations, opjson, records
    from workers import decoder

    def names(struct: Any) -> set[str]:
        return {f.name for f in msgspec.structs.fields(struct)}

    def model_names(model: Any) -> set[str]:
        return set(model.model_fields) - {"op"}

    kinds = {
        "SessionUpsert": ("_SessionUpsert", "_Session", "SessionRecord"),
        "TabUpsert": ("_TabUpsert", "_Tab", "TabRecord"),
        "PaneUpsert": ("_PaneUpsert", "_Pane", "PaneRecord"),
        "TemplateUpsert": ("_TemplateUpsert", "_Template", "TemplateRecord"),
        "SessionDelete": ("_SessionDelete", None, None),
        "SessionTouch": ("_SessionTouch", None, None),
        "TabDelete": ("_TabDelete", None, None),
        "PaneDelete": ("_PaneDelete", None, None),
        "HistoryAppend": ("_HistoryAppend", None, None),
        "TemplateDelete": ("_TemplateDelete", None, None),
    }
    for kind, (encoder_op, encoder_record, record) in kinds.items():
        model = getattr(operations, kind)
        ours = getattr(decoder, f"{kind}Struct")
        theirs = getattr(opjson, encoder_op)
        assert names(ours) == names(theirs) == model_names(model), kind
        tag = model.model_fields["op"].default
        assert ours.__struct_config__.tag == theirs.__struct_config__.tag == tag, kind
        if record is not None:
            ours_record = {f.name: f.type for f in msgspec.structs.fields(ours)}["record"]
            fields = model_names(getattr(records, record))
            assert names(ours_record) == names(getattr(opjson, encoder_record)) == fields, kind
