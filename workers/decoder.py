"""The fast path of a batch: an ``apply_batch`` job decoded by msgspec, for the batches producers write.

pydantic validating a whole job from its bytes (``workers.serializer``) was the largest item of a
worker's CPU: about 7 us of its 9 per row, most of it building models and checking each JSON
field by encoding it again in Python. Here msgspec decodes the same job into plain structs in C
(about 1.6 us per row), with the same bounds, and the checks msgspec cannot express run once per
batch over the bytes or once per JSON field on its raw text. The JSON fields are not decoded at
all: the applier copies their text as it came, and PostgreSQL parses it into ``jsonb`` (a
producer's compact JSON is the text the models would have written; a decimal with more digits
than a double holds keeps them in ``jsonb`` and reads back as the same double).

The rule this module keeps: **it accepts a strict subset of what the models accept**, never more,
and gives the applier the same rows. Whatever it does not take (an unknown op, a wrong type, a
lax form pydantic would coerce, anything near a limit, an escaped NUL, a JSON field with a long
digit run or an exponent, a version ahead of the clock) makes
:func:`decode_apply_batch` return None, and the job goes the models' way: validated whole by
pydantic, or operation by operation with reasons that name the field. A differential test
(``tests/unit/test_decoder.py``) holds the two paths to that.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

import msgspec
from msgspec import Meta, Raw, Struct

from perth_pipeline import wire
from perth_pipeline.limits import (
    MAX_CHUNK_BYTES,
    MAX_CLOCK_SKEW_NS,
    MAX_COMMAND_CHARS,
    MAX_INT32,
    MAX_JSON_BYTES,
    MAX_JSON_DEPTH,
    MAX_NAME_CHARS,
    MAX_OPS_PER_BATCH,
    MAX_PANE_ID_CHARS,
    MAX_PATH_CHARS,
    MAX_TITLE_CHARS,
    MAX_VERSION,
    timestamp_problem,
)
from perth_pipeline.operations import inflate_chunk

__all__ = [
    "DecodedBatch",
    "HistoryAppendStruct",
    "PaneDeleteStruct",
    "PaneUpsertStruct",
    "SessionDeleteStruct",
    "SessionTouchStruct",
    "SessionUpsertStruct",
    "TabDeleteStruct",
    "TabUpsertStruct",
    "TemplateDeleteStruct",
    "TemplateUpsertStruct",
    "decode_apply_batch",
]

# Patterns end in \Z: msgspec matches with re.search, where $ also matches before a final newline
# (the models' Rust regex engine does not let "terminal\n" through; neither may this).
_Name = Annotated[str, Meta(min_length=1, max_length=MAX_NAME_CHARS)]
_Position = Annotated[int, Meta(ge=0, le=MAX_INT32)]
_Version = Annotated[int, Meta(ge=1, le=MAX_VERSION)]
#: RFC 3339 as producers write it (``isoformat()``): checked again, as a datetime, after decoding.
_Timestamp = Annotated[str, Meta(pattern=r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?([+-]\d\d:\d\d|Z)\Z")]
_Origin = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.:-]{1,64}\Z")]
_PaneType = Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_.-]{0,63}\Z")]
#: Base64 of a chunk: decoded, at most what the model's bound on the text allows (3 bytes per 4 chars).
_Content = Annotated[bytes, Meta(max_length=(MAX_CHUNK_BYTES + 1024) * 3 // 4)]
_EMPTY = Raw(b"{}")


class _Strict(Struct, forbid_unknown_fields=True):
    pass


class SessionRecordStruct(_Strict):
    id: UUID
    name: _Name
    created_at: _Timestamp  # then its datetime (set by _check_ops)
    last_active: _Timestamp  # then its datetime (set by _check_ops)
    template_name: _Name | None = None


class TabRecordStruct(_Strict):
    id: UUID
    session_id: UUID
    position: _Position
    name: _Name
    layout_blob: Raw = _EMPTY  # then its JSON text (set by _check_ops)


class PaneRecordStruct(_Strict):
    id: UUID
    tab_id: UUID
    pane_id: Annotated[str, Meta(min_length=1, max_length=MAX_PANE_ID_CHARS)]
    pane_type: _PaneType
    component_state: Raw = _EMPTY  # then its JSON text (set by _check_ops)
    title: Annotated[str, Meta(max_length=MAX_TITLE_CHARS)] = ""
    cwd: Annotated[str, Meta(max_length=MAX_PATH_CHARS)] | None = None
    command: Annotated[str, Meta(max_length=MAX_COMMAND_CHARS)] | None = None


class TemplateRecordStruct(_Strict):
    id: UUID
    name: _Name
    definition: Raw = _EMPTY  # then its JSON text (set by _check_ops)


class _Op(_Strict, tag_field="op"):
    version: _Version


class SessionUpsertStruct(_Op, tag=wire.SESSION_UPSERT):
    record: SessionRecordStruct


class SessionDeleteStruct(_Op, tag=wire.SESSION_DELETE):
    id: UUID


class SessionTouchStruct(_Op, tag=wire.SESSION_TOUCH):
    id: UUID
    last_active: _Timestamp  # then its datetime (set by _check_ops)


class TabUpsertStruct(_Op, tag=wire.TAB_UPSERT):
    record: TabRecordStruct


class TabDeleteStruct(_Op, tag=wire.TAB_DELETE):
    id: UUID
    session_id: UUID


class PaneUpsertStruct(_Op, tag=wire.PANE_UPSERT):
    session_id: UUID
    record: PaneRecordStruct


class PaneDeleteStruct(_Op, tag=wire.PANE_DELETE):
    id: UUID
    tab_id: UUID
    session_id: UUID


class HistoryAppendStruct(_Op, tag=wire.HISTORY_APPEND):
    pane_id: UUID
    tab_id: UUID
    session_id: UUID
    chunk_index: _Position
    raw_size: Annotated[int, Meta(ge=0, le=MAX_CHUNK_BYTES)]
    content: _Content
    encoding: Literal["identity", "zstd"] = "identity"


class TemplateUpsertStruct(_Op, tag=wire.TEMPLATE_UPSERT):
    record: TemplateRecordStruct


class TemplateDeleteStruct(_Op, tag=wire.TEMPLATE_DELETE):
    name: _Name


_Operation = (
    SessionUpsertStruct
    | SessionDeleteStruct
    | SessionTouchStruct
    | TabUpsertStruct
    | TabDeleteStruct
    | PaneUpsertStruct
    | PaneDeleteStruct
    | HistoryAppendStruct
    | TemplateUpsertStruct
    | TemplateDeleteStruct
)


class _Envelope(_Strict):
    format: Literal[2]
    id: UUID
    origin: _Origin
    created_at: _Timestamp
    ops: Annotated[list[_Operation], Meta(min_length=1, max_length=MAX_OPS_PER_BATCH)]


class _Job(Struct, array_like=True, forbid_unknown_fields=True):
    function: Literal["workers.jobs.apply_batch"]
    instance: None
    args: tuple[_Envelope]
    kwargs: Annotated[dict[str, Any], Meta(max_length=0)]


_DECODER = msgspec.json.Decoder(_Job)

#: A NUL written as an escape (in a JSON field PostgreSQL refuses it, in a text field the models
#: name it): such a job goes the models' way. (msgspec itself refuses a lone surrogate, in a JSON
#: field too, as the models' parser does; a pair it decodes as the models do.)
_NUL_ESCAPE = b"\\u0000"
#: In a JSON field, a run of 19 digits (an integer perhaps outside the 64-bit range the models
#: allow) or a digit before an ``e`` (an exponent: a float perhaps past the double range, which the
#: models refuse), found with every digit made a 0 first (three C scans; a regex takes 3x as long).
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")
_RISKY_NUMBERS = (b"0" * 19, b"0e", b"0E")
#: A JSON field's raw text at most this long: its compact JSON, as the models measure it, is then
#: within MAX_JSON_BYTES (re-encoding can lengthen a number, "1.0" from "1E0", never threefold).
_MAX_RAW_JSON = MAX_JSON_BYTES // 3


class _Declined(Exception):
    """The fast path does not take this batch: the models decide."""


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    """A batch decoded by msgspec and checked to the models' bounds; what the applier reads of a batch."""

    id: UUID
    origin: str
    ops: list[Any]
    sessions: list[UUID]
    data: bytes  # the job data it came from (to dump it again, which RQ never does)

    def session_ids(self) -> list[UUID]:
        """The sessions this batch touches, sorted (as :meth:`Batch.session_ids`)."""
        return self.sessions


