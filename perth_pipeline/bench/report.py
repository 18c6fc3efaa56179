"""The targets of issues 3 and 5, judged on a run's results, and the one table that shows them."""

from __future__ import annotations

import math
from typing import Any

from .latency import CONDITIONS
from .stats import ratio

__all__ = ["evaluate", "render"]

#: Issue 3: per write call, in every condition (microseconds).
CALL_P50_US, CALL_P99_US, CALL_MAX_US = 5.0, 50.0, 5000.0
#: Issue 3: the flusher never holds the GIL for more than about 1 ms; a sleeping thread's wake-up
#: also pays the kernel's timer slack, so the bound on its wait for the interpreter is 1.5 ms.
GIL_WAIT_MAX_US = 1500.0
#: Issue 5.
CEILING_SHARE, NAIVE_FACTOR, FRESH_P99_MS, RESTORE_P50_MS = 0.60, 200.0, 250.0, 20.0


def _target(value: float | None, bound: float, *, at_least: bool = False) -> dict[str, Any]:
    met = None if value is None else (value >= bound if at_least else value <= bound)
    return {"value": value, "target": (">= " if at_least else "<= ") + f"{bound:g}", "met": met}


def _best_end_to_end(throughput: dict[str, Any]) -> dict[str, Any] | None:
    runs = [v for k, v in throughput.items() if k.startswith("end_to_end_")]
    return max(runs, key=lambda r: r["rows_per_s"]) if runs else None


def evaluate(result: dict[str, Any]) -> dict[str, Any]:
    """Every target the run has the numbers for: value, bound and whether it was met."""
    targets: dict[str, Any] = {}
    latency = result.get("latency", {})
    for name in CONDITIONS:
        if name not in latency:
            continue
        calls, gil = latency[name]["calls"], latency[name]["gil_wait"]
        targets[f"call_p50_us.{name}"] = _target(calls["p50"], CALL_P50_US)
        targets[f"call_p99_us.{name}"] = _target(calls["p99"], CALL_P99_US)
        targets[f"call_max_us.{name}"] = _target(calls["max"], CALL_MAX_US)
        targets[f"gil_wait_max_us.{name}"] = _target(gil["max"], GIL_WAIT_MAX_US)
    throughput = result.get("throughput", {})
    for key, run in throughput.items():
        if key.startswith(("end_to_end_", "drain_")) and "ceiling" in throughput:
            run["share_of_ceiling"] = ratio(run["rows_per_s"], throughput["ceiling"]["rows_per_s"])
        if key.startswith("end_to_end_") and "naive" in throughput:
            run["times_naive"] = ratio(run["rows_per_s"], throughput["naive"]["ops_per_s"])
    best = _best_end_to_end(throughput)
    if best is not None:
        if "ceiling" in throughput:
            targets["end_to_end_share_of_ceiling"] = _target(
                best.get("share_of_ceiling"), CEILING_SHARE, at_least=True
            )
        if "naive" in throughput:
            targets["end_to_end_times_naive"] = _target(best.get("times_naive"), NAIVE_FACTOR, at_least=True)
    if "freshness" in result:
        targets["freshness_p99_ms"] = _target(result["freshness"]["ms"]["p99"], FRESH_P99_MS)
    if "restore" in result:
        targets["restore_p50_ms"] = _target(result["restore"]["ms"]["p50"], RESTORE_P50_MS)
    return targets


