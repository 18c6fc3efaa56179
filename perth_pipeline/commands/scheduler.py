"""``perth-pipeline scheduler``: runs :class:`perth_pipeline.scheduler.Scheduler` until a signal."""

from __future__ import annotations

import signal
import threading
from types import FrameType

import click
import redis

from ..broker import make_redis
from ..masking import masked_logger
from ..retention import MIN_JOB_RETENTION
from ..scheduler import Scheduler
from ..settings import Settings
from .common import fail, positive_duration

__all__ = ["scheduler_command"]

logger = masked_logger("perth_pipeline.scheduler")


@click.command("scheduler")
@click.option(
    "--every",
    default="1h",
    show_default=True,
    envvar="PERTH_CLEANUP_EVERY",
    metavar="DURATION",
    help="How often the cleanup runs.",
)
@click.option(
    "--older-than",
    "older_than",
    default="30d",
    show_default=True,
    envvar="PERTH_CLEANUP_OLDER_THAN",
    metavar="DURATION",
    help="Sessions inactive for longer are removed (as `cleanup --older-than`).",
)
@click.option(
    "--tick",
    default=5.0,
    show_default=True,
    type=click.FloatRange(0.05, 60),
    help="Seconds between two checks of the lock and the schedule.",
)
@click.option("--once", is_flag=True, help="Check once (enqueue if due and active), then exit.")
@click.pass_context
def scheduler_command(ctx: click.Context, every: str, older_than: str, tick: float, once: bool) -> None:
    """Enqueue the periodic cleanup as a JSON job; one scheduler is active at a time."""
    every_s, older_s = positive_duration(every, "--every"), positive_duration(older_than, "--older-than")
    if older_s < MIN_JOB_RETENTION:
        raise click.BadParameter(
            f"is {older_than}; the scheduled cleanup keeps at least 1h (the workers refuse less)",
            param_hint="--older-than",
        )
    settings: Settings = ctx.obj.backends(ctx)
    connection = make_redis(settings.redis_url or "", connect_timeout=2.0, socket_timeout=5.0)
    scheduler = Scheduler(
        settings, connection, every=every_s, older_than=older_s, lock_ttl=max(6 * tick, 15.0)
    )
    try:
        if once:
            try:
                job_id = scheduler.tick()
            except redis.RedisError as exc:
                fail(f"Redis unavailable: {exc}")
            finally:
                scheduler.release()
            click.echo(f"enqueued cleanup job {job_id}" if job_id else "nothing due (or another is active)")
            return
        stop = threading.Event()

        def _stop(signum: int, frame: FrameType | None) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        logger.info(
            "scheduler started: cleanup every %s of sessions inactive for %s",
            every,
            older_than,
            extra={"queue": settings.queue, "scheduler": scheduler.token},
        )
        scheduler.run(stop, interval=tick)
    finally:
        connection.close()
