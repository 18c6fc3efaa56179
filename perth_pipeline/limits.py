"""The hard limits of the wire format, and the checks that hold values to them.

One source for every bound: the records, the operations, the producer's write calls and the
workers all measure with these (JSON sizes exactly as the workers measure them, integers within
64 bits, timestamps a PostgreSQL ``timestamptz`` stores, versions within the clock-skew bound).
The settings may set lower limits for a producer (see :mod:`perth_pipeline.settings`).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from json.encoder import encode_basestring
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    AwareDatetime,
    Field,
    StringConstraints,
    ValidationInfo,
)

__all__ = [
    "JSON_TEXTS",
    "MAX_CHUNK_BYTES",
    "MAX_CLOCK_SKEW_NS",
    "MAX_COMMAND_CHARS",
    "MAX_INT32",
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_JSON_INT",
    "MAX_NAME_CHARS",
    "MAX_OPS_PER_BATCH",
    "MAX_PANE_ID_CHARS",
    "MAX_PATH_CHARS",
    "MAX_TIMESTAMP",
    "MAX_TITLE_CHARS",
    "MAX_VERSION",
    "MIN_JSON_INT",
    "MIN_TIMESTAMP",
    "PANE_TYPE",
    "JsonObject",
    "Name",
    "Origin",
    "Position",
    "Timestamp",
    "Version",
    "bounded_json",
    "compact_json",
    "json_int_out_of_range",
    "json_size",
    "json_text",
    "no_nul",
    "timestamp_problem",
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
PANE_TYPE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_ORIGIN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def no_nul(value: str | None) -> str | None:
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


def bounded_json(value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
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
