"""The embedded stack as a script sees it: find the one running.

* :func:`stack_urls` and :func:`shell_exports`: what ``perth-pipeline env`` prints, for
  ``eval "$(perth-pipeline env)"``: the environment's ``REDIS_URL`` and ``DATABASE_URL`` when
  set, else those of the embedded servers running in the data directory (``perth-pipeline up``
  runs them). It starts nothing: a server it started would be left running with no owner.
"""

from __future__ import annotations

import shlex

from .settings import Settings

__all__ = ["shell_exports", "stack_urls"]


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
