"""What a write call accepts: every field of a record checked again, cheaply, in the caller's thread.

Records are validated by pydantic when they are built, but ``model_copy(update=...)`` and
``model_construct`` skip that, and the JSON fields stay mutable dicts in the caller's hands.
A write call checks each field again (well under a microsecond for the common case), so that
nothing invalid reaches the queue, where the workers would refuse it and the write would be
lost. No I/O, no lock: the buffer calls these before it takes its own.

:class:`Intake` is the buffer's side of it: a refused record is counted as invalid, then raised
to the caller (nothing invalid is buffered, and the terminal learns why), and a JSON field is
deep-copied on acceptance, so that what a write call accepted is what gets stored, whatever the
caller does with its dict afterwards.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any, NoReturn
from uuid import UUID

from .errors import InvalidRecord
from .limits import (
    MAX_COMMAND_CHARS,
    MAX_INT32,
    MAX_JSON_DEPTH,
    MAX_JSON_INT,
    MAX_NAME_CHARS,
    MAX_PANE_ID_CHARS,
    MAX_PATH_CHARS,
    MAX_TITLE_CHARS,
    MIN_JSON_INT,
    json_size,
    timestamp_problem,
)
from .records import PaneHistoryChunk, PaneRecord, SessionRecord, TabRecord, TemplateRecord

__all__ = [
    "Intake",
    "copy_json",
    "verify_chunk",
    "verify_pane",
    "verify_session",
    "verify_tab",
    "verify_template",
    "verify_template_name",
]

_FLAT_MAX = 16
_PANE_TYPE = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_known_pane_types: set[str] = set()


def _text(value: Any, name: str, max_chars: int, *, min_chars: int = 0, optional: bool = False) -> None:
    if value is None and optional:
        return
    if type(value) is not str:
        raise InvalidRecord(name, f"expected a string, got {type(value).__name__}")
    if not min_chars <= len(value) <= max_chars:
        raise InvalidRecord(name, f"must be {min_chars} to {max_chars} characters, not {len(value)}")
    if "\x00" in value:
        raise InvalidRecord(name, "must not contain NUL characters")
    if not value.isascii():
        _utf8(value, name)


def _utf8(value: str, name: str) -> None:
    # a lone surrogate (text decoded with errors="surrogateescape") cannot be encoded at all
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRecord(name, "is not valid Unicode (it holds a lone surrogate)") from None


def _id(value: Any, name: str) -> None:
    if type(value) is not UUID:
        raise InvalidRecord(name, f"expected a UUID, got {type(value).__name__}")


def _index(value: Any, name: str) -> None:
    if type(value) is not int or not 0 <= value <= MAX_INT32:
        raise InvalidRecord(name, f"must be an integer from 0 to {MAX_INT32}, not {value!r}")


def _aware(value: Any, name: str) -> None:
    if not isinstance(value, datetime):
        raise InvalidRecord(name, f"expected a datetime, got {type(value).__name__}")
    problem = timestamp_problem(value)
    if problem is not None:
        raise InvalidRecord(name, problem)


def verify_session(r: SessionRecord) -> None:
    _id(r.id, "id")
    _text(r.name, "name", MAX_NAME_CHARS, min_chars=1)
    _text(r.template_name, "template_name", MAX_NAME_CHARS, min_chars=1, optional=True)
    _aware(r.created_at, "created_at")
    _aware(r.last_active, "last_active")


def verify_tab(r: TabRecord) -> None:
    _id(r.id, "id")
    _id(r.session_id, "session_id")
    _index(r.position, "position")
    _text(r.name, "name", MAX_NAME_CHARS, min_chars=1)


def verify_pane(r: PaneRecord, fields: dict[str, Any]) -> None:
    """``fields`` is ``r.__dict__``: read once, a dict look-up per field instead of an attribute."""
    try:
        pane_id, title, cwd, command = fields["pane_id"], fields["title"], fields["cwd"], fields["command"]
        if (  # one expression for the common case; the checks below name the field otherwise
            type(fields["id"]) is UUID
            and type(fields["tab_id"]) is UUID
            and fields["pane_type"] in _known_pane_types
            and type(pane_id) is str
            and 0 < len(pane_id) <= MAX_PANE_ID_CHARS
            and type(title) is str
            and len(title) <= MAX_TITLE_CHARS
            and (cwd is None or (type(cwd) is str and len(cwd) <= MAX_PATH_CHARS))
            and (command is None or (type(command) is str and len(command) <= MAX_COMMAND_CHARS))
        ):
            text = f"{pane_id}{title}{cwd or ''}{command or ''}"
            if text.isascii() and "\x00" not in text:
                return
    except (KeyError, TypeError):
        pass  # a record built without its fields (model_construct): the checks below say which
    _id(r.id, "id")
    _id(r.tab_id, "tab_id")
    _text(r.pane_id, "pane_id", MAX_PANE_ID_CHARS, min_chars=1)
    kind = r.pane_type
    if kind not in _known_pane_types:
        if type(kind) is not str or not _PANE_TYPE.fullmatch(kind):
            raise InvalidRecord("pane_type", "must be a short lowercase identifier such as 'terminal'")
        if len(_known_pane_types) < 1024:
            _known_pane_types.add(kind)
    _text(r.title, "title", MAX_TITLE_CHARS)
    _text(r.cwd, "cwd", MAX_PATH_CHARS, optional=True)
    _text(r.command, "command", MAX_COMMAND_CHARS, optional=True)


def verify_template(r: TemplateRecord) -> None:
    _id(r.id, "id")
    _text(r.name, "name", MAX_NAME_CHARS, min_chars=1)


def verify_chunk(c: PaneHistoryChunk) -> None:
    _id(c.pane_id, "pane_id")
    _index(c.chunk_index, "chunk_index")
    if type(c.content) is not bytes:
        raise InvalidRecord("content", f"expected bytes, got {type(c.content).__name__}")


def verify_template_name(name: Any) -> None:
    """A template name as ``delete_template`` takes it."""
    _text(name, "name", MAX_NAME_CHARS, min_chars=1)


def copy_json(value: Any, field_name: str, budget: int) -> Any:
    """A deep copy of a JSON value, refusing one whose compact JSON is over ``budget`` bytes.

    The size is the worker's (``limits.json_size``: compact, UTF-8, escapes included), so
    what is accepted here is never refused there. Cheaper than serializing: while walking, a
    lower and an upper bound of the size are counted (a character is 1 to 6 bytes of JSON); a
    value is refused when the lower bound is over, accepted when the upper one fits, and
    encoded only in between. The common case (a small dict) is one pass, no recursion.
    """
    if type(value) is not dict:
        raise InvalidRecord(field_name, f"expected a JSON object (a dict), got {type(value).__name__}")
    if len(value) <= _FLAT_MAX:
        # the common case, a small object of short strings and numbers: one pass, no recursion
        upper = 2  # an upper bound of the JSON's size: 6 bytes a character at most ("\u001b")
        for k, v in value.items():
            kind = type(v)
            if type(k) is not str or "\x00" in k or not k.isascii():
                break
            if kind is str:
                if "\x00" in v or not v.isascii():
                    break
                upper += 6 * (len(k) + len(v)) + 6
            elif v is None or kind is bool or (kind is int and MIN_JSON_INT <= v <= MAX_JSON_INT):
                upper += 6 * len(k) + 24
            else:
                break  # floats (NaN?), big integers, containers: the full walk
        else:
            if upper <= budget:
                return dict(value)
    copier = _JsonCopier(field_name, budget)
    copied = copier.walk(value)
    if copier.remaining < 0:
        raise InvalidRecord(field_name, f"is over the limit of {budget} bytes of JSON")
    if copier.upper > budget:
        size = json_size(copied)  # between the bounds: the exact size, as the worker measures it
        if size > budget:
            raise InvalidRecord(field_name, f"is {size} bytes of JSON, over the limit of {budget}")
    return copied


class Intake:
    """A write call's checks and copies, in the caller's thread, before the buffer takes its lock.

    ``count_invalid`` is the buffer's (it takes the buffer's lock for the count); the bounds are
    the buffer's, fixed when it is made.
    """

    def __init__(
        self, *, max_json_bytes: int, max_chunk_bytes: int, count_invalid: Callable[[], None]
    ) -> None:
        self._max_json_bytes = max_json_bytes
        self._max_chunk_bytes = max_chunk_bytes
        self._count_invalid = count_invalid

    def refuse_type(self, record: Any, expected: type, what: str) -> NoReturn:
        self._count_invalid()
        raise InvalidRecord(what, f"expected a {expected.__name__}, got {type(record).__name__}")

    def accept(self, record: Any, expected: type, what: str, verify: Callable[[Any], None]) -> None:
        """Refuse (counted, raised) a record of another type than ``expected``, or failing ``verify``."""
        if type(record) is not expected:
            self.refuse_type(record, expected, what)
        try:
            verify(record)
        except InvalidRecord:
            self._count_invalid()
            raise

    def accept_chunk(self, chunk: Any) -> int:
        """:meth:`accept` of a scrollback chunk (inlined: a hot path), bounded in bytes: its size."""
        if type(chunk) is not PaneHistoryChunk:
            self.refuse_type(chunk, PaneHistoryChunk, "chunk")
        try:
            verify_chunk(chunk)
        except InvalidRecord:
            self._count_invalid()
            raise
        size = len(chunk.content)
        if size > self._max_chunk_bytes:
            self._count_invalid()
            raise InvalidRecord(
                "content", f"chunk of {size} bytes is over the limit of {self._max_chunk_bytes}"
            )
        return size

    def copy(self, value: Any, field_name: str) -> Any:
        """The deep copy of a record's JSON field that the buffer stores (refused: counted, raised)."""
        try:
            return copy_json(value, field_name, self._max_json_bytes)
        except InvalidRecord:
            self._count_invalid()
            raise


