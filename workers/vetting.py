"""Which jobs a worker runs: :class:`PerthJob`, vetted before anything of it runs.

A job's function is looked up by name in ``workers.jobs.ALLOWED`` (nothing is
imported), its data must be JSON of RQ's job format (never pickle) and of bounded
size (RQ would decompress any amount), its arguments must fit the function, and it
may carry no callbacks or webhooks (names and URLs that anyone who can write to
Redis could set). A refused job raises :class:`UnknownJobFunction` with the reason
and has no retries left: it goes to the failed registry at once.

The job hash itself must be of RQ's format: it holds the fields RQ writes for every
job it enqueues (:data:`REQUIRED_FIELDS`), and it names the queue it was taken from as
its origin. RQ would take a hash without ``data`` for a job that does not exist and drop
its id silently, and would file the failure of a job without ``origin`` under a queue
named "" that nobody reads: such hashes are refused instead, into the failed registry of
the queue they were taken from. A field RQ cannot parse makes the hash unreadable
(:class:`UnreadableJobHash`, naming the field): the worker moves it to the failed registry.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import redis
from rq.exceptions import DeserializationError, NoSuchJobError, StopRequested
from rq.job import Job

from perth_pipeline import rqcompat
from perth_pipeline.batch import PackedJob
from perth_pipeline.wire import MAX_JOB_BYTES, inflate_job_data

from . import jobs

__all__ = ["MAX_JOB_BYTES", "REQUIRED_FIELDS", "PerthJob", "UnknownJobFunction", "UnreadableJobHash", "short"]

_PLACEHOLDER = b"null"
#: The fields of a job hash that RQ writes for every job it creates and enqueues (``origin``: the
#: queue's name). A hash without one of them was not written by RQ, nor by a faithful port of it.
REQUIRED_FIELDS = ("data", "created_at", "description", "origin")


class UnknownJobFunction(Exception):
    """A job this worker refuses to run (a function it does not define, malformed data, callbacks)."""


class UnreadableJobHash(ValueError):
    """A job hash with a field RQ cannot parse (a date, a status, a number): named, its value never shown."""


def short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _missing_reason(missing: list[str]) -> str:
    names = ", ".join(repr(name) for name in missing)
    noun = "field" if len(missing) == 1 else "fields"
    return f"the job hash has no {names} {noun} (not a job of RQ's format: {', '.join(REQUIRED_FIELDS)})"


def _unreadable_field(job: Job, raw_data: Any) -> str | None:
    """The field of ``raw_data`` that RQ cannot parse, or None: the fields are put back one at a
    time onto a hash that restores (its data only), and the first one that makes it fail is named,
    also when several are bad. Nothing is read from Redis; only on a hash that failed to restore.
    """
    key: Any = b"data" if b"data" in raw_data else "data"
    trial: dict[Any, Any] = {key: raw_data.get(key, _PLACEHOLDER)}
    for name, value in raw_data.items():
        if name == key:
            continue
        trial[name] = value
        try:
            Job(job.id, connection=job.connection, serializer=job.serializer).restore(trial)  # no I/O
        except Exception:
            return name.decode(errors="replace") if isinstance(name, bytes) else str(name)
    return None


class PerthJob(PackedJob):
    """A job that is vetted before it runs; its function is resolved through the allowlist only."""

    _oversize: int | None = None
    _malformed: str | None = None

    def restore(self, raw_data: Any) -> None:
        # RQ decompresses job data without a bound: a small zlib bomb would take the worker down.
        # The data is decompressed here, once and bounded; RQ is handed a placeholder to restore.
        self._oversize = self._malformed = None
        fields = {k.decode() if isinstance(k, bytes) else str(k) for k in raw_data or ()}
        missing = [name for name in REQUIRED_FIELDS if name not in fields]
        if raw_data and missing:
            # RQ takes a job hash without data for a job that does not exist, and its dequeue drops
            # the id silently: the job would stay "queued" forever, in no registry. Refused instead,
            # as is a hash without the other fields RQ always writes (see PerthWorker for origin).
            self._malformed = _missing_reason(missing)
            if "data" in missing:
                raw_data = {**raw_data, b"data": _PLACEHOLDER}
        key: Any = b"data" if b"data" in raw_data else "data"
        data = raw_data.get(key)
        if not isinstance(data, bytes):
            self._restore_fields(raw_data)
            return
        plain, self._oversize = inflate_job_data(data, MAX_JOB_BYTES)
        self._restore_fields({**raw_data, key: _PLACEHOLDER})
        if plain is not None:
            # saving the job again (at its end) stores the data as it came, not compressed anew
            self.use_packed(plain, data)

    def _restore_fields(self, raw_data: Any) -> None:
        try:
            super().restore(raw_data)
        except (NoSuchJobError, StopRequested):
            raise  # gone, or a signal arrived meanwhile: nothing wrong with the hash
        except Exception as exc:
            # RQ's own message quotes the value, or says nothing (an AssertionError): name the field
            field = _unreadable_field(self, raw_data)
            what = f"its field {field!r}" if field else "one of its fields"
            raise UnreadableJobHash(
                f"the job hash is not of RQ's format: RQ cannot read {what} ({type(exc).__name__})"
            ) from exc

    def taken_from(self, queue_name: str) -> None:
        """The job was taken from the queue ``queue_name``: its bookkeeping (the registries it goes
        to, its removal from the queue's intermediate list) follows that queue, whatever its hash says.

        A hash without ``origin`` is refused (see :meth:`restore`); one that names another queue
        is not malformed (RQ would run it) and runs, filed under the queue it was taken from.
        """
        if self.origin != queue_name:
            self.origin = queue_name
            if self._malformed is None:
                with contextlib.suppress(redis.RedisError):  # kept in memory; saved at the job's end
                    self.connection.hset(self.key, "origin", queue_name)

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
        callbacks = [short(n) for n in rqcompat.callback_names(self) if n]
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
