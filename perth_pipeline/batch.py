"""Turning drained buffer state into batches: the JSON that goes on the queue.

This runs in the flusher thread, beside the terminal's threads, so it is written
for two things:

* Speed. Each operation is written as JSON text directly: fixed keys in an
  f-string, strings through the C string encoder of :mod:`json`, JSON fields
  through one reusable C encoder, UUIDs of parents formatted once per batch. No
  intermediate dict, no :class:`json.JSONEncoder` set up per call. The text is
  the wire format of :mod:`perth_pipeline.records` (the workers validate it with
  those models); the op names, the envelope and the job data around it are
  :mod:`perth_pipeline.wire`'s.
* Short stretches. CPython lets a thread that waits for the interpreter lock take
  it by force only after ``sys.getswitchinterval()`` (5 ms), so a long pure-Python
  loop here would make a write call of the terminal wait that long. The encoder
  checks the clock every few operations and, after about half a millisecond of
  work, sleeps for a few microseconds: a real sleep, which releases the lock long
  enough for a waiting thread to take it (``time.sleep(0)`` releases it for so
  short a moment that the waiting thread rarely gets it, and the wait starts over).

Batches are cut at ``max_ops`` operations or ``max_bytes`` of JSON. Each batch's job data
is also compressed here, once, at zlib level 1 (:class:`PackedJob` hands it to Redis as it is:
RQ would compress it again at level 6, about 9 ms for a batch of 1,000 panes on a small machine).
"""

from __future__ import annotations

import base64
import time
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from json.encoder import encode_basestring
from typing import Any
from uuid import UUID

import zstandard
from rq.job import Job

from . import rqcompat, wire
from .buffer import PANE, SESSION, TAB, TEMPLATE, Chunk, Drained, Item, Touch
from .limits import compact_json
from .records import PaneRecord, SessionRecord, TabRecord, TemplateRecord
from .units import plural

__all__ = ["JOB_FUNCTION", "EncodedBatch", "PackedJob", "describe", "encode_batches"]

#: The one job function that crosses the queue (workers allowlist it by this name).
JOB_FUNCTION = wire.APPLY_BATCH

#: Seconds of encoding after which the flusher lets the terminal's threads run.
_SLICE = 0.0005
#: How long it sleeps then: long enough for a waiting thread to wake and take the lock.
_YIELD = 0.00002
#: Operations encoded between two looks at the clock.
_CHECK_EVERY = 8
#: Chunks smaller than this are sent as they are: compressing them saves nothing.
_MIN_COMPRESS = 128

_ORDER = {SESSION: 0, TAB: 1, PANE: 2}  # templates last: a batch reads top-down


_json = compact_json
_str = encode_basestring  # a quoted, escaped JSON string (as json.dumps(ensure_ascii=False))


def _opt(value: str | None) -> str:
    return "null" if value is None else _str(value)


def _head(op: str) -> str:
    """The start of an operation's JSON, up to its version: ``{"op":"<op>","version":``."""
    return f'{{"op":"{op}","version":'


_SESSION_UPSERT = _head(wire.SESSION_UPSERT)
_SESSION_DELETE = _head(wire.SESSION_DELETE)
_SESSION_TOUCH = _head(wire.SESSION_TOUCH)
_TAB_UPSERT = _head(wire.TAB_UPSERT)
_TAB_DELETE = _head(wire.TAB_DELETE)
_PANE_UPSERT = _head(wire.PANE_UPSERT)
_PANE_DELETE = _head(wire.PANE_DELETE)
_HISTORY_APPEND = _head(wire.HISTORY_APPEND)
_TEMPLATE_UPSERT = _head(wire.TEMPLATE_UPSERT)
_TEMPLATE_DELETE = _head(wire.TEMPLATE_DELETE)


@dataclass(slots=True)
class EncodedBatch:
    """One job's worth of operations, encoded, with what it carries for bookkeeping."""

    id: str
    data: bytes  # RQ job data: JSON of [function, instance, args, kwargs]
    description: str
    packed: bytes = b""  # ``data`` compressed (zlib), as RQ stores it
    items: list[Item] = field(default_factory=list)
    touches: list[Touch] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    sessions: list[UUID] = field(default_factory=list)
    min_seq: int = 0
    max_seq: int = 0

    @property
    def ops(self) -> int:
        return len(self.items) + len(self.touches) + len(self.chunks)


class _Ids:
    """The text of UUIDs that repeat within a batch (a tab's or a session's id under many panes)."""

    __slots__ = ("_text",)

    def __init__(self) -> None:
        self._text: dict[int | None, str] = {}

    def __call__(self, value: UUID | None) -> str:
        # keyed by the UUID's int: hashing a UUID runs Python code, hashing an int does not
        key = None if value is None else value.int
        text = self._text.get(key)
        if text is None:
            text = str(value)
            self._text[key] = text
        return text


