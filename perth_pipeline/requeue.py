"""Failed batches sent back to the queue (``perth-pipeline requeue-failed``).

A batch ends in the failed registry when its retries ran out (PostgreSQL was
down or timing out for longer than the back-off) or when the workers refused it
(not a valid batch, an operation that fails validation, content the database
refused: marked ``perth_refused``). This command puts batches back on the queue
with their retries renewed, after dropping the operations older than the
tombstone retention: ``cleanup`` may have purged the tombstones that keep such
old writes dead, so applying them could bring deleted rows back. A batch left
with no operation is deleted.

Refused batches would be refused again: they are left in the registry unless
``--include-refused`` (after a fix of the workers). Jobs that are not batches of
this project are never requeued. ``--delete-skipped`` removes whatever is not
requeued. Job data is read here as JSON only (no pickle, size-bounded), never
through RQ's deserialization.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis
from rq.exceptions import InvalidJobOperation
from rq.job import Job
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from . import wire
from .batch import describe
from .broker import Keys
from .settings import Settings
from .units import format_duration

__all__ = ["Outcome", "requeue_failed"]


@dataclass(frozen=True, slots=True)
class Outcome:
    job_id: str
    action: str  # requeued, discarded, skipped, deleted, gone
    detail: str

    def line(self) -> str:
        return f"{self.action} {self.job_id}: {self.detail}"


def _sessions(ops: Iterable[Any]) -> list[str]:
    """The sessions a batch's operations belong to (read leniently: a refused batch may be malformed)."""
    found: set[str] = set()
    for op in ops:
        if not isinstance(op, dict):
            continue
        found_record = op.get("record")
        record: dict[str, Any] = found_record if isinstance(found_record, dict) else {}
        kind = op.get("op")
        if kind == wire.SESSION_UPSERT:
            value = record.get("id")
        elif kind in (wire.SESSION_DELETE, wire.SESSION_TOUCH):
            value = op.get("id")
        elif kind == wire.TAB_UPSERT:
            value = record.get("session_id")
        else:
            value = op.get("session_id")
        if isinstance(value, str):
            found.add(value)
    return sorted(found)


class _Requeuer:
    def __init__(self, client: redis.Redis, settings: Settings, *, now_ns: int | None, dry_run: bool) -> None:
        self.client = client
        self.settings = settings
        self.dry_run = dry_run
        self.registry = FailedJobRegistry(settings.queue, connection=client, serializer=JSONSerializer)
        self.cutoff = (time.time_ns() if now_ns is None else now_ns) - int(settings.tombstone_retention * 1e9)
        self.retention = format_duration(settings.tombstone_retention)

    def one(self, job_id: str, *, include_refused: bool, delete_skipped: bool) -> Outcome:
        raw: dict[bytes, bytes] = self.client.hgetall(Job.key_for(job_id))  # type: ignore[assignment]
        if not raw:
            if not self.dry_run:
                self.client.zrem(self.registry.key, job_id)
            return Outcome(job_id, "gone", "the job expired; its registry entry is removed")
        payload, why = wire.read_apply_batch(raw.get(b"data"))
        if payload is None:
            return self._skip(job_id, f"not a batch of this project: {why}", delete_skipped)
        refused = wire.refusal(raw.get(b"meta"))
        if refused is not None and not include_refused:
            return self._skip(
                job_id, f"refused by the workers ({refused[:200]}); --include-refused to send it anyway",
                delete_skipped,
            )  # fmt: skip
        ops: list[Any] = payload["ops"]
        keep = [op for op in ops if not (isinstance(op, dict) and _older(op.get("version"), self.cutoff))]
        dropped = len(ops) - len(keep)
        if not keep:
            if not self.dry_run:
                self._delete(job_id)
            return Outcome(
                job_id, "discarded", f"its {len(ops)} operations are older than the tombstone retention "
                f"({self.retention})",
            )  # fmt: skip
        try:
            job = Job.fetch(job_id, connection=self.client, serializer=JSONSerializer)
        except Exception as exc:  # a hash RQ cannot read back
            return self._skip(job_id, f"unreadable job ({type(exc).__name__})", delete_skipped)
        sessions = _sessions(keep)
        detail = f"{len(keep)} operations"
        if dropped:
            detail += f" ({dropped} older than the tombstone retention of {self.retention} dropped)"
        if not self.dry_run and not self._requeue(job, payload, keep, sessions):
            return Outcome(job_id, "gone", "it left the failed registry meanwhile")
        return Outcome(job_id, "requeued", detail)

    def _requeue(self, job: Job, payload: dict[str, Any], keep: list[Any], sessions: list[str]) -> bool:
        s = self.settings
        job.data = wire.apply_batch_data(
            json.dumps({**payload, "ops": keep}, separators=(",", ":"), ensure_ascii=False)
        )
        kinds = [op.get("op") if isinstance(op, dict) else None for op in keep]
        chunks = kinds.count(wire.HISTORY_APPEND)
        templates = kinds.count(wire.TEMPLATE_UPSERT) + kinds.count(wire.TEMPLATE_DELETE)
        job.description = describe(len(keep), sessions, chunks, templates)
        job.retries_left = len(s.retry_intervals)
        job.retry_intervals = list(s.retry_intervals)
        job.number_of_retries = 0
        job.failure_ttl = s.failed_ttl
        if job.meta.pop(wire.REFUSED, None) is not None:
            # save() leaves out an empty meta, and the stored one would stay
            job.save_meta()  # type: ignore[no-untyped-call]
        try:
            self.registry.requeue(job)
        except InvalidJobOperation:
            return False
        keys = Keys(s.queue)
        with self.client.pipeline(transaction=False) as pipe:
            # restores of these sessions wait for it again
            for session_id in sessions:
                pipe.zadd(keys.outstanding(session_id), {job.id: time.time()})
                pipe.expire(keys.outstanding(session_id), s.failed_ttl)
            pipe.execute()
        return True

    def _skip(self, job_id: str, why: str, delete: bool) -> Outcome:
        if not delete:
            return Outcome(job_id, "skipped", why)
        if not self.dry_run:
            self._delete(job_id)
        return Outcome(job_id, "deleted", why)

    def _delete(self, job_id: str) -> None:
        with self.client.pipeline() as pipe:
            pipe.zrem(self.registry.key, job_id)
            pipe.delete(Job.key_for(job_id))
            pipe.execute()


def _older(version: Any, cutoff: int) -> bool:
    return isinstance(version, int) and not isinstance(version, bool) and version < cutoff


def requeue_failed(
    client: redis.Redis,
    settings: Settings,
    *,
    dry_run: bool = False,
    include_refused: bool = False,
    delete_skipped: bool = False,
    now_ns: int | None = None,
) -> list[Outcome]:
    """Requeue (or discard, skip, delete) every job in the queue's failed registry; what was done."""
    requeuer = _Requeuer(client, settings, now_ns=now_ns, dry_run=dry_run)
    return [
        requeuer.one(job_id, include_refused=include_refused, delete_skipped=delete_skipped)
        for job_id in requeuer.registry.get_job_ids()
    ]
