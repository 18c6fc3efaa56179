"""The records and the operation envelope: the wire contract, as pydantic models.

Records are what the terminal hands to :class:`~perth_pipeline.PersistenceManager`
and what the reads give back. Operations wrap a record with its version; a
:class:`Batch` of operations is the one argument of the one job that crosses
the queue (``workers.jobs.apply_batch``). The same models validate a batch on
both sides, and ``batch.schema.json`` (exported from :class:`Batch`) lets a
producer in another language put the same batches on the queue.

The limits below are the hard limits of the wire format; the settings may
set lower ones for a producer (see :mod:`perth_pipeline.settings`). The names
that are not models (op names, format versions, the job function) live in
:mod:`perth_pipeline.wire`, which both sides import; this module takes them from there.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from json.encoder import encode_basestring
from typing import Annotated, Any
from uuid import UUID

from pydantic import (
    AfterValidator,
    AwareDatetime,
    Base64Bytes,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationInfo,
    field_validator,
    model_validator,
)

from . import wire
from .wire import FORMAT_VERSION, SUPPORTED_FORMATS

__all__ = [
    "FORMAT_VERSION",
    "JSON_TEXTS",
    "SUPPORTED_FORMATS",
    "Batch",
    "BatchEnvelope",
    "HistoryAppend",
    "Operation",
    "PaneDelete",
    "PaneHistoryChunk",
    "PaneRecord",
    "PaneUpsert",
    "SessionDelete",
    "SessionRecord",
    "SessionTouch",
    "SessionTree",
    "SessionUpsert",
    "TabDelete",
    "TabRecord",
    "TabUpsert",
    "TemplateDelete",
    "TemplateRecord",
    "TemplateUpsert",
    "compact_json",
    "json_int_out_of_range",
    "json_size",
    "json_text",
]

MAX_NAME_CHARS = 256
MAX_PANE_ID_CHARS = 128
MAX_TITLE_CHARS = 1024
MAX_PATH_CHARS = 4096
MAX_COMMAND_CHARS = 16384
MAX_JSON_BYTES = 1 << 20
MAX_CHUNK_BYTES = 4 << 20
MAX_OPS_PER_BATCH = 10_000
MAX_INT32 = 2**31 - 1
MAX_VERSION = 2**63 - 1
#: Integers in JSON fields: what every consumer reads back exactly. PostgreSQL's jsonb keeps any
#: number, but the Rust terminal (serde_json: i64 or u64) and a cast to bigint do not; Python takes
#: any size and then fails to encode past 4,300 digits. So: from -2^63 (i64) to 2^64-1 (u64).
MIN_JSON_INT = -(2**63)
MAX_JSON_INT = 2**64 - 1
#: Nesting of JSON fields. The workers parse a whole job with pydantic-core, whose parser stops at
#: about 250 levels counted from the job's root (a record sits 6 below it): 128 leaves room.
MAX_JSON_DEPTH = 128
#: Timestamps, as UTC instants: a day inside Python's datetime range, so that any reader can convert
#: one back to a datetime in its own time zone (an offset is under a day). PostgreSQL would store
#: 9999-12-31T22:00-05:00 (10000-01-01 UTC), and every later read of it fail. Offsets are whole
#: minutes: pydantic-core parses an offset as ``±HH:MM`` only (the workers would refuse
#: ``+01:00:30``, which ``isoformat()`` writes) and writes one truncated to minutes (the instant
#: would move by the seconds).
MIN_TIMESTAMP = datetime(1, 1, 2, tzinfo=UTC)
MAX_TIMESTAMP = datetime(9999, 12, 30, tzinfo=UTC)
#: How far ahead of a worker's clock a version may be: a day. Versions are nanoseconds of a
#: producer's clock (see perth_pipeline.clock). Hosts kept by NTP differ by milliseconds, and a day
#: still accepts the usual misconfigurations (a clock set in local time instead of UTC is at most
#: 14 hours off) whose writes would otherwise be lost; a version further ahead (a clock set years
#: ahead, past 2262, or a row written by hand) would win over every honest write for as long as
#: the gap lasts, and is refused. Versions behind are never refused: they only lose.
MAX_CLOCK_SKEW_NS = 24 * 3600 * 10**9
_MIN_INSTANT, _MAX_INSTANT = MIN_TIMESTAMP.replace(tzinfo=None), MAX_TIMESTAMP.replace(tzinfo=None)
#: Digits in a row: an integer outside the JSON range has at least 19 (-2^63-1 has 19), one inside
#: it with fewer is within range, so the JSON text tells whether the integers need checking.
_LONG_DIGITS = re.compile(r"\d{19}")

_NUL = "\x00"
_PANE_TYPE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_ORIGIN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def _no_nul(value: str | None) -> str | None:
    # PostgreSQL text cannot hold NUL: refuse it here rather than fail a whole batch later.
    if value is not None and _NUL in value:
        raise ValueError("must not contain NUL characters")
    return value


def _not_json(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _compact_encoder() -> Callable[[Any], str]:
    """Compact JSON (``separators=(",", ":")``, ``ensure_ascii=False``, ``allow_nan=False``), made once.

    ``JSONEncoder.encode`` builds a new C encoder (and a circular-reference map) on every call,
    which costs more than encoding a small dict; this runs per JSON field of every record, on
    both sides of the queue. No circular-reference map: a cycle ends in ``RecursionError``,
    which :func:`json_text` reports as not JSON.
    """
    c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
    if c_make_encoder is not None:
        try:
            encoder = c_make_encoder(None, _not_json, encode_basestring, None, ":", ",", False, False, False)
            encoder({}, 0)
        except TypeError:  # another signature than CPython 3.11 to 3.13's
            pass
        else:
            return lambda value: "".join(encoder(value, 0))
    return json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode


_compact_json = _compact_encoder()
#: Compact JSON of a value known to be JSON (checked on acceptance), without :func:`json_text`'s checks.
compact_json = _compact_json


def json_text(value: Any) -> str:
    """``value`` as compact JSON; raises ``ValueError`` if it is not JSON or holds a NUL character."""
    try:
        text = _compact_json(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"is not JSON-serializable ({exc})") from None
    if "\\u0000" in text and _NUL_ESCAPE.search(text) is not None:
        raise ValueError("must not contain NUL characters (PostgreSQL JSONB refuses them)")
    return text


#: A NUL character as the encoder writes it: ``\u0000`` after an even number of backslashes (after
#: an odd number it is text, a backslash followed by "u0000", which PostgreSQL takes).
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def json_size(value: Any) -> int:
    """The size in bytes of ``value`` as compact JSON; raises ``ValueError`` if it is not JSON."""
    return _utf8_size(json_text(value))


#: Validation context key (``validate_*(..., context={JSON_TEXTS: {}})``): a dict that the JSON
#: fields' validators fill with ``id(value) -> (value, its compact JSON)``, so that a consumer that
#: needs the text (the worker, for ``COPY``) does not encode the same value a second time. (The
#: value is held with its text: its id cannot be reused by another object while the dict lives.)
JSON_TEXTS = "json_texts"


def _bounded_json(value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
    try:
        text = json_text(value)
    except ValueError:
        if json_int_out_of_range(value):  # (Python cannot even write an integer of 4,300 digits)
            raise ValueError(_JSON_INT_RANGE) from None
        raise
    size = _utf8_size(text)
    if size > MAX_JSON_BYTES:
        raise ValueError(f"is {size} bytes of JSON, over the limit of {MAX_JSON_BYTES}")
    if _LONG_DIGITS.search(text) is not None and json_int_out_of_range(value):
        raise ValueError(_JSON_INT_RANGE)
    context = info.context
    if context is not None:
        texts = context.get(JSON_TEXTS)
        if texts is not None:
            texts[id(value)] = (value, text)
    return value


_JSON_INT_RANGE = f"integers must lie between {MIN_JSON_INT} and {MAX_JSON_INT}"


def json_int_out_of_range(value: Any) -> bool:
    """Whether a JSON value holds an integer outside ``MIN_JSON_INT`` .. ``MAX_JSON_INT``."""
    stack = [value]
    while stack:
        node = stack.pop()
        kind = type(node)
        if kind is dict:
            stack.extend(node.values())
        elif kind is list or kind is tuple:
            stack.extend(node)
        elif kind is int and not MIN_JSON_INT <= node <= MAX_JSON_INT:
            return True
    return False


def timestamp_problem(value: datetime) -> str | None:
    """Why an aware timestamp cannot be stored and read back, or None. (Shared with the write calls.)"""
    offset = value.utcoffset()
    if offset is None:
        return "must be timezone-aware"
    if offset.seconds % 60 or offset.microseconds:
        return "its UTC offset must be a whole number of minutes"
    try:
        instant = value.replace(tzinfo=None) - offset
    except OverflowError:  # past Python's own range in UTC
        instant = None
    if instant is None or not _MIN_INSTANT <= instant <= _MAX_INSTANT:
        return (
            f"must lie between {MIN_TIMESTAMP.date().isoformat()} and {MAX_TIMESTAMP.date().isoformat()} UTC"
        )
    return None


def _storable_timestamp(value: datetime) -> datetime:
    problem = timestamp_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _not_ahead(version: int) -> int:
    if version > time.time_ns() + MAX_CLOCK_SKEW_NS:
        raise ValueError(
            f"is more than {MAX_CLOCK_SKEW_NS // 3_600_000_000_000} hours ahead of this worker's clock "
            "(the clock of the host that wrote it is wrong)"
        )
    return version


Name = Annotated[str, StringConstraints(min_length=1, max_length=MAX_NAME_CHARS)]
Position = Annotated[int, Field(ge=0, le=MAX_INT32)]
Version = Annotated[
    int,
    Field(
        ge=1,
        le=MAX_VERSION,
        description=(
            "Hybrid logical clock: nanoseconds since the Unix epoch of the producer's clock, strictly "
            f"increasing per producer. Workers refuse a version more than {MAX_CLOCK_SKEW_NS} ns "
            "ahead of their own clock."
        ),
    ),
    AfterValidator(_not_ahead),
]
Timestamp = Annotated[
    AwareDatetime,
    Field(
        description=(
            "RFC 3339 with a UTC offset of whole minutes (+HH:MM or Z); the UTC instant lies between "
            f"{MIN_TIMESTAMP.isoformat()} and {MAX_TIMESTAMP.isoformat()}."
        )
    ),
    AfterValidator(_storable_timestamp),
]
JsonObject = Annotated[
    dict[str, Any],
    Field(
        description=(
            f"A JSON object of at most {MAX_JSON_BYTES} bytes as compact JSON in UTF-8 (escapes "
            f"counted as written, no NUL character), integers from {MIN_JSON_INT} to {MAX_JSON_INT}."
        )
    ),
]
Origin = Annotated[str, StringConstraints(pattern=_ORIGIN.pattern)]


class _Record(BaseModel):
    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        strict=False,
        ser_json_bytes="base64",
        val_json_bytes="base64",
    )


class SessionRecord(_Record):
    """A terminal session: the root of tabs, panes and scrollback."""

    id: UUID
    name: Name
    template_name: Name | None = None
    created_at: Timestamp
    last_active: Timestamp

    _check_text = field_validator("name", "template_name")(_no_nul)


class TabRecord(_Record):
    """A tab of a session. ``layout_blob`` is the tab's layout (JSONB)."""

    id: UUID
    session_id: UUID
    position: Position
    name: Name
    layout_blob: JsonObject = Field(default_factory=dict)

    _check_text = field_validator("name")(_no_nul)
    _check_json = field_validator("layout_blob")(_bounded_json)


