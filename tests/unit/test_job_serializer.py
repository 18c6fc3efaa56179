"""workers.serializer: an apply_batch job validated whole from its bytes, anything else as RQ's JSON.

The fast path (:func:`parse_apply_batch`) must take exactly the job data a producer writes and
hand over the JSON text of every JSON field as :func:`perth_pipeline.limits.json_text` makes it
(the applier copies that text into the JSONB columns); everything else must fall back to RQ's
JSON decoding, so that the job function's operation-by-operation validation decides.
"""

from __future__ import annotations

import base64
import json
import pickle
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
import zstandard
from rq.serializers import JSONSerializer

from perth_pipeline import PaneHistoryChunk, TemplateRecord
from perth_pipeline.batch import JOB_FUNCTION, encode_batches
from perth_pipeline.limits import json_text
from perth_pipeline.operations import (
    BATCH_ADAPTER,
    Batch,
    HistoryAppend,
    PaneUpsert,
    TabUpsert,
    TemplateUpsert,
)
from perth_pipeline.wire import FORMAT_VERSION, SUPPORTED_FORMATS
from workers.decoder import decode_apply_batch
from workers.jobs import PoisonBatch, parse_batch
from workers.serializer import JobSerializer, ParsedBatch, parse_apply_batch

from ..helpers import make_buffer, pane, session, tab

TRICKY: dict[str, Any] = {
    "title": 'café "☕" \\ \n\t\u2028 \U0001f600 </script>',
    "nested": {"list": [1, 2.5, -0.0, None, True, False, 10**19], "empty": {}, "none": []},
    "": "empty key",
}


def producer_job_data() -> bytes:
    """One batch's job data, made as the producer makes it (buffer, drain, encode_batches)."""
    b = make_buffer(max_json_bytes=1 << 18, max_chunk_bytes=1 << 18)
    s = session()
    t = tab(s.id, layout_blob={"direction": "vertical", "sizes": [50, 50], "x": TRICKY})
    b.put_session(s)
    b.put_tab(t)
    panes = [pane(t.id, n, component_state={"scroll": n, "state": TRICKY}) for n in range(3)]
    for p in panes:
        b.put_pane(p)
    b.put_template(TemplateRecord(id=uuid.uuid4(), name="dev ☕", definition={"tabs": [TRICKY]}))
    b.touch_session(uuid.uuid4(), datetime.now(UTC))
    b.append_history(PaneHistoryChunk(pane_id=panes[0].id, chunk_index=0, content=b"$ ls\n" * 100))
    b.append_history(PaneHistoryChunk(pane_id=panes[1].id, chunk_index=0, content=b"$"))
    (encoded,) = encode_batches(
        b.drain(1000),
        origin="unit-test",
        max_ops=1000,
        max_bytes=1 << 22,
        compressor=zstandard.ZstdCompressor(),
    )
    return encoded.data


def rq_job_data(*args: Any, func: str = JOB_FUNCTION, instance: Any = None, **kwargs: Any) -> bytes:
    """Job data as RQ's own JSONSerializer writes it (as a producer in another language would)."""
    data: bytes = JSONSerializer.dumps((func, instance, list(args), kwargs))  # type: ignore[no-untyped-call]
    return data


def payload_of(data: bytes) -> dict[str, Any]:
    payload: dict[str, Any] = json.loads(data)[2][0]
    return payload


def json_fields(batch: Batch) -> list[dict[str, Any]]:
    """Every JSON field value held by the batch's operations (layout_blob, component_state, definition)."""
    values: list[dict[str, Any]] = []
    for op in batch.ops:
        if isinstance(op, TabUpsert):
            values.append(op.record.layout_blob)
        elif isinstance(op, PaneUpsert):
            values.append(op.record.component_state)
        elif isinstance(op, TemplateUpsert):
            values.append(op.record.definition)
    return values


def test_the_producers_job_data_is_parsed_whole_with_the_text_of_every_json_field() -> None:
    data = producer_job_data()
    # TRICKY's 10**19 (a long digit run) is one the msgspec decoder leaves to the models: this
    # file tests the models' whole-batch path (workers.decoder's: tests/unit/test_decoder.py)
    assert decode_apply_batch(data) is None
    parsed = parse_apply_batch(data)
    assert isinstance(parsed, ParsedBatch)
    # the same batch the plain path (json.loads, then the models) gives
    assert parsed.batch == BATCH_ADAPTER.validate_python(payload_of(data))
    history = [op for op in parsed.batch.ops if isinstance(op, HistoryAppend)]
    assert sorted(op.encoding for op in history) == ["identity", "zstd"]
    values = json_fields(parsed.batch)
    assert len(values) == 5  # one tab, three panes, one template
    for value in values:
        held, text = parsed.json_texts[id(value)]
        assert held is value  # the very object the applier will look up, not an equal copy
        assert text == json_text(value)
        assert json.loads(text) == value
    assert len(parsed.json_texts) == len(values)  # nothing else, nothing stale


