"""The JSON text of one operation of a batch, as :mod:`perth_pipeline.batch` sends it.

The text is the wire format of :mod:`perth_pipeline.records` (the workers validate it with those
models); the op names are :mod:`perth_pipeline.wire`'s. It runs in the flusher thread, for every
operation of every batch, so it is written for speed: fixed keys in an f-string, strings through
:mod:`json`'s C string encoder, JSON fields through :func:`~perth_pipeline.limits.compact_json`,
parent UUIDs formatted once per batch (:class:`Ids`). No intermediate dict, no
:class:`json.JSONEncoder` set up per call.
"""

from __future__ import annotations

import base64
from json.encoder import encode_basestring
from uuid import UUID

import zstandard

from . import wire
from .entries import PANE, SESSION, TAB, Item, Touch
from .limits import compact_json
from .records import PaneRecord, SessionRecord, TabRecord, TemplateRecord
from .scrollback import Chunk

__all__ = ["MIN_COMPRESS", "Ids", "chunk_json", "item_json", "touch_json"]

#: Chunks smaller than this are sent as they are: compressing them saves nothing.
MIN_COMPRESS = 128

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


def _delete_json(item: Item, ids: Ids) -> str:
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


def item_json(item: Item, ids: Ids) -> str:
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


def chunk_json(chunk: Chunk, compressor: zstandard.ZstdCompressor | None, ids: Ids) -> str:
    raw = chunk.chunk.content
    encoding, payload = wire.IDENTITY, raw
    if compressor is not None and len(raw) >= MIN_COMPRESS:
        packed = compressor.compress(raw)  # releases the interpreter lock while it works
        if len(packed) < len(raw):
            encoding, payload = wire.ZSTD, packed
    return (
        f'{_HISTORY_APPEND}{chunk.version},"pane_id":"{chunk.chunk.pane_id}",'
        f'"tab_id":"{ids(chunk.tab_id)}","session_id":"{ids(chunk.session_id)}",'
        f'"chunk_index":{chunk.chunk.chunk_index},"encoding":"{encoding}","raw_size":{len(raw)},'
        f'"content":"{base64.b64encode(payload).decode("ascii")}"}}'
    )