class PaneRecord(_Record):
    """A pane of a tab. ``pane_id`` is the terminal's own id (``"terminal_3"``)."""

    id: UUID
    tab_id: UUID
    pane_id: Annotated[str, StringConstraints(min_length=1, max_length=MAX_PANE_ID_CHARS)]
    pane_type: Annotated[str, StringConstraints(pattern=_PANE_TYPE.pattern)]
    component_state: JsonObject = Field(default_factory=dict)
    title: Annotated[str, StringConstraints(max_length=MAX_TITLE_CHARS)] = ""
    cwd: Annotated[str, StringConstraints(max_length=MAX_PATH_CHARS)] | None = None
    command: Annotated[str, StringConstraints(max_length=MAX_COMMAND_CHARS)] | None = None

    _check_text = field_validator("pane_id", "title", "cwd", "command")(_no_nul)
    _check_json = field_validator("component_state")(_bounded_json)


class PaneHistoryChunk(_Record):
    """One chunk of a pane's scrollback. ``pane_id`` is the pane row's id."""

    pane_id: UUID
    chunk_index: Position
    content: Annotated[bytes, Field(max_length=MAX_CHUNK_BYTES)]


class TemplateRecord(_Record):
    """A layout template, keyed by ``name``. ``definition`` is a JSON layout description."""

    id: UUID
    name: Name
    definition: JsonObject = Field(default_factory=dict)

    _check_text = field_validator("name")(_no_nul)
    _check_json = field_validator("definition")(_bounded_json)


@dataclass(frozen=True, slots=True)
class SessionTree:
    """A stored session read whole, in one snapshot (:meth:`PersistenceManager.restore_session_tree`).

    ``tabs`` in position order; ``panes`` maps each tab's id to its panes in ``pane_id`` order
    (every tab has an entry); ``history`` maps a pane's id to its scrollback, for the panes
    that have any, and is empty unless the history was asked for.
    """

    session: SessionRecord
    tabs: list[TabRecord]
    panes: dict[UUID, list[PaneRecord]]
    history: dict[UUID, bytes] = field(default_factory=dict)


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
