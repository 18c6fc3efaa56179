"""``perth-pipeline bench``: the command around :func:`perth_pipeline.bench.harness.run_bench`."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from ..bench.harness import CASES, QUICK, Sizes, run_bench
from ..bench.report import render

__all__ = ["bench_command"]


def _parse_workers(value: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter("a comma-separated list of worker counts, e.g. 1,2") from None
    if not counts or min(counts) < 1:
        raise click.BadParameter("a comma-separated list of worker counts, e.g. 1,2")
    return counts


@click.command("bench")
@click.option(
    "--case",
    "cases",
    multiple=True,
    type=click.Choice(CASES),
    help="Run only this case (repeatable). Default: all of them.",
)
@click.option("--quick", is_flag=True, help="Small sizes: a smoke test in about a minute, not a measurement.")
@click.option(
    "--json", "as_json", is_flag=True, help="Print the results as JSON on stdout (the table on stderr)."
)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), help="Also write the JSON here.")
@click.option("--calls", type=click.IntRange(1), help="Write calls per latency condition [100,000].")
@click.option("--panes", type=click.IntRange(1), help="Panes of the end-to-end case [100,000].")
@click.option("--tabs", type=click.IntRange(1), help="Tabs of the end-to-end case [1,000].")
@click.option("--sessions", type=click.IntRange(1), help="Sessions of the end-to-end case [10].")
@click.option("--workers", "workers", type=str, help="Worker processes of the end-to-end case [1,2].")
@click.option("--hot-updates", type=click.IntRange(1), help="Updates of the hot-key case [100,000].")
@click.option("--naive-sample", type=click.IntRange(1), help="Jobs of the naive design [1,000].")
@click.option("--freshness-seconds", type=click.FloatRange(0.5), help="Length of the freshness case [10].")
@click.option("--restore-runs", type=click.IntRange(1), help="Restores timed [50].")
@click.pass_context
def bench_command(
    ctx: click.Context,
    /,
    cases: tuple[str, ...],
    quick: bool,
    as_json: bool,
    output: Path | None,
    **overrides: Any,
) -> None:
    """Measure the pipeline beside the naive design and the ceiling of this machine.

    Backends: REDIS_URL and DATABASE_URL, or embedded servers when neither is set;
    the benchmark creates (and drops) a database of its own there. The latency case
    starts throwaway servers of its own to pause and stop.
    """
    sizes = QUICK if quick else Sizes()
    renames = {"naive_sample": "naive_sample", "freshness_seconds": "fresh_seconds"}
    changes = {renames.get(k, k): v for k, v in overrides.items() if v is not None and k != "workers"}
    if overrides.get("workers"):
        changes["workers"] = _parse_workers(overrides["workers"])
    sizes = dataclasses.replace(sizes, **changes)
    selected = tuple(c for c in CASES if c in cases) if cases else CASES

    def progress(message: str) -> None:
        click.echo(f"[{time.strftime('%H:%M:%S')}] {message}", err=True)

    settings = None
    if set(selected) - {"latency"}:
        settings = ctx.obj.backends(ctx, init="always")
    result = run_bench(selected, sizes, settings, progress)
    table = render(result)
    if output is not None:
        output.write_text(json.dumps(result, indent=2) + "\n")
    if as_json:
        click.echo(table, err=True)
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(table)
    sys.stdout.flush()