def test_rq_job_data_of_a_batch_is_parsed_too() -> None:
    payload = payload_of(producer_job_data())
    parsed = parse_apply_batch(rq_job_data(payload))
    assert parsed is not None
    assert parsed.batch == BATCH_ADAPTER.validate_python(payload)
    for value in json_fields(parsed.batch):
        assert parsed.json_texts[id(value)] == (value, json_text(value))


def test_the_serializer_hands_the_job_function_the_parsed_batch() -> None:
    data = producer_job_data()
    func, instance, args, kwargs = JobSerializer.loads(data)
    assert (func, instance, kwargs) == (JOB_FUNCTION, None, {})
    (parsed,) = args
    assert isinstance(parsed, ParsedBatch)
    assert parsed.batch == BATCH_ADAPTER.validate_python(payload_of(data))


@pytest.mark.parametrize(
    "func",
    ["workers.maintenance.cleanup", "workers.jobs.apply_batch_v2", "os.system", "workers.jobs.apply"],
)
def test_another_function_name_is_not_parsed_as_a_batch(func: str) -> None:
    data = rq_job_data(payload_of(producer_job_data()), func=func)
    assert parse_apply_batch(data) is None
    assert JobSerializer.loads(data) == JSONSerializer.loads(data)  # type: ignore[no-untyped-call]


def _with_invalid_op(payload: dict[str, Any]) -> dict[str, Any]:
    ops = list(payload["ops"])
    bad = next(op for op in ops if op["op"] == "tab.upsert")
    ops.insert(1, {**bad, "record": {**bad["record"], "position": -1}})
    return {**payload, "ops": ops}


def test_a_batch_with_one_invalid_operation_falls_back_to_rqs_json() -> None:
    payload = _with_invalid_op(payload_of(producer_job_data()))
    data = rq_job_data(payload)
    assert parse_apply_batch(data) is None
    func, _, args, _ = JobSerializer.loads(data)
    assert func == JOB_FUNCTION
    assert args == [payload]  # plain JSON: the job function validates it operation by operation
    _, valid, rejected = parse_batch(args[0])
    assert len(valid) == len(payload["ops"]) - 1
    assert rejected and all(reason.startswith("ops[1].") for reason in rejected)


_SECRET = "s3cret-value"


@pytest.mark.parametrize(
    ("op", "expected"),
    [
        pytest.param(
            lambda r: {"op": "tab.upsert", "version": 1, "record": {**r, "position": -1}},
            "ops[{i}].tab.upsert.record.position: Input should be greater than or equal to 0",
            id="a-field",
        ),
        pytest.param(
            lambda r: {"op": f"tab.{_SECRET}", "version": 1, "record": r},
            "ops[{i}].op: not an operation of this format",
            id="unknown-op",
        ),
        pytest.param(lambda r: {"version": 1, "record": r}, "ops[{i}].op: Field required", id="no-op"),
        pytest.param(lambda r: None, "ops[{i}]: an operation is a JSON object, not a JSON null", id="null"),
        pytest.param(
            lambda r: _SECRET, "ops[{i}]: an operation is a JSON object, not a JSON string", id="string"
        ),
        pytest.param(lambda r: [r], "ops[{i}]: an operation is a JSON object, not a JSON array", id="array"),
        pytest.param(
            lambda r: {"op": "tab.upsert", "version": 1, "record": _SECRET},
            "ops[{i}].tab.upsert.record: Input should be a JSON object",
            id="record-not-an-object",
        ),
    ],
)
@pytest.mark.parametrize("alone", [True, False], ids=["every-op-invalid", "beside-a-valid-op"])
def test_an_invalid_operation_is_named_by_position_and_field_never_by_value(
    op: Any, expected: str, alone: bool
) -> None:
    payload = payload_of(producer_job_data())
    record = {**tab(uuid.uuid4()).model_dump(mode="json"), "name": _SECRET}
    ops = [op(record), op(record)] if alone else [payload["ops"][0], op(record)]
    payload = {**payload, "ops": ops}
    assert parse_apply_batch(rq_job_data(payload)) is None  # left to the job function's fallback
    if alone:
        with pytest.raises(PoisonBatch) as raised:
            parse_batch(payload)
        reason = str(raised.value)
        assert reason.startswith("none of the 2 operations is valid: ")
        assert expected.format(i=0) in reason and expected.format(i=1) in reason, reason
    else:
        _, valid, rejected = parse_batch(payload)
        assert len(valid) == 1 and rejected == [expected.format(i=1)]
        reason = "; ".join(rejected)
    assert _SECRET not in reason and "valid dictionary" not in reason and "ops.0" not in reason


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(
            lambda p: {**p, "ops": [*p["ops"], {"op": "pane.explode", "version": 1}]}, id="unknown-op"
        ),
        pytest.param(lambda p: {**p, "surprise": True}, id="extra-envelope-field"),
        pytest.param(lambda p: {**p, "ops": []}, id="no-ops"),
        pytest.param(lambda p: {**p, "origin": "no spaces allowed"}, id="bad-origin"),
    ],
)
def test_a_batch_that_does_not_validate_whole_is_not_parsed(change: Any) -> None:
    data = rq_job_data(change(payload_of(producer_job_data())))
    assert parse_apply_batch(data) is None
    assert JobSerializer.loads(data) == JSONSerializer.loads(data)  # type: ignore[no-untyped-call]


