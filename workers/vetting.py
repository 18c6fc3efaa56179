"""Which jobs a worker runs: :class:`PerthJob`, vetted before anything of it runs.

A job's function is looked up by name in ``workers.jobs.ALLOWED`` (nothing is
imported), its data must be JSON of RQ's job format (never pickle) and of bounded
size (RQ would decompress any amount), its arguments must fit the function, and it
may carry no callbacks or webhooks (names and URLs that anyone who can write to
Redis could set). A refused job raises :class:`UnknownJobFunction` with the reason
and has no retries left: it goes to the failed registry at once.
"""

from __future__ import annotations

import inspect
import zlib
from typing import Any

from rq.exceptions import DeserializationError
from rq.job import Job

from perth_pipeline.batch import PackedJob

from . import jobs

__all__ = ["MAX_JOB_BYTES", "PerthJob", "UnknownJobFunction", "short"]

#: The most job data (decompressed) a worker reads. A batch of this project is far smaller
#: (PERTH_BATCH_MAX_BYTES is at most 16 MiB, plus one operation); bigger data is refused unread.
MAX_JOB_BYTES = 32 << 20
_PLACEHOLDER = b"null"


class UnknownJobFunction(Exception):
    """A job this worker refuses to run (a function it does not define, malformed data, callbacks)."""


def short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _read(data: bytes, limit: int) -> tuple[bytes | None, int | None]:
    """``data`` as RQ reads it (decompressed if it is zlib, else as it is), or ``(None, size)``
    with a lower bound of its size when that is over ``limit``: never more than ``limit`` is inflated."""
    if len(data) > limit:
        return None, len(data)
    inflate = zlib.decompressobj()
    try:
        out = inflate.decompress(data, limit + 1)
    except zlib.error:
        return data, None  # stored uncompressed (RQ falls back to the data as it is, too)
    if len(out) > limit:
        return None, len(out)
    if not inflate.eof:
        return data, None  # a truncated stream: RQ's zlib.decompress fails and it reads the data as it is
    return out, None


class PerthJob(PackedJob):
    """A job that is vetted before it runs; its function is resolved through the allowlist only."""

    _oversize: int | None = None
    _malformed: str | None = None

    def restore(self, raw_data: Any) -> None:
        # RQ decompresses job data without a bound: a small zlib bomb would take the worker down.
        # The data is decompressed here, once and bounded; RQ is handed a placeholder to restore.
        self._oversize = self._malformed = None
        if raw_data and b"data" not in raw_data and "data" not in raw_data:
            # RQ takes a job hash without data for a job that does not exist, and its dequeue drops
            # the id silently: the job would stay "queued" forever, in no registry. Refused instead.
            self._malformed = "the job hash has no 'data' field (not a job of RQ's format)"
            raw_data = {**raw_data, b"data": _PLACEHOLDER}
        key: Any = b"data" if b"data" in raw_data else "data"
        data = raw_data.get(key)
        if not isinstance(data, bytes):
            super().restore(raw_data)
            return
        plain, self._oversize = _read(data, MAX_JOB_BYTES)
        super().restore({**raw_data, key: _PLACEHOLDER})
        if plain is not None:
            # saving the job again (at its end) stores the data as it came, not compressed anew
            self.use_packed(plain, data)

    @property
    def func_name(self) -> str | None:
        try:
            return super().func_name
        except DeserializationError:
            return None  # for RQ's process title; refusal() gives the reason

    @func_name.setter
    def func_name(self, value: str | None) -> None:
        Job.func_name.fset(self, value)  # type: ignore[attr-defined]

    def refusal(self) -> str | None:
        """Why this worker will not run the job, or None. Nothing of the job is imported or run."""
        if self._malformed is not None:
            return self._malformed
        if self._oversize is not None:
            return f"job data is over the limit of {MAX_JOB_BYTES} bytes ({self._oversize}+): not read"
        try:
            name = super().func_name
            instance, args, kwargs = self.instance, self.args, self.kwargs
        except DeserializationError:
            return "job data is not JSON in RQ's job format (no pickle): [function, null, [args], {kwargs}]"
        function = jobs.ALLOWED.get(name) if isinstance(name, str) else None
        if function is None:
            return f"refused job function {short(name)}: this worker runs only {sorted(jobs.ALLOWED)}"
        if instance is not None:
            return f"refused job function {name} on an instance: only the listed functions run"
        if not isinstance(args, list | tuple) or not isinstance(kwargs, dict):
            return "job arguments are not a list and a mapping"
        try:
            inspect.signature(function).bind(*args, **kwargs)
        except TypeError as exc:
            return f"arguments do not fit {name}: {exc}"
        names = (self._success_callback_name, self._failure_callback_name, self._stopped_callback_name)
        callbacks = [short(n) for n in names if n]
        if callbacks:
            return f"refused callback(s) {', '.join(callbacks)}: callbacks are not allowed"
        if self.webhooks:
            return "refused webhook(s): webhooks are not allowed"
        return None

    @property
    def func(self) -> Any:
        reason = self.refusal()
        if reason is not None:
            self.retries_left = 0  # running it again cannot help: straight to the failed registry
            raise UnknownJobFunction(reason)
        return jobs.ALLOWED[super().func_name or ""]

    # Callbacks and webhooks are names and URLs stored in Redis: never imported, never called
    # (a job that carries any is refused before it runs, see refusal()).
    @property
    def success_callback(self) -> None:
        return None

    @property
    def failure_callback(self) -> None:
        return None

    @property
    def stopped_callback(self) -> None:
        return None

    def send_webhooks(self, status: Any, *, exc_string: str | None = None) -> None:
        return None
