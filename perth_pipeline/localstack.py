"""The embedded stack as a script sees it: find the one running, or run one for a ``with`` block.

* :func:`stack_urls` and :func:`shell_exports`: what ``perth-pipeline env`` prints, for
  ``eval "$(perth-pipeline env)"``: the environment's ``REDIS_URL`` and ``DATABASE_URL`` when
  set, else those of the embedded servers running in the data directory (``perth-pipeline up``
  runs them). It starts nothing: a server it started would be left running with no owner.
* :func:`embedded_manager`, behind :meth:`PersistenceManager.embedded`: for scripts and
  notebooks, the embedded servers (started, or reused when running in the data directory),
  the schema, a worker in a thread of this process, and a ready manager; on exit what was
  written is committed (bounded), then the worker stops, the manager closes and the servers
  this call started stop (not ones it reused). A quick try, not a deployment: production runs
  workers as processes (``perth-pipeline worker``).

The worker lives in ``workers/inprocess.py`` and is loaded by its name when asked for: the
terminal's side does not import ``workers`` (docs/design.md, "Layering").
"""

from __future__ import annotations

import importlib
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .masking import masked_logger
from .settings import Settings

if TYPE_CHECKING:
    from .producer import PersistenceManager

__all__ = ["embedded_manager", "shell_exports", "stack_urls"]

logger = masked_logger("perth_pipeline.localstack")

#: How long leaving the ``with`` block waits for the worker to commit what was written.
EXIT_FLUSH_TIMEOUT = 30.0


def stack_urls(settings: Settings) -> tuple[str, str] | None:
    """The settings' URLs when both are set, else the running embedded stack's; None if neither."""
    if settings.redis_url and settings.database_url:
        return settings.redis_url, settings.database_url
    from .embedded import running_urls

    return running_urls(settings.data_dir)


def shell_exports(redis_url: str, database_url: str, queue: str) -> str:
    """One ``export`` line for a POSIX shell, each value quoted for it."""
    values = {"REDIS_URL": redis_url, "DATABASE_URL": database_url, "PERTH_QUEUE": queue}
    return "export " + " ".join(f"{name}={shlex.quote(value)}" for name, value in values.items())


@contextmanager
def embedded_manager(data_dir: Path | str | None = None, **overrides: Any) -> Iterator[PersistenceManager]:
    """A :class:`PersistenceManager` on the embedded servers, with a worker in this process.

    ``data_dir``: where the servers keep their data (default ``PERTH_DATA_DIR``, else
    ``~/.local/share/perth-pipeline``); keyword arguments override settings (``queue=...``).
    ``REDIS_URL`` and ``DATABASE_URL`` are not used: for servers of your own, use
    ``PersistenceManager.from_env()`` and run ``perth-pipeline worker``.
    """
    from .embedded import EmbeddedServers
    from .producer import PersistenceManager
    from .store import Store

    settings = Settings.from_env(**overrides)
    if data_dir is not None:
        settings = settings.model_copy(update={"data_dir": Path(data_dir)})
    servers = EmbeddedServers(settings.data_dir)
    try:
        settings = settings.with_urls(*servers.start())
        store = Store(settings.database_url or "")
        try:
            store.init_db()
        finally:
            store.close()
        inprocess: Any = importlib.import_module("workers.inprocess")
        worker = inprocess.ThreadWorker(settings).start()
        try:
            with PersistenceManager(settings=settings) as manager:
                yield manager
                if not manager.flush(timeout=EXIT_FLUSH_TIMEOUT):
                    logger.warning(
                        "writes not committed within %.0f s; they wait on the queue in %s for a worker",
                        EXIT_FLUSH_TIMEOUT,
                        settings.data_dir,
                    )
        finally:
            worker.stop()
    finally:
        servers.stop()
