"""Turning drained buffer state into batches: the JSON that goes on the queue.

This runs in the flusher thread, beside the terminal's threads, so it is written
for two things:

* Speed. What encodes what:

  - each operation's JSON text: :mod:`perth_pipeline.opjson`, through msgspec (one
    :class:`msgspec.Struct` per operation, written in C), or through f-strings, the
    :mod:`json` C string encoder and :func:`~perth_pipeline.limits.compact_json` where msgspec
    would write other bytes (a float in a JSON field, for one). msgspec writes the same bytes,
    faster (issue 15, ``tests/bench_op_json.py``: a pane upsert 1.3 µs of CPU against 3.4);
  - the batch around them (the envelope and RQ's job data): :mod:`perth_pipeline.wire`, by
    joining the operations' texts, never by parsing or building them again;
  - scrollback: zstd here, per chunk (:func:`~perth_pipeline.opjson.chunk_json`), and the whole
    job data with zlib at level 1, once (below).

  The text is the wire format of :mod:`perth_pipeline.records` (the workers validate it with
  those models); the op names, the envelope and the job data around it are
  :mod:`perth_pipeline.wire`'s.
* Short stretches. CPython lets a thread that waits for the interpreter lock take
  it by force only after ``sys.getswitchinterval()`` (5 ms), so a long pure-Python
  loop here would make a write call of the terminal wait that long. The encoder
  checks the clock every few operations and, after about half a millisecond of
  work, sleeps for a few microseconds: a real sleep, which releases the lock long
  enough for a waiting thread to take it (``time.sleep(0)`` releases it for so
  short a moment that the waiting thread rarely gets it, and the wait starts over).
  (Each operation is encoded by a call of its own, never a whole batch at once, so that
  the clock is looked at between them.)

Batches are cut at ``max_ops`` operations or ``max_bytes`` of JSON. Each batch's job data
is also compressed here, once, at zlib level 1 (:class:`PackedJob` hands it to Redis as it is:
RQ would compress it again at level 6, about 9 ms for a batch of 1,000 panes on a small machine).
"""

from __future__ import annotations

import time
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import zstandard
from rq.job import Job

from . import rqcompat, wire
from .buffer import PANE, SESSION, TAB, TEMPLATE, Chunk, Drained, Item, Touch
from .opjson import Ids, chunk_json, item_json, touch_json
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

_ORDER = {SESSION: 0, TAB: 1, PANE: 2}  # templates last: a batch reads top-down


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
    ids = Ids()
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
