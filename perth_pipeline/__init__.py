"""perth-pipeline: the persistence layer of the Perth terminal multiplexer.

The terminal records every change through :class:`PersistenceManager`; a
background thread sends batches of changes as RQ jobs on Redis; worker
processes (``workers``) apply them to PostgreSQL; reads restore a session.

The producer (and with it redis-py, RQ and psycopg) is imported on first use of
``PersistenceManager`` or ``install_signal_handlers`` (PEP 562), not with the
package: ``perth-pipeline --help`` and the commands that need neither backend
start without them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import DatabaseUnavailable, InvalidRecord, NotFound, PersistenceError, QueueUnavailable
from .records import PaneHistoryChunk, PaneRecord, SessionRecord, SessionTree, TabRecord, TemplateRecord
from .settings import Settings

if TYPE_CHECKING:
    from .producer import PersistenceManager
    from .signals import install_signal_handlers

__all__ = [
    "DatabaseUnavailable",
    "InvalidRecord",
    "NotFound",
    "PaneHistoryChunk",
    "PaneRecord",
    "PersistenceError",
    "PersistenceManager",
    "QueueUnavailable",
    "SessionRecord",
    "SessionTree",
    "Settings",
    "TabRecord",
    "TemplateRecord",
    "install_signal_handlers",
]

__version__ = "0.1.0"

#: The names imported on first use, and the module of each.
_LAZY = {"PersistenceManager": ".producer", "install_signal_handlers": ".signals"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # once imported, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
