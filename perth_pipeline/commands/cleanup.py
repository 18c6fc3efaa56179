"""``perth-pipeline cleanup``: runs :func:`perth_pipeline.retention.run_cleanup` once, now."""

from __future__ import annotations

import json

import click

from ..errors import DatabaseError, PersistenceError
from ..retention import run_cleanup
from ..store import admin_connection
from .common import fail, positive_duration

__all__ = ["cleanup_command"]


@click.command("cleanup")
@click.option(
    "--older-than",
    "older_than",
    required=True,
    metavar="DURATION",
    help="Remove sessions inactive for longer than this (30d, 12h...), and orphan rows as old.",
)
@click.option(
    "--tombstones-older-than",
    "tombstones_older_than",
    default=None,
    metavar="DURATION",
    help="Remove tombstones older than this (default: PERTH_TOMBSTONE_RETENTION, 30d).",
)
@click.option("--dry-run", is_flag=True, help="Print what would be removed; remove nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def cleanup_command(
    ctx: click.Context, older_than: str, tombstones_older_than: str | None, dry_run: bool, as_json: bool
) -> None:
    """Remove old sessions (with their tabs, panes, scrollback), orphan rows and tombstones."""
    age = positive_duration(older_than, "--older-than")
    state = ctx.obj
    tomb_age = (
        positive_duration(tombstones_older_than, "--tombstones-older-than")
        if tombstones_older_than is not None
        else state.settings.tombstone_retention
    )
    settings = state.backends(ctx)
    try:
        with admin_connection(settings) as conn:
            report = run_cleanup(conn, older_than=age, tombstone_retention=tomb_age, dry_run=dry_run)
    except DatabaseError as exc:  # a statement timeout, a read-only standby...: one line, no traceback
        fail(f"cleanup stopped: {exc} (what was removed before it stays removed)")
    except PersistenceError as exc:
        fail(str(exc))
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2, default=str))
        return
    for line in report.lines():
        click.echo(line)
