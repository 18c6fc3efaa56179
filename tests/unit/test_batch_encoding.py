"""perth_pipeline.batch: the JSON it writes directly is the wire format, cut within the bounds.

The encoder writes text without building dicts; these tests hold it to a reference built the
plain way (dicts through json.dumps) and to the workers' own validation.
"""

from __future__ import annotations

import base64
import json
import uuid
import zlib
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import fakeredis
import zstandard
from rq.job import Job
from rq.serializers import JSONSerializer

from perth_pipeline import PaneHistoryChunk, PaneRecord, SessionRecord, TabRecord, TemplateRecord
from perth_pipeline.batch import JOB_FUNCTION, PackedJob, describe, encode_batches
from perth_pipeline.broker import make_queue
from perth_pipeline.buffer import PANE, SESSION, TAB, TEMPLATE, Buffer, Drained, Item
from perth_pipeline.operations import BATCH_ADAPTER

from ..helpers import make_buffer

TRICKY = 'é "quoted" \\ back\nslash\t\u2028 \U0001f600 </script>'


def _filled() -> tuple[Buffer, list[PaneRecord]]:
    b = make_buffer(
        max_entities=10_000,
        max_pending_history_bytes=1 << 22,
        max_json_bytes=1 << 18,
        max_chunk_bytes=1 << 18,
    )
    now = datetime(2024, 5, 1, 12, 0, tzinfo=timezone(timedelta(hours=2)))
    s = SessionRecord(id=uuid.uuid4(), name=TRICKY, template_name="dev", created_at=now, last_active=now)
    b.put_session(s)
    t = TabRecord(
        id=uuid.uuid4(), session_id=s.id, position=3, name=TRICKY, layout_blob={"k": [1, 2.5, None]}
    )
    b.put_tab(t)
    panes = [
        PaneRecord(
            id=uuid.uuid4(),
            tab_id=t.id,
            pane_id=f"terminal_{n}",
            pane_type="bloodbank-feed" if n % 2 else "terminal",
            component_state={"scroll": n, "nested": {"t": TRICKY, "ok": True}},
            title=TRICKY if n == 0 else f"t{n}",
            cwd=None if n % 3 else "/home/é",
            command="vim" if n == 1 else None,
        )
        for n in range(40)
    ]
    for p in panes:
        b.put_pane(p)
    b.put_template(TemplateRecord(id=uuid.uuid4(), name=TRICKY, definition={"tabs": [{"name": "x"}]}))
    b.touch_session(uuid.uuid4(), datetime.now(UTC))
    for i in range(3):
        b.append_history(PaneHistoryChunk(pane_id=panes[0].id, chunk_index=i, content=b"$ ls\n" * (50 * i)))
    return b, panes


def _reference(item: Item) -> dict[str, Any]:
    """The wire form of one operation, built the plain way."""
    kind, record = item.kind, item.record
    if item.deleted:
        op: dict[str, Any] = {"op": f"{kind}.delete", "version": item.version}
        if kind == TEMPLATE:
            return {**op, "name": item.key[1]}
        op["id"] = str(item.key[1])
        if kind == PANE:
            op["tab_id"] = str(item.tab_id)
        if kind in (TAB, PANE):
            op["session_id"] = str(item.session_id)
        return op
    assert record is not None
    data = record.model_dump(mode="json")
    field = {TAB: "layout_blob", PANE: "component_state", TEMPLATE: "definition"}.get(kind)
    if field is not None:
        data[field] = item.snapshot
    if kind == SESSION:
        data["created_at"] = record.created_at.isoformat()  # type: ignore[union-attr]
        data["last_active"] = record.last_active.isoformat()  # type: ignore[union-attr]
    op = {"op": f"{kind}.upsert", "version": item.version, "record": data}
    if kind == PANE:
        op["session_id"] = str(item.session_id)
    return op


def _ops(data: bytes) -> list[dict[str, Any]]:
    func, instance, args, kwargs = json.loads(data)
    assert (func, instance, kwargs) == (JOB_FUNCTION, None, {})
    ops: list[dict[str, Any]] = args[0]["ops"]
    return ops


def test_the_text_is_the_wire_format_and_the_workers_accept_it() -> None:
    b, _ = _filled()
    drained = b.drain(10_000)
    compressor = zstandard.ZstdCompressor()
    batches = encode_batches(
        drained, origin="p1-test", max_ops=1000, max_bytes=1 << 20, compressor=compressor
    )
    assert len(batches) == 1
    batch = batches[0]
    ops = _ops(batch.data)
    parsed = BATCH_ADAPTER.validate_python(json.loads(batch.data)[2][0])
    assert parsed.origin == "p1-test" and str(parsed.id) == batch.id and len(parsed.ops) == batch.ops
    # touches first, then sessions, tabs, panes, templates, then scrollback in the order written
    kinds = [op["op"] for op in ops]
    assert kinds[0] == "session.touch"
    entity_ops = [op for op in ops if op["op"] not in ("session.touch", "history.append")]
    assert entity_ops == [_reference(item) for item in batch.items]
    history = [op for op in ops if op["op"] == "history.append"]
    assert [op["chunk_index"] for op in history] == [0, 1, 2]
    for op, chunk in zip(history, batch.chunks, strict=True):
        raw = base64.b64decode(op["content"])
        content = zstandard.ZstdDecompressor().decompress(raw) if op["encoding"] == "zstd" else raw
        assert content == chunk.chunk.content and op["raw_size"] == len(content)
    assert batch.sessions == parsed.session_ids()  # the routing keys of what it carries
    seqs = [i.seq for i in batch.items] + [t.seq for t in batch.touches] + [c.seq for c in batch.chunks]
    assert (batch.min_seq, batch.max_seq) == (min(seqs), max(seqs))
    assert TRICKY not in batch.description  # counts and ids only
    assert zlib.decompress(batch.packed) == batch.data


