"""One masking rule for every path out: logs, errors, ``status``, the health hash, the dashboard.

A password reaches text in three shapes, all masked as ``***``:

* the userinfo of a URL, ``scheme://user:password@host``, also when the URL is malformed
  (``rediss//:pw@host``, ``postgresq://u:pw@h``, a password holding ``/`` or ``@``):
  whatever stands between ``//`` and the last ``@`` of the same word after a ``:``;
* a ``password=`` setting: a URL's query parameter or a libpq ``key=value`` string;

A userinfo without ``:`` (``postgresql://postgres@host``) is a user name to libpq and redis-py
alike, and is kept; so is a port followed by a path (``//host:8080/path@v2``). Otherwise the
rule errs on the side of hiding: ``//host:5432?x=a@b`` loses ``5432?x=a``.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import urlsplit, urlunsplit

__all__ = ["MaskingFilter", "carries_secret", "first_line", "mask_secrets", "mask_url", "masked_logger"]

# a word of the text: no whitespace, no quote (libpq quotes the URL it cannot parse)
# (a port followed by a path is not a password: "//host:8080/path@v2")
_USERINFO = re.compile(r"(?P<pre>//[^\s\"'@/:]*:)(?!\d{1,5}/)(?P<pw>[^\s\"']*)(?P<post>@)")
_KEY_PASSWORD = re.compile(r"(?P<pre>\bpassword\s*=\s*)(?P<pw>'(?:[^'\\]|\\.)*'|[^\s&'\"]+)", re.IGNORECASE)


def mask_secrets(text: str) -> str:
    """``text`` with every password it holds (URL userinfo, ``password=``) replaced by ``***``."""
    if "@" in text:
        text = _USERINFO.sub(r"\g<pre>***\g<post>", text)
    return _KEY_PASSWORD.sub(r"\g<pre>***", text)


def mask_url(url: str | None) -> str:
    """``url`` fit for a log line, a report or a page: its password replaced by ``***``."""
    if not url:
        return ""
    masked = mask_secrets(url)
    try:
        parts = urlsplit(masked)
        parts.port  # noqa: B018 - raises for a port that is not a number
    except ValueError:
        return masked
    if parts.password is None or parts.password == "***":
        return masked
    # userinfo the pattern kept (a user name alone): still never print what urlsplit calls a password
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(
        (parts.scheme, f"{parts.username or ''}:***@{host}", parts.path, parts.query, parts.fragment)
    )


def first_line(exc: BaseException) -> str:
    """The first line of an error, masked: for a report, a failed job's reason or a log.

    For a server error only the primary message: DETAIL and CONTEXT may quote the user's data
    (a row of a COPY).
    """
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    text = str(primary) if primary else str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return mask_secrets(line)


def carries_secret(exc: BaseException) -> bool:
    """Whether the text of ``exc`` (or of an error it wraps) holds something :func:`mask_secrets` hides."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        if mask_secrets(text) != text:
            return True
        current = current.__cause__ or current.__context__
    return False


class MaskingFilter(logging.Filter):
    """Renders a record's message, fields and traceback with :func:`mask_secrets` applied.

    Installed on each of the library's own loggers (:func:`masked_logger`), so that whatever
    handler the host application has, what this library logs carries no password.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_secrets(message)
        if masked != message or record.args:
            record.msg, record.args = masked, ()
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD and isinstance(value, str):
                record.__dict__[key] = mask_secrets(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = mask_secrets(_FORMATTER.formatException(record.exc_info))
        return True


def masked_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)`` with :class:`MaskingFilter` installed (once)."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, MaskingFilter) for f in logger.filters):
        logger.addFilter(MaskingFilter())
    return logger


_FORMATTER = logging.Formatter()
_STANDARD: frozenset[str] = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | frozenset(
    {"message", "asctime"}
)
