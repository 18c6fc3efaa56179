"""The operations and the batch: the one argument of the one job that crosses the queue.

Operations wrap a record (:mod:`perth_pipeline.records`) with its version; a :class:`Batch` of
them is what ``workers.jobs.apply_batch`` takes. The same models validate a batch on both sides,
and ``batch.schema.json`` (exported from :class:`Batch`) lets a producer in another language put
the same batches on the queue. The names that are not models (op names, format versions, job
names) live in :mod:`perth_pipeline.wire`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any
from uuid import UUID

from pydantic import (
    AwareDatetime,
    Base64Bytes,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    model_validator,
)

from . import wire
from .limits import (
    MAX_CHUNK_BYTES,
    MAX_OPS_PER_BATCH,
    Name,
    Origin,
    Position,
    Timestamp,
    Version,
)
from .records import PaneRecord, SessionRecord, TabRecord, TemplateRecord
from .wire import FORMAT_VERSION

__all__ = [
    "BATCH_ADAPTER",
    "Batch",
    "BatchEnvelope",
    "HistoryAppend",
    "Operation",
    "PaneDelete",
    "PaneUpsert",
    "SessionDelete",
    "SessionTouch",
    "SessionUpsert",
    "TabDelete",
    "TabUpsert",
    "TemplateDelete",
    "TemplateUpsert",
    "batch_json_schema",
    "inflate_chunk",
    "session_of",
    "upgrade_payload",
]


# --- operations -----------------------------------------------------------------------------
#
# Every operation carries its version: a hybrid logical clock value of the producer that made
# it (see perth_pipeline.clock); the batch's ``origin`` breaks ties between producers. Operations
# below a session carry their ancestors' ids (which never change: a tab does not move to another
# session, a pane does not move to another tab), so that a worker can lock the session they
# belong to and check every ancestor's tombstone without a lookup.


class _Op(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Version


class SessionUpsert(_Op):
    op: wire.SessionUpsertName = wire.SESSION_UPSERT
    record: SessionRecord


class SessionDelete(_Op):
    op: wire.SessionDeleteName = wire.SESSION_DELETE
    id: UUID


class SessionTouch(_Op):
    """``last_active`` of a stored session the producer does not hold (after a restart)."""

    op: wire.SessionTouchName = wire.SESSION_TOUCH
    id: UUID
    last_active: Timestamp


class TabUpsert(_Op):
    op: wire.TabUpsertName = wire.TAB_UPSERT
    record: TabRecord


class TabDelete(_Op):
    op: wire.TabDeleteName = wire.TAB_DELETE
    id: UUID
    session_id: UUID


class PaneUpsert(_Op):
    op: wire.PaneUpsertName = wire.PANE_UPSERT
    session_id: UUID
    record: PaneRecord


class PaneDelete(_Op):
    op: wire.PaneDeleteName = wire.PANE_DELETE
    id: UUID
    tab_id: UUID
    session_id: UUID


class HistoryAppend(_Op):
    """A scrollback chunk. ``content`` is base64 of the bytes after ``encoding``."""

    op: wire.HistoryAppendName = wire.HISTORY_APPEND
    pane_id: UUID
    tab_id: UUID
    session_id: UUID
    chunk_index: Position
    encoding: wire.ChunkEncoding = wire.IDENTITY
    raw_size: Annotated[int, Field(ge=0, le=MAX_CHUNK_BYTES)]
    content: Annotated[Base64Bytes, Field(max_length=MAX_CHUNK_BYTES + 1024)]

    @model_validator(mode="after")
    def _inflates_to_raw_size(self) -> HistoryAppend:
        # a crafted chunk (a 2 KB zstd frame that declares 64 MiB) must not be stored: a restore
        # would have to inflate it
        inflate_chunk(self.content, self.encoding, self.raw_size)
        return self


def inflate_chunk(content: bytes, encoding: str, raw_size: int) -> bytes:
    """A chunk's bytes as written, from ``content`` as stored; ``ValueError`` unless exactly ``raw_size``.

    Never inflates more than ``raw_size`` + 1 bytes, whatever the frame declares (zstandard's own
    ``max_output_size`` is ignored when a frame states its size). The one decompressor of chunks,
    for the workers (who refuse a chunk that does not inflate to its size) and the reads.
    """
    if encoding == wire.IDENTITY:
        if len(content) != raw_size:
            raise ValueError(f"holds {len(content)} bytes, not its raw_size {raw_size}")
        return content
    if encoding != wire.ZSTD:
        raise ValueError(f"unknown encoding {encoding!r}")
    import io

    import zstandard

    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(content)) as reader:
            plain = reader.read(raw_size + 1)
    except zstandard.ZstdError as exc:
        raise ValueError(f"is not a valid zstd frame ({exc})") from None
    if len(plain) != raw_size:
        more = "+" if len(plain) > raw_size else ""
        raise ValueError(f"inflates to {len(plain)}{more} bytes, not its raw_size {raw_size}")
    return plain


class TemplateUpsert(_Op):
    op: wire.TemplateUpsertName = wire.TEMPLATE_UPSERT
    record: TemplateRecord


class TemplateDelete(_Op):
    op: wire.TemplateDeleteName = wire.TEMPLATE_DELETE
    name: Name


Operation = Annotated[
    SessionUpsert
    | SessionDelete
    | SessionTouch
    | TabUpsert
    | TabDelete
    | PaneUpsert
    | PaneDelete
    | HistoryAppend
    | TemplateUpsert
    | TemplateDelete,
    Field(discriminator="op"),
]


class Batch(BaseModel):
    """The payload of one ``apply_batch`` job: many operations, applied in one transaction."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        json_schema_extra={
            "$id": "https://perth.dev/schemas/perth-pipeline/batch.schema.json",
            "description": (
                f"The single positional argument of the RQ job '{wire.APPLY_BATCH}' "
                "(serialized with rq.serializers.JSONSerializer)."
            ),
        },
    )

    format: wire.CurrentFormat = wire.FORMAT_VERSION
    id: UUID
    origin: Origin
    created_at: AwareDatetime
    ops: Annotated[list[Operation], Field(min_length=1, max_length=MAX_OPS_PER_BATCH)]

    def session_ids(self) -> list[UUID]:
        """The sessions this batch touches (its routing keys), sorted."""
        # keyed by UUID.int: hashing and ordering a UUID run in Python, an int's in C (same order)
        ids: dict[int, UUID] = {}
        for op in self.ops:
            sid = session_of(op)
            if sid is not None:
                ids[sid.int] = sid
        return [ids[key] for key in sorted(ids)]


