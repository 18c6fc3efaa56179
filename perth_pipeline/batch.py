"""Turning drained buffer state into batches: the JSON that goes on the queue.

This runs in the flusher thread. It writes the wire format of
:mod:`perth_pipeline.records` directly (plain dicts through the C JSON encoder,
a few microseconds an operation) and yields the interpreter lock every few
operations, so that no stretch of it keeps a write call of the terminal waiting
for more than about a millisecond (CPython hands the lock over only every 5 ms
otherwise). Batches are cut at ``max_ops`` operations or ``max_bytes`` of JSON.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import zstandard

from .buffer import PANE, SESSION, TAB, TEMPLATE, Chunk, Drained, Item, Touch
from .records import FORMAT_VERSION, PaneRecord, SessionRecord, TabRecord, TemplateRecord

__all__ = ["JOB_FUNCTION", "EncodedBatch", "encode_batches"]

#: The one job function that crosses the queue (workers allowlist it by this name).
JOB_FUNCTION = "workers.jobs.apply_batch"

#: Operations encoded between two voluntary releases of the interpreter lock.
_SLICE = 32
#: Chunks smaller than this are sent as they are: compressing them saves nothing.
_MIN_COMPRESS = 128

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


@dataclass(slots=True)
class EncodedBatch:
    """One job's worth of operations, encoded, with what it carries for bookkeeping."""

    id: str
    data: bytes  # RQ job data: JSON of [function, instance, args, kwargs]
    description: str
    items: list[Item] = field(default_factory=list)
    touches: list[Touch] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    sessions: list[UUID] = field(default_factory=list)
    min_seq: int = 0
    max_seq: int = 0

    @property
    def ops(self) -> int:
        return len(self.items) + len(self.touches) + len(self.chunks)


def _iso(value: datetime) -> str:
    return value.isoformat()


def item_op(item: Item) -> dict[str, Any]:
    """The wire form of one entity operation (an upsert carries the whole record)."""
    kind, key, version = item.kind, item.key, item.version
    if item.deleted:
        if kind == SESSION:
            return {"op": "session.delete", "version": version, "id": str(key[1])}
        if kind == TAB:
            return {
                "op": "tab.delete",
                "version": version,
                "id": str(key[1]),
                "session_id": str(item.session_id),
            }
        if kind == PANE:
            return {
                "op": "pane.delete",
                "version": version,
                "id": str(key[1]),
                "tab_id": str(item.tab_id),
                "session_id": str(item.session_id),
            }
        return {"op": "template.delete", "version": version, "name": key[1]}
    record = item.record
    if kind == PANE:
        assert isinstance(record, PaneRecord)
        return {
            "op": "pane.upsert",
            "version": version,
            "session_id": str(item.session_id),
            "record": {
                "id": str(record.id),
                "tab_id": str(record.tab_id),
                "pane_id": record.pane_id,
                "pane_type": record.pane_type,
                "component_state": item.snapshot,
                "title": record.title,
                "cwd": record.cwd,
                "command": record.command,
            },
        }
    if kind == TAB:
        assert isinstance(record, TabRecord)
        return {
            "op": "tab.upsert",
            "version": version,
            "record": {
                "id": str(record.id),
                "session_id": str(record.session_id),
                "position": record.position,
                "name": record.name,
                "layout_blob": item.snapshot,
            },
        }
    if kind == SESSION:
        assert isinstance(record, SessionRecord)
        return {
            "op": "session.upsert",
            "version": version,
            "record": {
                "id": str(record.id),
                "name": record.name,
                "template_name": record.template_name,
                "created_at": _iso(record.created_at),
                "last_active": _iso(record.last_active),
            },
        }
    assert kind == TEMPLATE and isinstance(record, TemplateRecord)
    return {
        "op": "template.upsert",
        "version": version,
        "record": {"id": str(record.id), "name": record.name, "definition": item.snapshot},
    }


def touch_op(touch: Touch) -> dict[str, Any]:
    return {
        "op": "session.touch",
        "version": touch.version,
        "id": str(touch.session_id),
        "last_active": _iso(touch.last_active),
    }