def test_deletes_are_encoded_as_the_reference() -> None:
    b, panes = _filled()
    b.drain(10_000)
    b.delete(PANE, panes[1].id)
    b.delete(TEMPLATE, TRICKY)
    drained = b.drain(10_000)
    (batch,) = encode_batches(drained, origin="p1-test", max_ops=100, max_bytes=1 << 20)
    assert _ops(batch.data) == [_reference(item) for item in batch.items]
    BATCH_ADAPTER.validate_python(json.loads(batch.data)[2][0])


def test_batches_are_cut_at_the_operation_and_byte_bounds() -> None:
    b, _ = _filled()
    drained = b.drain(10_000)
    total = len(drained)
    by_ops = encode_batches(drained, origin="p1-test", max_ops=7, max_bytes=1 << 20)
    assert [x.ops for x in by_ops[:-1]] == [7] * (len(by_ops) - 1) and sum(x.ops for x in by_ops) == total
    by_bytes = encode_batches(drained, origin="p1-test", max_ops=1000, max_bytes=4096)
    assert len(by_bytes) > 1 and sum(x.ops for x in by_bytes) == total
    for x in by_bytes:
        payload = json.dumps(json.loads(x.data)[2][0]["ops"], separators=(",", ":"), ensure_ascii=False)
        assert x.ops == 1 or len(payload.encode()) <= 4096 + 64
    # every operation once, in the same order, however cut
    assert [op for x in by_ops for op in _ops(x.data)] == [op for x in by_bytes for op in _ops(x.data)]


def test_a_packed_job_stores_the_data_compressed_once() -> None:
    b, _ = _filled()
    (batch,) = encode_batches(b.drain(10_000), origin="p1-test", max_ops=1000, max_bytes=1 << 20)
    client = fakeredis.FakeRedis()
    queue = make_queue("unit", client, job_class=PackedJob)
    job = queue.create_job(JOB_FUNCTION, job_id=batch.id)
    assert isinstance(job, PackedJob)
    job.use_packed(batch.data, batch.packed)
    queue.enqueue_job(job)
    assert client.hget(f"rq:job:{batch.id}", "data") == batch.packed  # as compressed by encode_batches
    fetched = Job.fetch(batch.id, connection=client, serializer=JSONSerializer)
    assert fetched.data == batch.data and fetched.func_name == JOB_FUNCTION
    # a job whose data changed since is compressed anew, as RQ does
    job.data = b'["workers.jobs.apply_batch",null,[{}],{}]'
    job.save()
    assert zlib.decompress(client.hget(f"rq:job:{batch.id}", "data") or b"") == job.data
    client.close()


def test_nothing_to_send_gives_no_batch() -> None:
    assert encode_batches(Drained(), origin="p1-test", max_ops=10, max_bytes=4096) == []


def test_the_description_counts_in_words_and_shows_no_data() -> None:
    one, two, three, four = (uuid.UUID(int=n << 96) for n in range(1, 5))
    assert describe(1, [one]) == f"apply_batch: 1 op for 1 session [{str(one)[:8]}]"
    assert describe(2, [one, two], chunks=1) == (
        f"apply_batch: 2 ops, 1 scrollback chunk for 2 sessions [{str(one)[:8]}, {str(two)[:8]}]"
    )
    many = describe(900, [one, two, three, four], chunks=3)
    assert many.startswith("apply_batch: 900 ops, 3 scrollback chunks for 4 sessions [")
    assert many.endswith(" +1]") and str(four)[:8] not in many


def test_template_operations_are_described_as_such_not_as_ops_for_no_session() -> None:
    one = uuid.UUID(int=1 << 96)
    assert describe(1, [], templates=1) == "apply_batch: 1 template op"
    assert (
        describe(3, [one], templates=2)
        == f"apply_batch: 1 op for 1 session [{str(one)[:8]}] and 2 template ops"
    )
    b = make_buffer()
    b.put_template(TemplateRecord(id=uuid.uuid4(), name="dev", definition={"tabs": []}))
    (batch,) = encode_batches(b.drain(100), origin="p1-test", max_ops=100, max_bytes=1 << 20)
    assert batch.description == "apply_batch: 1 template op"
    b.delete(TEMPLATE, "dev")
    s = SessionRecord(id=one, name="work", created_at=datetime.now(UTC), last_active=datetime.now(UTC))
    b.put_session(s)
    (batch,) = encode_batches(b.drain(100), origin="p1-test", max_ops=100, max_bytes=1 << 20)
    assert batch.description == f"apply_batch: 1 op for 1 session [{str(one)[:8]}] and 1 template op"