def _us(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    if value >= 1_000_000:
        return f"{value / 1_000_000:.2f} s"
    if value >= 1000:
        return f"{value / 1000:.2f} ms"
    return f"{value:.1f} us"


def _x(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}x" if value >= 10 else f"{value:.2f}x"


def _mark(targets: dict[str, Any], key: str) -> str:
    entry = targets.get(key)
    if entry is None or entry["met"] is None:
        return ""
    return "" if entry["met"] else " !"


def _latency_row(name: str, run: dict[str, Any], targets: dict[str, Any]) -> str:
    c, w, g = run["calls"], run["wakeup_lateness"], run["gil_wait"]
    cells = [
        _us(c["p50"]) + _mark(targets, f"call_p50_us.{name}"),
        _us(c["p99"]) + _mark(targets, f"call_p99_us.{name}"),
        _us(c["p999"]),
        _us(c["max"]) + _mark(targets, f"call_max_us.{name}"),
        _us(w["max"]),
        _us(g["p99"]),
        _us(g["max"]) + _mark(targets, f"gil_wait_max_us.{name}"),
    ]
    line = f"   {name:<17}" + "".join(f"{cell:>11}" for cell in cells)
    n = run.get("naive")
    if n is not None:
        r = run["naive_over_producer"]
        errors = f" ({n['errors']}/{n['n']} raised)" if n.get("errors") else ""
        line += (
            f"{_us(n['p50']):>11}{_us(n['max']):>11}   {_x(r['p50'])}, {_x(r['p99'])}, {_x(r['max'])}{errors}"
        )
    return line


def _latency_lines(result: dict[str, Any], targets: dict[str, Any]) -> list[str]:
    latency = result["latency"]
    setup = latency["setup"]
    lines = [
        "",
        f"1. write-call latency: {setup['calls_per_condition']:,} update_pane calls per condition at "
        f"{setup['calls_per_second']:,}/s over {setup['working_set_panes']:,} panes, flusher running, "
        f"no worker; {setup['gc']}",
        f"   targets: p50 <= {CALL_P50_US:g} us, p99 <= {CALL_P99_US:g} us, max <= {_us(CALL_MAX_US)}; "
        f"GIL wait max <= {_us(GIL_WAIT_MAX_US)} (the flusher holds the GIL about 1 ms at most). "
        "! = missed",
        "   wake = how late the caller runs after a sleep; GIL wait = the same less its wait for a CPU",
        f"   {'condition':<17}{'p50':>11}{'p99':>11}{'p99.9':>11}{'max':>11}{'wake max':>11}"
        f"{'GIL p99':>11}{'GIL max':>11}{'naive p50':>11}{'naive max':>11}   naive/ours p50, p99, max",
    ]
    if "control" in latency:
        lines.append(_latency_row("control", latency["control"], targets) + "   (a no-op, no producer)")
    gcs = []
    for name in CONDITIONS:
        if name in latency:
            lines.append(_latency_row(name, latency[name], targets))
            g = latency[name].get("gc", {}).get("gen2")
            if g is not None:
                gcs.append(f"{name} {g['count']} (longest {g['max_ms']:.0f} ms)")
    if gcs:
        lines.append("   full (gen-2) garbage collections during the calls: " + ", ".join(gcs))
    held = [
        f"{name} {_us(h['p99'])} / {_us(h['max'])}"
        for name in CONDITIONS
        if name in latency and (h := latency[name].get("gil_wait_holder_running"))
    ]
    if held:
        lines.append(
            "   GIL wait p99 / max less the flusher's own wait for a CPU meanwhile (a preempted holder): "
            + ", ".join(held)
        )
    return lines


def _throughput_lines(result: dict[str, Any], targets: dict[str, Any]) -> list[str]:
    t = result["throughput"]
    lines = ["", "2-3. throughput (rows committed per second; ratios from this run)"]
    lines.append(f"   {'run':<44}{'rows':>9}{'seconds':>9}{'rows/s':>10}{'of ceiling':>12}{'x naive':>10}")
    for key, run in t.items():
        if not key.startswith("end_to_end_"):
            continue
        lines.append(
            f"   {'end to end, ' + str(run['workers']) + ' worker process(es)':<44}{run['rows']:>9,}"
            f"{run['seconds']:>9.2f}{run['rows_per_s']:>10,.0f}"
            f"{_pct(run.get('share_of_ceiling')):>12}{_x(run.get('times_naive')):>10}"
        )
        cpu = run.get("cpu_us_per_row")
        if cpu:
            lines.append(
                f"      CPU per row: producer {_us(cpu.get('producer'))}, workers {_us(cpu.get('workers'))}, "
                f"their PostgreSQL backends {_us(cpu.get('backends'))}, Redis {_us(cpu.get('redis'))}; "
                f"all {_us(cpu.get('total'))}"
            )
    for key, run in t.items():
        if not key.startswith("drain_"):
            continue
        lines.append(
            f"   {'workers only, ' + str(run['workers']) + ' worker process(es), queue filled':<44}"
            f"{run['rows']:>9,}{run['seconds']:>9.2f}{run['rows_per_s']:>10,.0f}"
            f"{_pct(run.get('share_of_ceiling')):>12}"
        )
        lines.append(
            f"      {run['rows_per_s_per_worker']:,.0f} rows/s per worker process; CPU per row: worker "
            f"{_us(run.get('worker_cpu_us_per_row'))}, "
            f"its PostgreSQL backend {_us(run.get('backend_cpu_us_per_row'))}, "
            f"Redis {_us(run.get('redis_cpu_us_per_row'))}"
        )
    if "ceiling" in t:
        c = t["ceiling"]
        lines.append(
            f"   {'ceiling: COPY + one merge, one connection':<44}{c['rows']:>9,}{c['seconds']:>9.2f}"
            f"{c['rows_per_s']:>10,.0f}"
        )
        cpu = c.get("cpu_us_per_row")
        if cpu:
            client, backend = _us(cpu.get("client")), _us(cpu.get("backend"))
            lines.append(f"      CPU per row: client {client}, its backend {backend}")
    if "naive" in t:
        n = t["naive"]
        lines.append(
            f"   {'naive: 1 RQ job per op, SimpleWorker':<44}{n['ops']:>9,}{n['seconds']:>9.2f}"
            f"{n['ops_per_s']:>10,.0f}"
        )
    for key in ("end_to_end_share_of_ceiling", "end_to_end_times_naive"):
        if key in targets:
            entry = targets[key]
            verdict = "met" if entry["met"] else "MISSED"
            lines.append(f"   target {key} {entry['target']}: {verdict}")
    if "hot_key" in t:
        h = t["hot_key"]
        lines.append(
            f"   hot key: {h['updates']:,} updates to {h['panes']:,} panes committed in {h['seconds']:.2f} s "
            f"({h['updates_per_s']:,.0f} updates/s, 1 worker): {h['ops_enqueued']:,} rows written in "
            f"{h['jobs']:,} jobs ({h['coalesced']:,} coalesced; "
            f"{h['rows_written_per_update']:.3f} rows per update)"
        )
    return lines


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def render(result: dict[str, Any]) -> str:
    targets = result.get("targets", {})
    m = result["machine"]
    lines = [
        f"perth-pipeline bench  {result['started_at']}  ({result['seconds']} s)",
        f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, "
        f"PostgreSQL {m.get('postgresql', '-')}, Redis {m.get('redis', '-')} "
        f"({m.get('backends', 'throwaway servers only')}); load average "
        f"{m['loadavg_start'][0]} at start, {m['loadavg_end'][0]} at end",
        f"flush interval {result['flush_interval_s']} s (the default)",
    ]
    if "latency" in result:
        lines += _latency_lines(result, targets)
    if "throughput" in result:
        lines += _throughput_lines(result, targets)
    if "freshness" in result:
        f = result["freshness"]
        ms = f["ms"]
        lines += [
            "",
            f"4. freshness: {f['writes']:,} writes at {f['achieved_rate_per_s']:,.0f}/s, 1 worker, "
            f"polled every {f['poll_s'] * 1000:.0f} ms: p50 {ms['p50']:.1f} ms, p99 {ms['p99']:.1f} ms"
            f"{_mark(targets, 'freshness_p99_ms')}, max {ms['max']:.1f} ms "
            f"(target p99 <= {FRESH_P99_MS:g} ms)",
        ]
    if "restore" in result:
        r = result["restore"]
        ms = r["ms"]
        lines += [
            "",
            f"5. restore: 1 session, {r['tabs']} tabs, {r['panes']} panes, "
            f"{r['scrollback_bytes']:,} bytes of scrollback in {r['chunks']} chunks, {ms['n']} runs: "
            f"p50 {ms['p50']:.1f} ms{_mark(targets, 'restore_p50_ms')}, p99 {ms['p99']:.1f} ms "
            f"(target p50 <= {RESTORE_P50_MS:g} ms)",
        ]
    missed = [k for k, v in targets.items() if v["met"] is False]
    lines += [
        "",
        f"targets: {len(targets) - len(missed)} of {len(targets)} met"
        + (f"; missed: {', '.join(missed)}" if missed else ""),
    ]
    return "\n".join(lines)