def chunk_op(chunk: Chunk, compressor: zstandard.ZstdCompressor | None) -> dict[str, Any]:
    raw = chunk.chunk.content
    encoding, payload = "identity", raw
    if compressor is not None and len(raw) >= _MIN_COMPRESS:
        packed = compressor.compress(raw)
        if len(packed) < len(raw):
            encoding, payload = "zstd", packed
    return {
        "op": "history.append",
        "version": chunk.version,
        "pane_id": str(chunk.chunk.pane_id),
        "tab_id": str(chunk.tab_id),
        "session_id": str(chunk.session_id),
        "chunk_index": chunk.chunk.chunk_index,
        "encoding": encoding,
        "raw_size": len(raw),
        "content": base64.b64encode(payload).decode("ascii"),
    }


def _entries(
    drained: Drained, compressor: zstandard.ZstdCompressor | None
) -> Iterator[tuple[str, Item | Touch | Chunk, UUID | None]]:
    """(json, source, session) per operation, releasing the interpreter lock every few."""
    for touch in drained.touches:
        yield _dumps(touch_op(touch)), touch, touch.session_id
    # sessions first, then tabs, panes, templates: a batch reads top-down, and that is also the
    # order in which a worker applies it.
    order = {SESSION: 0, TAB: 1, PANE: 2, TEMPLATE: 3}
    for n, item in enumerate(sorted(drained.items, key=lambda i: order[i.kind]), 1):
        if n % _SLICE == 0:
            time.sleep(0)
        yield _dumps(item_op(item)), item, item.session_id
    for chunk in drained.chunks:
        time.sleep(0)
        yield _dumps(chunk_op(chunk, compressor)), chunk, chunk.session_id


def encode_batches(
    drained: Drained,
    *,
    origin: str,
    max_ops: int,
    max_bytes: int,
    compressor: zstandard.ZstdCompressor | None = None,
) -> list[EncodedBatch]:
    """Encode ``drained`` into batches of at most ``max_ops`` operations and ``max_bytes`` bytes."""
    batches: list[EncodedBatch] = []
    parts: list[str] = []
    size = 0
    current = _new_batch()
    sessions: set[UUID] = set()

    def close() -> None:
        nonlocal parts, size, current, sessions
        if parts:
            current.sessions = sorted(sessions)
            _finish(current, parts, origin)
            batches.append(current)
        parts, size, current, sessions = [], 0, _new_batch(), set()

    for text, source, session_id in _entries(drained, compressor):
        if parts and (len(parts) >= max_ops or size + len(text) + 1 > max_bytes):
            close()
        parts.append(text)
        size += len(text) + 1
        if session_id is not None:
            sessions.add(session_id)
        if isinstance(source, Item):
            current.items.append(source)
        elif isinstance(source, Touch):
            current.touches.append(source)
        else:
            current.chunks.append(source)
    close()
    return batches


def _new_batch() -> EncodedBatch:
    return EncodedBatch(id=str(uuid.uuid4()), data=b"", description="")


def _finish(batch: EncodedBatch, parts: list[str], origin: str) -> None:
    created = datetime.now(UTC).isoformat()
    head = (
        f'{{"format":{FORMAT_VERSION},"id":"{batch.id}","origin":"{origin}","created_at":"{created}","ops":['
    )
    payload = head + ",".join(parts) + "]}"
    batch.data = f'["{JOB_FUNCTION}",null,[{payload}],{{}}]'.encode()
    seqs = [i.seq for i in batch.items] + [t.seq for t in batch.touches] + [c.seq for c in batch.chunks]
    batch.min_seq, batch.max_seq = min(seqs), max(seqs)
    batch.description = describe(batch.ops, batch.sessions, len(batch.chunks))


def describe(ops: int, sessions: list[UUID], chunks: int = 0) -> str:
    """What the dashboard shows for a batch: counts and ids only, never the user's data."""
    shown = ", ".join(str(s)[:8] for s in sessions[:3])
    more = f" +{len(sessions) - 3}" if len(sessions) > 3 else ""
    history = f", {chunks} scrollback chunks" if chunks else ""
    noun = "session" if len(sessions) == 1 else "sessions"
    return f"apply_batch: {ops} ops{history} for {len(sessions)} {noun} [{shown}{more}]"