def _delete_json(item: Item, ids: _Ids) -> str:
    kind, key, version = item.kind, item.key, item.version
    if kind == SESSION:
        return f'{_SESSION_DELETE}{version},"id":"{key[1]}"}}'
    if kind == TAB:
        return f'{_TAB_DELETE}{version},"id":"{key[1]}","session_id":"{ids(item.session_id)}"}}'
    if kind == PANE:
        return (
            f'{_PANE_DELETE}{version},"id":"{key[1]}","tab_id":"{ids(item.tab_id)}",'
            f'"session_id":"{ids(item.session_id)}"}}'
        )
    return f'{_TEMPLATE_DELETE}{version},"name":{_str(key[1])}}}'


def item_json(item: Item, ids: _Ids) -> str:
    """The wire form of one entity operation (an upsert carries the whole record)."""
    if item.deleted:
        return _delete_json(item, ids)
    kind, record = item.kind, item.record
    if kind == PANE:
        assert isinstance(record, PaneRecord)
        return (
            f'{_PANE_UPSERT}{item.version},"session_id":"{ids(item.session_id)}",'
            f'"record":{{"id":"{record.id}","tab_id":"{ids(record.tab_id)}",'
            f'"pane_id":{_str(record.pane_id)},"pane_type":{_str(record.pane_type)},'
            f'"component_state":{_json(item.snapshot)},"title":{_str(record.title)},'
            f'"cwd":{_opt(record.cwd)},"command":{_opt(record.command)}}}}}'
        )
    if kind == TAB:
        assert isinstance(record, TabRecord)
        return (
            f'{_TAB_UPSERT}{item.version},"record":{{"id":"{record.id}",'
            f'"session_id":"{ids(record.session_id)}","position":{record.position},'
            f'"name":{_str(record.name)},"layout_blob":{_json(item.snapshot)}}}}}'
        )
    if kind == SESSION:
        assert isinstance(record, SessionRecord)
        return (
            f'{_SESSION_UPSERT}{item.version},"record":{{"id":"{record.id}",'
            f'"name":{_str(record.name)},"template_name":{_opt(record.template_name)},'
            f'"created_at":"{record.created_at.isoformat()}","last_active":"{record.last_active.isoformat()}"}}}}'
        )
    assert isinstance(record, TemplateRecord)
    return (
        f'{_TEMPLATE_UPSERT}{item.version},"record":{{"id":"{record.id}",'
        f'"name":{_str(record.name)},"definition":{_json(item.snapshot)}}}}}'
    )


def touch_json(touch: Touch) -> str:
    return (
        f'{_SESSION_TOUCH}{touch.version},"id":"{touch.session_id}",'
        f'"last_active":"{touch.last_active.isoformat()}"}}'
    )


def chunk_json(chunk: Chunk, compressor: zstandard.ZstdCompressor | None, ids: _Ids) -> str:
    raw = chunk.chunk.content
    encoding, payload = wire.IDENTITY, raw
    if compressor is not None and len(raw) >= _MIN_COMPRESS:
        packed = compressor.compress(raw)  # releases the interpreter lock while it works
        if len(packed) < len(raw):
            encoding, payload = wire.ZSTD, packed
    return (
        f'{_HISTORY_APPEND}{chunk.version},"pane_id":"{chunk.chunk.pane_id}",'
        f'"tab_id":"{ids(chunk.tab_id)}","session_id":"{ids(chunk.session_id)}",'
        f'"chunk_index":{chunk.chunk.chunk_index},"encoding":"{encoding}","raw_size":{len(raw)},'
        f'"content":"{base64.b64encode(payload).decode("ascii")}"}}'
    )


class _Pacer:
    """Sleeps briefly after each ``_SLICE`` of work, so that no stretch holds the lock for long."""

    __slots__ = ("_count", "_since")

    def __init__(self) -> None:
        self._count = 0
        self._since = time.perf_counter()

    def tick(self) -> None:
        self._count += 1
        if self._count % _CHECK_EVERY == 0:
            self.pause_if_due()

    def pause_if_due(self) -> None:
        if time.perf_counter() - self._since >= _SLICE:
            time.sleep(_YIELD)
            self._since = time.perf_counter()


