"""The error hierarchy of perth-pipeline.

Every error the library raises on purpose is a :class:`PersistenceError`.
:class:`InvalidRecord` is also a :class:`ValueError`, so that callers who already
catch ``ValueError`` for bad input (as pydantic's ``ValidationError`` is one) keep
working.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "Ambiguous",
    "DatabaseError",
    "DatabaseUnavailable",
    "InvalidRecord",
    "InvalidSetting",
    "NotFound",
    "PersistenceError",
    "QueueUnavailable",
]


class PersistenceError(Exception):
    """Base class of every error raised by perth-pipeline."""


class InvalidRecord(PersistenceError, ValueError):
    """A write call refused what it was given. ``field`` names what was wrong."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class InvalidSetting(PersistenceError, ValueError):
    """A setting cannot be used as given (a URL its driver cannot parse). The message is masked."""


class NotFound(PersistenceError, LookupError):
    """A read asked for something that is not stored (or was deleted)."""


class Ambiguous(PersistenceError, LookupError):
    """A name or id prefix matches more than one stored thing; ``candidates`` are the matches."""

    def __init__(self, message: str, candidates: list[Any]) -> None:
        self.candidates = candidates
        super().__init__(message)


class QueueUnavailable(PersistenceError, ConnectionError):
    """Redis did not answer. Raised by reads and commands, never by write calls."""


class DatabaseUnavailable(PersistenceError, ConnectionError):
    """PostgreSQL did not answer. Raised by reads and commands, never by write calls."""


class DatabaseError(PersistenceError):
    """PostgreSQL refused a statement (a timeout, a read-only standby, a constraint).

    The driver's error is the ``__cause__`` when its text carries no secret; the message is masked.
    """
