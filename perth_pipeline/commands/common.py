"""What every command shares: the command line's state, one-line failures, durations.

Only this package and ``perth_pipeline/cli.py`` import click: the library raises the
project's errors (:mod:`perth_pipeline.errors`) and the commands turn them into one line
and an exit code.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import click

from ..errors import PersistenceError
from ..settings import Settings, parse_duration

__all__ = ["CliState", "fail", "init_schema", "positive_duration"]


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class CliState:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.servers: Any = None

    def backends(self, ctx: click.Context, *, init: str = "never") -> Settings:
        """The settings with both URLs: from the environment, or embedded servers started here.

        ``init``: apply the schema "always", only for "embedded" servers, or "never".
        """
        s = self.settings
        if s.redis_url and s.database_url:
            if init == "always":
                init_schema(s.database_url)
            return s
        if s.redis_url or s.database_url:
            fail("set both REDIS_URL and DATABASE_URL, or neither to use the embedded servers")
        from ..embedded import EmbeddedServers

        click.echo(f"no REDIS_URL/DATABASE_URL: using embedded servers in {s.data_dir}", err=True)
        self.servers = EmbeddedServers(s.data_dir)
        try:
            redis_url, database_url = self.servers.start()
        except PersistenceError as exc:
            fail(str(exc))
        ctx.call_on_close(self.servers.stop)
        self.settings = s.with_urls(redis_url, database_url)
        if init in ("always", "embedded"):
            init_schema(database_url)
        return self.settings


def init_schema(database_url: str) -> int:
    from ..store import Store

    store = Store(database_url)
    try:
        return store.init_db()
    except PersistenceError as exc:
        fail(str(exc))
    finally:
        store.close()


def positive_duration(value: str, option: str) -> float:
    """A duration option (``30d``, ``12h``, ``90m``) in seconds, more than zero.

    A bare number is refused: ``--older-than 30`` meant 30 days to the person who typed it and
    30 seconds to the parser, and a cleanup without ``--dry-run`` would have removed everything.
    """
    number = value.strip()
    if number.replace(".", "", 1).isdigit():
        raise click.BadParameter(
            f"{value!r} has no unit: write {number}d, {number}h, {number}m or {number}s", param_hint=option
        )
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None
    if seconds <= 0:
        raise click.BadParameter("must be more than zero", param_hint=option)
    return seconds
