"""The JSON text of one operation of a batch, as :mod:`perth_pipeline.batch` sends it.

The text is the wire format of :mod:`perth_pipeline.records` (the workers validate it with those
models); the op names are :mod:`perth_pipeline.wire`'s. It runs in the flusher thread, for every
operation of every batch, so it is written for speed, in two ways that write the same bytes:

* msgspec (the usual way): each operation is one :class:`msgspec.Struct`, its fields in the
  wire format's order (the op name is the struct's tag, which msgspec writes first), written by
  one encoder in C: UUIDs (lowercase, hyphenated), strings (escaped exactly as
  :func:`json.encoder.encode_basestring` does: non-ASCII as it is), integers, scrollback bytes
  (base64, padded). Timestamps are written by ``isoformat()`` (msgspec would write UTC as ``Z``).
  Faster than the f-strings below (issue 15, ``tests/bench_op_json.py``: a pane upsert 1.3 µs
  of CPU against 3.4, a pane delete 0.6 against 1.9).
* f-strings (the fallback): fixed keys in an f-string, strings through :mod:`json`'s C string
  encoder, JSON fields through :func:`~perth_pipeline.limits.compact_json`, parent UUIDs
  formatted once per batch (:class:`Ids`): how every operation was written before msgspec. An
  operation is written this way where msgspec fails on it (:data:`UNENCODABLE`: a lone
  surrogate; an integer past 64 bits, with msgspec before 0.19) or would write other bytes (a
  parent's id unknown, None, which the f-strings write as the text ``None``), so that what goes
  out is always what this way writes.

JSON fields (a pane's ``component_state``, a tab's ``layout_blob``, a template's ``definition``)
are what the workers measure as compact JSON (``limits.bounded_json``): their text must be
``compact_json``'s to the byte. msgspec writes floats otherwise (``1e16`` for ``1e+16``,
``0.00001`` for ``1e-05``), so a JSON field is handed to msgspec as it is only when it is one
flat object of strings, integers, booleans and nulls (what msgspec and ``json`` write alike);
any other is written by msgspec on its own first, and where that text holds a digit followed by
``.``, ``e`` or ``E`` (every float that msgspec writes, and a few strings) it is written by
``compact_json`` instead. Either text goes into the operation as :class:`msgspec.Raw`.

Both ways take what the write calls accepted (:mod:`perth_pipeline.validation`): exact ``str``
texts without lone surrogates, JSON fields of dicts, lists, strings, integers within 64 bits,
finite floats, booleans and nulls. (Given what they refuse, msgspec could write other bytes
than ``json``, or none: NaN as ``null``, a set as a list, a lone surrogate not at all.)
"""

from __future__ import annotations

import base64
from json.encoder import encode_basestring
from typing import Any
from uuid import UUID

import msgspec
import zstandard

from . import wire
from .entries import PANE, SESSION, TAB, Item, Touch
from .limits import compact_json
from .records import PaneRecord, SessionRecord, TabRecord, TemplateRecord
from .scrollback import Chunk

__all__ = ["MIN_COMPRESS", "UNENCODABLE", "Ids", "chunk_json", "item_json", "touch_json"]

#: Chunks smaller than this are sent as they are: compressing them saves nothing.
MIN_COMPRESS = 128
#: What msgspec raises on a value it cannot write (the f-strings then write it, or raise).
UNENCODABLE = (msgspec.MsgspecError, TypeError, ValueError, OverflowError, RecursionError)

_json = compact_json
_str = encode_basestring  # a quoted, escaped JSON string (as json.dumps(ensure_ascii=False))


class Ids:
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


# --- msgspec: one struct per operation, fields in the wire format's order -----------------------


class _Op(msgspec.Struct, gc=False, tag_field="op"):
    version: int


class _SessionDelete(_Op, tag=wire.SESSION_DELETE):
    id: UUID


class _TabDelete(_Op, tag=wire.TAB_DELETE):
    id: UUID
    session_id: UUID


class _PaneDelete(_Op, tag=wire.PANE_DELETE):
    id: UUID
    tab_id: UUID
    session_id: UUID


class _TemplateDelete(_Op, tag=wire.TEMPLATE_DELETE):
    name: str


class _Session(msgspec.Struct, gc=False):
    id: UUID
    name: str
    template_name: str | None
    created_at: str
    last_active: str


class _SessionUpsert(_Op, tag=wire.SESSION_UPSERT):
    record: _Session


class _Tab(msgspec.Struct, gc=False):
    id: UUID
    session_id: UUID
    position: int
    name: str
    layout_blob: Any


class _TabUpsert(_Op, tag=wire.TAB_UPSERT):
    record: _Tab


class _Pane(msgspec.Struct, gc=False):
    id: UUID
    tab_id: UUID
    pane_id: str
    pane_type: str
    component_state: Any
    title: str
    cwd: str | None
    command: str | None


class _PaneUpsert(_Op, tag=wire.PANE_UPSERT):
    session_id: UUID
    record: _Pane


class _Template(msgspec.Struct, gc=False):
    id: UUID
    name: str
    definition: Any


class _TemplateUpsert(_Op, tag=wire.TEMPLATE_UPSERT):
    record: _Template


class _SessionTouch(_Op, tag=wire.SESSION_TOUCH):
    id: UUID
    last_active: str


class _HistoryAppend(_Op, tag=wire.HISTORY_APPEND):
    pane_id: UUID
    tab_id: UUID
    session_id: UUID
    chunk_index: int
    encoding: str
    raw_size: int
    content: bytes  # msgspec writes bytes as base64, padded, as base64.b64encode