class BatchEnvelope(BaseModel):
    """A batch's envelope with its operations unread: what a worker checks of a batch that does not
    validate whole, before it validates the operations one by one (and applies the valid ones)."""

    model_config = ConfigDict(extra="forbid")

    format: int
    id: Any
    origin: Any
    created_at: AwareDatetime | str
    ops: list[Any]


def session_of(op: Any) -> UUID | None:
    """The session an operation belongs to, or ``None`` for templates."""
    if type(op) in _UNDER_A_SESSION:  # the common case first: one dict look-up, no isinstance chain
        sid: UUID = op.session_id
        return sid
    if isinstance(op, SessionUpsert | TabUpsert):
        return op.record.id if isinstance(op, SessionUpsert) else op.record.session_id
    if isinstance(op, SessionDelete | SessionTouch):
        return op.id
    if isinstance(op, TabDelete | PaneUpsert | PaneDelete | HistoryAppend):
        return op.session_id
    return None


_UNDER_A_SESSION = frozenset({PaneUpsert, PaneDelete, TabDelete, HistoryAppend})

BATCH_ADAPTER: TypeAdapter[Batch] = TypeAdapter(Batch)


def upgrade_payload(payload: Any) -> Any:
    """Bring a payload of a previous format to the current one (before validation).

    Format 1 had no compression of scrollback: its ``history.append`` operations
    carry neither ``encoding`` nor ``raw_size``. Anything that is not a format-1
    mapping is returned unchanged for the model to judge.
    """
    if not isinstance(payload, dict) or payload.get("format") != 1:
        return payload
    ops = payload.get("ops")
    if not isinstance(ops, list):
        return payload
    upgraded = []
    for op in ops:
        if isinstance(op, dict) and op.get("op") == wire.HISTORY_APPEND and "encoding" not in op:
            upgraded.append({**op, "encoding": wire.IDENTITY, "raw_size": _b64_len(op.get("content"))})
        else:
            upgraded.append(op)
    return {**payload, "format": FORMAT_VERSION, "ops": upgraded}


def _b64_len(content: Any) -> int:
    if not isinstance(content, str):
        return 0
    stripped = content.rstrip("=")
    return len(stripped) * 3 // 4


def batch_json_schema() -> dict[str, Any]:
    """The published JSON Schema of a batch (kept in the repository as batch.schema.json)."""
    schema = Batch.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["x-previous-formats"] = {
        "1": "as format 2, but history.append has no 'encoding' (always identity) and no 'raw_size'"
    }
    return schema


if __name__ == "__main__":  # python -m perth_pipeline.records > perth_pipeline/batch.schema.json
    print(json.dumps(batch_json_schema(), indent=2, sort_keys=True))
