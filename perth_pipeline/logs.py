"""Logging set-up for the command line and workers: readable text or one JSON object per line.

Secrets are masked by the rule of :mod:`perth_pipeline.masking` in every message,
field and traceback, whichever logger wrote it (RQ's and the driver's too).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from .masking import mask_secrets

__all__ = ["JsonFormatter", "configure_logging", "mask_secrets"]

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class _MaskingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # RQ logs several lines per job at INFO (and sets its own loggers' levels as it likes):
        # workers log one line per batch instead, so RQ is heard from at WARNING and above only
        if record.levelno < logging.WARNING and record.name.split(".")[0] == "rq":
            return False
        if isinstance(record.msg, str):
            record.msg = mask_secrets(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(mask_secrets(a) if isinstance(a, str) else a for a in record.args)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _extras(record).items():
            # numbers, strings and plain containers stay JSON (a batch's rows per table); others become text
            plain = isinstance(value, int | float | bool | str | dict | list | tuple | None)
            data[key] = value if plain else str(value)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return mask_secrets(json.dumps(data, default=str))


_OURS = ("perth_pipeline", "workers")


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    # only our own loggers' fields: others (RQ logs a failed job's arguments) may carry user data
    if not record.name.startswith(_OURS):
        return {}
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras = _extras(record)
        if extras:
            base += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return mask_secrets(base)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_MaskingFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("rq").setLevel(max(logging.WARNING, root.level))
