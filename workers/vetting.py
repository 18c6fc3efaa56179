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


def _size_over(data: bytes, limit: int) -> int | None:
    """The size of ``data`` once decompressed if it is over ``limit`` (a lower bound), else None."""
    if len(data) > limit:
        return len(data)
    try:
        out = zlib.decompressobj().decompress(data, limit + 1)
    except zlib.error:
        return None  # stored uncompressed, and within the limit
    return len(out) if len(out) > limit else None


class PerthJob(PackedJob):
    """A job that is vetted before it runs; its function is resolved through the allowlist only."""

    _oversize: int | None = None

    def restore(self, raw_data: Any) -> None:
        # RQ decompresses job data without a bound: a small zlib bomb would take the worker down
        self._oversize = None
        key: Any = b"data" if b"data" in raw_data else "data"
        data = raw_data.get(key)
        if isinstance(data, bytes):
            size = _size_over(data, MAX_JOB_BYTES)
            if size is not None:
                self._oversize = size
                raw_data = {**raw_data, key: _PLACEHOLDER}
        super().restore(raw_data)
        if isinstance(data, bytes) and self._oversize is None:
            # saving the job again (at its end) stores the data as it came, not compressed anew
            self.use_packed(self.data, data)

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