_encode = msgspec.json.Encoder().encode
_Raw = msgspec.Raw
#: Types of the values of a flat JSON object that msgspec writes as ``json`` does (no float).
_plain = frozenset((str, int, bool, type(None))).issuperset
#: Every digit to "0": a digit followed by "." or "e" becomes "0." or "0e", found by one search.
_DIGITS = bytes.maketrans(b"123456789", b"000000000")


def _field(value: Any) -> Any:
    """A JSON field as msgspec takes it to write ``compact_json``'s bytes (see the module's docstring)."""
    if type(value) is dict and _plain(map(type, value.values())):
        return value
    if type(value) is dict:
        text = _encode(value)
        marks = text.translate(_DIGITS)
        if b"0." not in marks and b"0e" not in marks and b"0E" not in marks:
            return _Raw(text)
    return _Raw(_json(value).encode())


def _fast_delete(item: Item) -> bytes | None:
    kind, key, version = item.kind, item.key, item.version
    if kind == SESSION:
        return _encode(_SessionDelete(version, key[1]))
    if kind == TAB:
        if item.session_id is None:
            return None
        return _encode(_TabDelete(version, key[1], item.session_id))
    if kind == PANE:
        if item.tab_id is None or item.session_id is None:
            return None
        return _encode(_PaneDelete(version, key[1], item.tab_id, item.session_id))
    return _encode(_TemplateDelete(version, key[1]))


def _fast_item(item: Item) -> bytes | None:
    """An operation's JSON through msgspec, or None where only the f-strings write it as they do."""
    if item.deleted:
        return _fast_delete(item)
    kind, r = item.kind, item.record
    if kind == PANE:
        assert isinstance(r, PaneRecord)
        if item.session_id is None:  # (the f-strings write "None")
            return None
        pane = _Pane(r.id, r.tab_id, r.pane_id, r.pane_type, _field(item.snapshot), r.title, r.cwd, r.command)
        return _encode(_PaneUpsert(item.version, item.session_id, pane))
    if kind == TAB:
        assert isinstance(r, TabRecord)
        tab = _Tab(r.id, r.session_id, r.position, r.name, _field(item.snapshot))
        return _encode(_TabUpsert(item.version, tab))
    if kind == SESSION:
        assert isinstance(r, SessionRecord)
        created, active = r.created_at.isoformat(), r.last_active.isoformat()
        return _encode(_SessionUpsert(item.version, _Session(r.id, r.name, r.template_name, created, active)))
    assert isinstance(r, TemplateRecord)
    return _encode(_TemplateUpsert(item.version, _Template(r.id, r.name, _field(item.snapshot))))


def item_json(item: Item, ids: Ids) -> str:
    """The wire form of one entity operation (an upsert carries the whole record)."""
    try:
        data = _fast_item(item)
    except UNENCODABLE:
        data = None
    return item_text(item, ids) if data is None else data.decode()


def touch_json(touch: Touch) -> str:
    """The wire form of a touch of a session (``session.touch``)."""
    try:
        return _encode(_SessionTouch(touch.version, touch.session_id, touch.last_active.isoformat())).decode()
    except UNENCODABLE:
        return touch_text(touch)


def chunk_json(chunk: Chunk, compressor: zstandard.ZstdCompressor | None, ids: Ids) -> str:
    """The wire form of a scrollback chunk (``history.append``), compressed when that makes it smaller."""
    raw = chunk.chunk.content
    encoding, payload = wire.IDENTITY, raw
    if compressor is not None and len(raw) >= MIN_COMPRESS:
        packed = compressor.compress(raw)  # releases the interpreter lock while it works
        if len(packed) < len(raw):
            encoding, payload = wire.ZSTD, packed
    tab_id, session_id = chunk.tab_id, chunk.session_id
    if tab_id is not None and session_id is not None:
        c = chunk.chunk
        op = _HistoryAppend(
            chunk.version, c.pane_id, tab_id, session_id, c.chunk_index, encoding, len(raw), payload
        )
        try:
            return _encode(op).decode()
        except UNENCODABLE:
            pass
    return chunk_text(chunk, encoding, len(raw), payload, ids)


# --- f-strings: the fallback ---------------------------------------------------------------------


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


def _delete_text(item: Item, ids: Ids) -> str:
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


def item_text(item: Item, ids: Ids) -> str:
    """:func:`item_json` written by f-strings."""
    if item.deleted:
        return _delete_text(item, ids)
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


def touch_text(touch: Touch) -> str:
    """:func:`touch_json` written by an f-string."""
    return (
        f'{_SESSION_TOUCH}{touch.version},"id":"{touch.session_id}",'
        f'"last_active":"{touch.last_active.isoformat()}"}}'
    )


def chunk_text(chunk: Chunk, encoding: str, raw_size: int, payload: bytes, ids: Ids) -> str:
    """:func:`chunk_json` written by an f-string, from the chunk's content as it is sent."""
    return (
        f'{_HISTORY_APPEND}{chunk.version},"pane_id":"{chunk.chunk.pane_id}",'
        f'"tab_id":"{ids(chunk.tab_id)}","session_id":"{ids(chunk.session_id)}",'
        f'"chunk_index":{chunk.chunk.chunk_index},"encoding":"{encoding}","raw_size":{raw_size},'
        f'"content":"{base64.b64encode(payload).decode("ascii")}"}}'
    )
