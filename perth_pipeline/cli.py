"""The ``perth-pipeline`` command."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from typing import ClassVar

import click

from .commands.common import CliState, fail, init_schema
from .errors import InvalidSetting, PersistenceError
from .logs import configure_logging
from .settings import Settings

__all__ = ["CliState", "cli", "fail", "init_schema", "main"]


class _LazyGroup(click.Group):
    """Commands that live in their own modules, imported only when they run (a quick --help)."""

    lazy: ClassVar[dict[str, tuple[str, str, str]]] = {
        # name: (module, attribute, one-line help)
        "bench": (
            "perth_pipeline.commands.bench",
            "bench_command",
            "Measure the pipeline beside the naive design.",
        ),
        "cleanup": (
            "perth_pipeline.commands.cleanup",
            "cleanup_command",
            "Remove old sessions and tombstones.",
        ),
        "restore": (
            "perth_pipeline.commands.sessions",
            "restore_command",
            "Print a stored session (by id, name or id prefix).",
        ),
        "scheduler": (
            "perth_pipeline.commands.scheduler",
            "scheduler_command",
            "Enqueue periodic jobs (cleanup).",
        ),
        "sessions": (
            "perth_pipeline.commands.sessions",
            "sessions_command",
            "List stored sessions; show or delete one.",
        ),
        "templates": (
            "perth_pipeline.commands.templates",
            "templates_command",
            "List, show, save, delete templates.",
        ),
        "requeue-failed": (
            "perth_pipeline.commands.requeue",
            "requeue_command",
            "Send failed batches back to the queue.",
        ),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            import importlib

            module_name, attribute, _ = self.lazy[cmd_name]
            try:
                command = getattr(importlib.import_module(module_name), attribute)
            except (ImportError, AttributeError) as exc:
                fail(f"the {cmd_name} command is not available in this installation: {exc}")
            assert isinstance(command, click.Command)
            return command
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, cmd.get_short_help_str(60)) for name, cmd in self.commands.items()]
        rows += [(name, help_text) for name, (_, _, help_text) in self.lazy.items()]
        with formatter.section("Commands"):
            formatter.write_dl(sorted(rows))


@click.group(
    cls=_LazyGroup,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option(
    "--restore-from-db",
    "restore_from_db",
    metavar="SESSION",
    help="Print a stored session (the same as `restore SESSION`: an id, a name or an id prefix).",
)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], case_sensitive=False),
    default="INFO",
    show_default=True,
    envvar="PERTH_LOG_LEVEL",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    envvar="PERTH_LOG_FORMAT",
)
@click.pass_context
def cli(ctx: click.Context, restore_from_db: str | None, log_level: str, log_format: str) -> None:
    """perth-pipeline: persistence of Perth's sessions, tabs, panes and scrollback.

    Backends come from REDIS_URL and DATABASE_URL; with neither set, commands start
    embedded Redis and PostgreSQL under PERTH_DATA_DIR.
    """
    configure_logging(log_level, log_format)
    os.environ["PERTH_LOG_LEVEL"], os.environ["PERTH_LOG_FORMAT"] = log_level, log_format
    try:
        ctx.obj = CliState(Settings.from_env())
    except ValueError as exc:
        fail(f"invalid configuration: {exc}", code=2)
    if restore_from_db is not None:
        if ctx.invoked_subcommand is not None:
            fail("--restore-from-db cannot be combined with a command", code=2)
        from .commands.sessions import run_restore

        run_restore(ctx, restore_from_db, "json", None, ctx.obj.settings.read_wait)
        return
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


@cli.command("init-db")
@click.pass_context
def init_db(ctx: click.Context) -> None:
    """Apply schema.sql (idempotent) and print the schema version."""
    settings = ctx.obj.backends(ctx)
    click.echo(f"schema version {init_schema(settings.database_url or '')}")


@cli.command()
@click.option("--burst", is_flag=True, help="Exit once the queue is empty.")
@click.option("--processes", "-n", default=1, show_default=True, type=click.IntRange(1, 64))
@click.option(
    "--with-scheduler/--without-scheduler",
    default=True,
    show_default=True,
    help="Run RQ's scheduler (needed for retries with back-off; one is active per queue).",
)
@click.option(
    "--metrics-port",
    default=None,
    metavar="[HOST:]PORT",
    envvar="PERTH_METRICS_PORT",
    help="Serve Prometheus metrics on http://HOST:PORT/metrics (HOST defaults to 127.0.0.1).",
)
@click.pass_context
def worker(
    ctx: click.Context, burst: bool, processes: int, with_scheduler: bool, metrics_port: str | None
) -> None:
    """Run RQ workers that apply batches to PostgreSQL."""
    settings = ctx.obj.backends(ctx, init="embedded")
    if metrics_port is not None:
        from workers.metrics import serve_metrics

        try:
            serve_metrics(settings, metrics_port, processes=processes)
        except (ValueError, OSError) as exc:
            fail(str(exc), code=2)
    if processes == 1:
        from workers.runner import run_worker

        run_worker(settings, burst=burst, with_scheduler=with_scheduler)
        return
    from workers.runner import Supervisor

    env = {
        **os.environ,
        "REDIS_URL": settings.redis_url or "",
        "DATABASE_URL": settings.database_url or "",
        "PERTH_QUEUE": settings.queue,
    }
    sys.exit(Supervisor(processes, burst=burst, env=env).run())


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--watch", type=click.FloatRange(min=0.1), default=None, metavar="SECONDS", help="Refresh every SECONDS."
)
@click.pass_context
def status(ctx: click.Context, as_json: bool, watch: float | None) -> None:
    """Queue depth, lag, jobs, workers, backend health. Exit 1 if unhealthy."""
    settings = ctx.obj.backends(ctx)
    from .status import run_status

    sys.exit(run_status(settings, as_json=as_json, watch=watch, echo=click.echo, clear=click.clear))


@cli.command()
@click.pass_context
def demo(ctx: click.Context) -> None:
    """Zero-config end-to-end run: a simulated terminal, workers, a restore."""
    settings = ctx.obj.backends(ctx, init="always")
    from .commands.demo import run_demo

    run_demo(settings.model_copy(update={"queue": f"perth-demo-{uuid.uuid4().hex[:6]}"}))


def _concurrency(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, int]:
    """``-c worker=4`` (repeated, or ``worker=4,scheduler=1``), as ``honcho start -c`` takes it."""
    counts: dict[str, int] = {}
    for item in (part for value in values for part in value.split(",") if part.strip()):
        name, _, number = item.partition("=")
        if not name.strip() or not number.strip().isdigit():
            raise click.BadParameter(f"{item!r} is not PROCESS=NUMBER (e.g. worker=4)")
        counts[name.strip()] = int(number)
    return counts


@cli.command()
@click.argument("names", metavar="[PROCESS]...", nargs=-1)
@click.option("--procfile", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option(
    "--concurrency",
    "-c",
    multiple=True,
    callback=_concurrency,
    metavar="PROCESS=N",
    help="How many of a process to run (e.g. -c worker=4), as with honcho start.",
)
@click.pass_context
def up(
    ctx: click.Context, names: tuple[str, ...], procfile: Path | None, concurrency: dict[str, int]
) -> None:
    """Run the Procfile's processes, or only those named (embedded servers when no URLs are set).

    One runs per data directory (PERTH_DATA_DIR). Ctrl-C stops all.
    """
    from .stack import StackLock, StackRunning, run_stack, stack_processes

    try:
        processes = stack_processes(procfile, names, concurrency)
    except ValueError as exc:
        fail(str(exc), code=2)
    lock = StackLock(ctx.obj.settings.data_dir)
    try:
        lock.acquire()
    except StackRunning as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot lock {lock.path}: {exc}")
    ctx.call_on_close(lock.release)  # after the embedded servers stopped (registered later, run first)
    settings = ctx.obj.backends(ctx, init="always")
    sys.exit(run_stack(settings, processes, lock))


@cli.command()
@click.option("--bind", "-b", default="127.0.0.1", show_default=True, envvar="RQ_DASHBOARD_BIND")
@click.option(
    "--port", "-p", default=9181, show_default=True, type=click.IntRange(0, 65535), envvar="RQ_DASHBOARD_PORT"
)
@click.option(
    "--json",
    "json_jobs",
    is_flag=True,
    envvar="RQ_DASHBOARD_JSON",
    help="Jobs are JSON (RQ's JSONSerializer), as ours are.",
)
@click.option(
    "--disable-delete", is_flag=True, envvar="RQ_DASHBOARD_DISABLE_DELETE", help="Hide the delete buttons."
)
@click.option("--poll-interval", type=click.IntRange(100), default=None, envvar="RQ_DASHBOARD_POLL_INTERVAL")
@click.option(
    "--url-prefix", default="", envvar="RQ_DASHBOARD_URL_PREFIX", help="e.g. behind a reverse proxy."
)
def dashboard(
    *, bind: str, port: int, json_jobs: bool, disable_delete: bool, poll_interval: int | None, url_prefix: str
) -> None:
    """rq-dashboard, guarded: refuses cross-site changes, never shows the Redis password.

    Redis: RQ_DASHBOARD_REDIS_URL, else REDIS_URL. Basic auth: RQ_DASHBOARD_USERNAME and
    RQ_DASHBOARD_PASSWORD, both or neither (one alone: exit 2).
    """
    from .dashboard import main as serve_dashboard

    sys.exit(
        serve_dashboard(
            bind,
            port,
            json_jobs=json_jobs,
            disable_delete=disable_delete,
            poll_interval=poll_interval,
            url_prefix=url_prefix,
        )
    )


@cli.command("env")
@click.pass_context
def env_command(ctx: click.Context) -> None:
    """Print `export REDIS_URL=... DATABASE_URL=... PERTH_QUEUE=...` for eval.

    eval "$(perth-pipeline env)" points a shell (and the scripts it runs) at the backends:
    REDIS_URL and DATABASE_URL if set, else the embedded stack that `perth-pipeline up` runs
    in PERTH_DATA_DIR. Starts nothing: exit 1 when no stack is running.
    """
    from .localstack import shell_exports, stack_urls

    s: Settings = ctx.obj.settings
    if bool(s.redis_url) != bool(s.database_url):
        fail("set both REDIS_URL and DATABASE_URL, or neither to use the embedded stack")
    try:
        urls = stack_urls(s)
    except PersistenceError as exc:
        fail(str(exc))
    if urls is None:
        fail(
            f"no embedded stack is running in {s.data_dir}: start one with `perth-pipeline up` "
            "(or set REDIS_URL and DATABASE_URL)"
        )
    click.echo(shell_exports(*urls, s.queue))  # stdout only, as it is: it is for eval, never a log


def main() -> None:
    try:
        cli(prog_name="perth-pipeline")
    except InvalidSetting as exc:  # a URL a driver cannot parse, from any command: one line
        fail(str(exc), 2)


if __name__ == "__main__":
    main()