class _JsonCopier:
    __slots__ = ("budget", "depth", "field", "remaining", "upper")

    def __init__(self, field_name: str, budget: int) -> None:
        self.field = field_name
        self.budget = budget
        self.remaining = budget  # the budget less a lower bound of the size so far
        self.upper = 0  # an upper bound of the size so far
        self.depth = 0

    def walk(self, node: Any) -> Any:
        kind = type(node)
        if kind is dict or kind is list or kind is tuple:
            self.depth += 1
            if self.depth > MAX_JSON_DEPTH:
                # also what stops a dict that contains itself
                raise InvalidRecord(self.field, f"is nested deeper than {MAX_JSON_DEPTH} levels")
            try:
                if kind is dict:
                    return self._dict(node)
                self.remaining -= 1 + len(node) if node else 2  # brackets and the commas between
                self.upper += 2 + len(node)
                return [self.walk(v) for v in node]
            finally:
                self.depth -= 1
        if kind is str:
            self.remaining -= len(node) + 2
            self.upper += 6 * len(node) + 2
            if "\x00" in node:
                raise InvalidRecord(self.field, "must not contain NUL characters")
            if not node.isascii():
                _utf8(node, self.field)
            return node
        if kind is int and not MIN_JSON_INT <= node <= MAX_JSON_INT:
            raise InvalidRecord(self.field, f"integers must lie between {MIN_JSON_INT} and {MAX_JSON_INT}")
        if node is None or kind is bool or kind is int:
            self.remaining -= 4 if kind is not int else 1
            self.upper += 21
            return node
        if kind is float:
            if not math.isfinite(node):
                raise InvalidRecord(self.field, "NaN and infinity are not JSON")
            self.remaining -= 3
            self.upper += 25
            return node
        raise InvalidRecord(self.field, f"{kind.__name__} is not a JSON value")

    def _dict(self, node: dict[Any, Any]) -> dict[str, Any]:
        # braces and the commas between members; each key adds its quotes and colon below
        self.remaining -= 1 + len(node) if node else 2
        self.upper += 2 + len(node)
        out = {}
        for k, v in node.items():
            if type(k) is not str:
                raise InvalidRecord(self.field, f"JSON object keys must be strings, not {type(k).__name__}")
            if "\x00" in k:
                raise InvalidRecord(self.field, "must not contain NUL characters")
            if not k.isascii():
                _utf8(k, self.field)
            self.remaining -= len(k) + 3
            self.upper += 6 * len(k) + 3
            out[k] = self.walk(v)
        if self.remaining < 0:
            raise InvalidRecord(self.field, f"is over the limit of {self.budget} bytes of JSON")
        return out
