"""Logging set-up for the command line and workers: readable text or one JSON object per line.

Secrets are masked: any ``scheme://user:password@`` in a message or field is
printed with ``***`` instead of the password.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any

__all__ = ["JsonFormatter", "configure_logging", "mask_secrets"]

_URL_PASSWORD = re.compile(r"(?P<pre>[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^@\s]+)(?P<post>@)")
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def mask_secrets(text: str) -> str:
    return _URL_PASSWORD.sub(r"\g<pre>***\g<post>", text)


class _MaskingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = mask_secrets(record.msg)
        if record.args:
            record.args = tuple(mask_secrets(a) if isinstance(a, str) else a for a in record.args)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _extras(record).items():
            data[key] = value if isinstance(value, int | float | bool | str | None) else str(value)
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
    # RQ logs several lines per job at INFO; workers log one line per batch instead
    logging.getLogger("rq").setLevel(max(logging.WARNING, root.level))