class _Batches:
    """Cuts the encoded operations into batches of at most ``max_ops`` and ``max_bytes``."""

    def __init__(self, origin: str, max_ops: int, max_bytes: int, pacer: _Pacer) -> None:
        self.origin, self.max_ops, self.max_bytes, self.pacer = origin, max_ops, max_bytes, pacer
        self.done: list[EncodedBatch] = []
        self._start()

    def _start(self) -> None:
        self.parts: list[str] = []
        self.size = 0
        self.current = EncodedBatch(id=str(uuid.uuid4()), data=b"", description="")
        self.sessions: set[UUID] = set()
        self._last_session: UUID | None = None

    def add(self, text: str, session_id: UUID | None) -> EncodedBatch:
        """Add one operation's JSON; returns the batch it went into (for its bookkeeping)."""
        if self.parts and (len(self.parts) >= self.max_ops or self.size + len(text) + 1 > self.max_bytes):
            self.close()
        self.parts.append(text)
        self.size += len(text) + 1
        if session_id is not None and session_id is not self._last_session:
            self.sessions.add(session_id)
            self._last_session = session_id
        self.pacer.tick()
        return self.current

    def close(self) -> None:
        if self.parts:
            batch = self.current
            batch.sessions = sorted(self.sessions)
            created = datetime.now(UTC).isoformat()
            batch.data = wire.apply_batch_data(wire.batch_text(batch.id, self.origin, created, self.parts))
            batch.packed = zlib.compress(batch.data, 1)  # releases the interpreter lock while it works
            seqs = (
                [i.seq for i in batch.items] + [t.seq for t in batch.touches] + [c.seq for c in batch.chunks]
            )
            batch.min_seq, batch.max_seq = min(seqs), max(seqs)
            templates = sum(1 for item in batch.items if item.kind == TEMPLATE)
            batch.description = describe(batch.ops, batch.sessions, len(batch.chunks), templates)
            self.done.append(batch)
            self.pacer.pause_if_due()
        self._start()


def encode_batches(
    drained: Drained,
    *,
    origin: str,
    max_ops: int,
    max_bytes: int,
    compressor: zstandard.ZstdCompressor | None = None,
) -> list[EncodedBatch]:
    """Encode ``drained`` into batches of at most ``max_ops`` operations and ``max_bytes`` bytes.

    Within the batches: session touches, then sessions, tabs, panes and templates (the order in
    which a worker applies them), then scrollback chunks in the order they were written.
    """
    pacer = _Pacer()
    out = _Batches(origin, max_ops, max_bytes, pacer)
    ids = _Ids()
    for touch in drained.touches:
        out.add(touch_json(touch), touch.session_id).touches.append(touch)
    for item in sorted(drained.items, key=lambda i: _ORDER.get(i.kind, 3)):
        out.add(item_json(item, ids), item.session_id).items.append(item)
    for chunk in drained.chunks:
        out.add(chunk_json(chunk, compressor, ids), chunk.session_id).chunks.append(chunk)
    out.close()
    return out.done


class PackedJob(Job):
    """An RQ job that stores data compressed beforehand (``packed``) instead of compressing it again.

    RQ's ``Job.to_dict`` compresses the job data at zlib's default level each time a job is
    saved; a batch is compressed once, faster, when it is encoded. RQ reads either back alike.
    (Its hold on RQ's private job data goes through :mod:`perth_pipeline.rqcompat`.)
    """

    packed: bytes | None = None

    def use_packed(self, data: bytes, packed: bytes) -> None:
        """Set the job data (``data``) and its compressed form."""
        self.data = data
        self.packed = packed
        self._packed_data = data

    def to_dict(self, include_meta: bool = True, include_result: bool = True) -> dict[str, Any]:
        if self.packed is None or rqcompat.stored_data(self) is not getattr(self, "_packed_data", None):
            return super().to_dict(include_meta=include_meta, include_result=include_result)
        # RQ compresses self.data: hand it nothing, then put the packed data in
        with rqcompat.data_withheld(self):
            obj = super().to_dict(include_meta=include_meta, include_result=include_result)
        obj["data"] = self.packed
        return obj


def describe(ops: int, sessions: Sequence[UUID | str], chunks: int = 0, templates: int = 0) -> str:
    """What the dashboard shows for a batch: counts and ids only, never the user's data.

    ``apply_batch: 18 ops, 3 scrollback chunks for 2 sessions [5e551011, 9c0d3f1a]``; template
    operations, which belong to no session, are counted on their own (``apply_batch: 1 template op``).
    """
    parts = []
    session_ops = ops - templates
    if session_ops or not templates:
        shown = ", ".join(str(s)[:8] for s in sessions[:3])
        more = f" +{len(sessions) - 3}" if len(sessions) > 3 else ""
        history = f", {plural(chunks, 'scrollback chunk')}" if chunks else ""
        parts.append(
            f"{plural(session_ops, 'op')}{history} for {plural(len(sessions), 'session')} [{shown}{more}]"
        )
    if templates:
        parts.append(plural(templates, "template op"))
    return "apply_batch: " + " and ".join(parts)
