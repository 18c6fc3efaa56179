"""perth-pipeline: the persistence layer of the Perth terminal multiplexer.

The terminal records every change through :class:`PersistenceManager`; a
background thread sends batches of changes as RQ jobs on Redis; worker
processes (``workers``) apply them to PostgreSQL; reads restore a session.
"""

from .errors import DatabaseUnavailable, InvalidRecord, NotFound, PersistenceError, QueueUnavailable
from .producer import PersistenceManager
from .records import PaneHistoryChunk, PaneRecord, SessionRecord, SessionTree, TabRecord, TemplateRecord
from .settings import Settings
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
