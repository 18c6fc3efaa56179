"""``perth-pipeline requeue-failed``: the command around :func:`perth_pipeline.requeue.requeue_failed`."""

from __future__ import annotations

import click
import redis

from ..broker import make_redis, redis_host
from ..requeue import requeue_failed
from .common import CliState, fail

__all__ = ["requeue_command"]


@click.command("requeue-failed")
@click.option("--dry-run", is_flag=True, help="Print what would be done; change nothing.")
@click.option(
    "--include-refused", is_flag=True, help="Also requeue batches the workers refused (after fixing them)."
)
@click.option(
    "--delete-skipped",
    is_flag=True,
    help="Delete the failed jobs that are not requeued (refused, not batches).",
)
@click.pass_context
def requeue_command(ctx: click.Context, dry_run: bool, include_refused: bool, delete_skipped: bool) -> None:
    """Send failed batches back to the queue (dropping operations older than the tombstone retention)."""
    state: CliState = ctx.obj
    settings = state.backends(ctx)
    client = make_redis(settings.redis_url or "", connect_timeout=2.0, socket_timeout=10.0)
    try:
        outcomes = requeue_failed(
            client, settings, dry_run=dry_run, include_refused=include_refused, delete_skipped=delete_skipped
        )
    except redis.RedisError as exc:
        fail(f"Redis unreachable at {redis_host(settings.redis_url)}: {type(exc).__name__}")
    finally:
        client.close()
    for outcome in outcomes:
        click.echo(outcome.line())
    counts = {action: sum(1 for o in outcomes if o.action == action) for action in ("requeued", "discarded")}
    left = sum(1 for o in outcomes if o.action == "skipped")
    deleted = sum(1 for o in outcomes if o.action == "deleted")
    summary = (
        f"{len(outcomes)} failed job(s): {counts['requeued']} requeued, {counts['discarded']} discarded, "
        f"{deleted} deleted, {left} left in the failed registry"
    )
    click.echo(summary + (" (dry run: nothing changed)" if dry_run else ""))