def decode_apply_batch(data: bytes) -> DecodedBatch | None:
    """The batch of an ``apply_batch`` job, or None: not one, or not one this path takes."""
    if _NUL_ESCAPE in data:
        return None
    try:
        job = _DECODER.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return None
    (envelope,) = job.args
    try:
        _timestamp(envelope.created_at)
        sessions = _check_ops(envelope.ops)
    except _Declined:
        return None
    return DecodedBatch(envelope.id, envelope.origin, envelope.ops, sessions, data)


def _check_ops(ops: list[Any]) -> list[UUID]:
    """Finish what msgspec cannot check, in place; the batch's sessions, sorted."""
    sessions: dict[int, UUID] = {}
    newest = 0
    for op in ops:
        kind = type(op)
        newest = max(newest, op.version)
        if kind is PaneUpsertStruct:
            record = op.record
            record.component_state = _json_field(record.component_state)
            sid = op.session_id
        elif kind is HistoryAppendStruct:
            try:
                inflate_chunk(op.content, op.encoding, op.raw_size)
            except ValueError:
                raise _Declined from None
            sid = op.session_id
        elif kind is TabUpsertStruct:
            op.record.layout_blob = _json_field(op.record.layout_blob)
            sid = op.record.session_id
        elif kind is SessionUpsertStruct:
            record = op.record
            record.created_at = _timestamp(record.created_at)
            record.last_active = _timestamp(record.last_active)
            sid = record.id
        elif kind is SessionTouchStruct:
            op.last_active = _timestamp(op.last_active)
            sid = op.id
        elif kind is TemplateUpsertStruct:
            op.record.definition = _json_field(op.record.definition)
            continue
        elif kind is TemplateDeleteStruct:
            continue
        elif kind is SessionDeleteStruct:
            sid = op.id
        else:  # tab and pane deletes
            sid = op.session_id
        sessions[sid.int] = sid
    if newest > time.time_ns() + MAX_CLOCK_SKEW_NS:
        raise _Declined
    return [sessions[key] for key in sorted(sessions)]


def _json_field(value: Any) -> str:
    """The JSON text of a JSON field, if the models would take it as it is; else declined."""
    raw = bytes(value)
    if not raw.startswith(b"{") or len(raw) > _MAX_RAW_JSON:
        raise _Declined
    zeroed = raw.translate(_DIGITS_TO_ZERO)
    if _RISKY_NUMBERS[0] in zeroed or _RISKY_NUMBERS[1] in zeroed or _RISKY_NUMBERS[2] in zeroed:
        raise _Declined
    # deeper than the models allow only if it has that many brackets at all
    if len(raw) > MAX_JSON_DEPTH and raw.count(b"{") + raw.count(b"[") > MAX_JSON_DEPTH:
        raise _Declined
    return raw.decode()


def _timestamp(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise _Declined from None
    if timestamp_problem(value) is not None:
        raise _Declined
    return value
