"""Quantities as people write and read them: durations, counts, sizes.

Durations always carry a unit on the way in from people (``30d``, ``12h``, ``90m``) where a
bare number would be ambiguous; on the way out they are shown the same way (``30d``, not
``2.592e+06 s``).
"""

from __future__ import annotations

import re

__all__ = ["format_bytes", "format_duration", "parse_duration", "plural"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_duration(text: str | float | int) -> float:
    """``"30d"``, ``"12h"``, ``"90s"``, ``"250ms"`` or a number of seconds, in seconds."""
    if isinstance(text, int | float):
        if text < 0:
            raise ValueError("a duration cannot be negative")
        return float(text)
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration (try 30d, 12h, 15m, 90s or 250ms)")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2) or "s"]


def format_duration(seconds: float) -> str:
    """``2592000`` as ``30d``, ``5400`` as ``90m``, ``1.5`` as ``1.5s``: the largest whole unit."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def plural(n: int, noun: str) -> str:
    """``1 tab``, ``2 tabs``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def format_bytes(n: int) -> str:
    """``512 bytes``, ``1.5 KiB``, ``3.0 MiB``, up to GiB."""
    size = float(n)
    for unit in ("bytes", "KiB", "MiB"):
        if size < 1024:
            return f"{int(size)} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