def test_a_batch_of_the_previous_format_falls_back_and_is_still_accepted() -> None:
    assert FORMAT_VERSION - 1 in SUPPORTED_FORMATS
    s = session()
    t = tab(s.id)
    p = pane(t.id)
    content = base64.b64encode(b"$ make\n").decode()
    old = {
        "format": FORMAT_VERSION - 1,
        "id": str(uuid.uuid4()),
        "origin": "rust-perth",
        "created_at": datetime.now(UTC).isoformat(),
        "ops": [
            {"op": "session.upsert", "version": 1, "record": s.model_dump(mode="json")},
            # format 1: no encoding, no raw_size
            {"op": "history.append", "version": 2, "pane_id": str(p.id), "tab_id": str(t.id),
             "session_id": str(s.id), "chunk_index": 0, "content": content},
        ],
    }  # fmt: skip
    data = rq_job_data(old)
    assert parse_apply_batch(data) is None
    func, _, args, _ = JobSerializer.loads(data)
    assert func == JOB_FUNCTION and args == [old]
    batch, valid, rejected = parse_batch(args[0])  # the job function upgrades it
    assert rejected == [] and len(valid) == 2
    assert batch.format == FORMAT_VERSION and isinstance(valid[1], HistoryAppend) and valid[1].raw_size == 7
    # even a format-1 batch that would be valid as format 2 is left to the job function
    same = {**payload_of(producer_job_data()), "format": FORMAT_VERSION - 1}
    assert parse_apply_batch(rq_job_data(same)) is None


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(lambda p: rq_job_data(p, extra=1), id="extra-kwargs"),
        pytest.param(lambda p: rq_job_data(p, p), id="two-args"),
        pytest.param(lambda p: rq_job_data(), id="no-args"),
        pytest.param(lambda p: rq_job_data(p, instance={"a": 1}), id="an-instance"),
        pytest.param(lambda p: json.dumps([JOB_FUNCTION, None, [p], {}, "x"]).encode(), id="five-items"),
        pytest.param(lambda p: json.dumps({"func": JOB_FUNCTION, "args": [p]}).encode(), id="an-object"),
    ],
)
def test_job_data_of_another_shape_is_not_parsed(data: Any) -> None:
    raw = data(payload_of(producer_job_data()))
    assert parse_apply_batch(raw) is None
    assert JobSerializer.loads(raw) == JSONSerializer.loads(raw)  # type: ignore[no-untyped-call]


@pytest.mark.parametrize(
    "job",
    [
        [JOB_FUNCTION, None, [{"format": 2}], {}],
        ["workers.maintenance.cleanup", None, [], {"older_than": 86400.0}],
        ["workers.maintenance.cleanup", None, [], {}],
        {"applied": 3, "rows": {"panes": 2}, "ms": 1.5, "text": "café ☕"},  # a job's result
        {"perth_refused": "ops[1].record.position: ..."},  # a job's meta
        [],
        None,
    ],
)
def test_ordinary_job_data_round_trips_as_json(job: Any) -> None:
    data = JobSerializer.dumps(job)
    assert json.loads(data) == job  # plain JSON on the wire
    assert JobSerializer.loads(data) == job


def test_a_parsed_batch_serializes_back_to_the_same_batch() -> None:
    loaded = JobSerializer.loads(producer_job_data())
    again = JobSerializer.loads(JobSerializer.dumps(loaded))
    assert again[2][0].batch == loaded[2][0].batch


def test_it_never_pickles_or_unpickles(tmp_path: Any) -> None:
    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self) -> Any:
            return (open, (str(marker), "w"))

    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        data = pickle.dumps((JOB_FUNCTION, None, [Evil()], {}), protocol=protocol)
        assert parse_apply_batch(data) is None
        with pytest.raises(ValueError):  # json's errors (JSONDecodeError, UnicodeDecodeError) are ValueErrors
            JobSerializer.loads(data)
    assert not marker.exists()
    with pytest.raises(TypeError):
        JobSerializer.dumps((JOB_FUNCTION, None, [object()], {}))
