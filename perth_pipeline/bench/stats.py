"""Percentiles and ratios, as the cases report them."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["percentiles", "ratio"]


def _rank(ordered: Sequence[float], q: float) -> float:
    """The nearest-rank percentile ``q`` (0 to 100) of an ordered sequence."""
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100.0 * len(ordered)) - 1))
    return float(ordered[index])


def percentiles(values: Sequence[float], scale: float = 1.0) -> dict[str, float]:
    """n, p50, p99, p99.9 and max of ``values``, each divided by ``scale`` (e.g. 1000 for ns to us)."""
    ordered = sorted(values)
    if not ordered:
        return {"n": 0, "p50": float("nan"), "p99": float("nan"), "p999": float("nan"), "max": float("nan")}
    return {
        "n": len(ordered),
        "p50": _rank(ordered, 50) / scale,
        "p99": _rank(ordered, 99) / scale,
        "p999": _rank(ordered, 99.9) / scale,
        "max": ordered[-1] / scale,
    }


def ratio(numerator: float, denominator: float) -> float | None:
    if denominator <= 0 or math.isnan(numerator) or math.isnan(denominator):
        return None
    return numerator / denominator
