"""The batches a producer sent and does not yet know to be committed, and what ``flush()`` waits for.

A write is always in exactly one of three places until its batch commits: dirty in the buffer,
being sent (drained from the buffer, not yet on the queue), or in flight (on the queue, not yet
known to be committed). ``flush()`` says True only when every batch holding writes made so far
has committed, so it must never see a write in none of them: the moves between them are ordered
so that it cannot, and all of them, with the one look that judges them (:meth:`InFlightTracker.
settled`), are here.

* A drain is marked as being sent (``begin_send``) before anything leaves the buffer, and the
  mark is narrowed to the drain's oldest write, then cleared only once its batches are in flight
  (``add``) or its writes are dirty again.
* A batch leaves the in-flight set (``_forget``) only after its writes are dirty again (failed,
  vanished, abandoned) or committed: never the other way round.
* ``settled`` reads the mark, the in-flight set and the buffer's oldest unsent write under the
  state lock, which every move above takes: read one after the other without it, a write could
  slip between two looks.

A batch in flight keeps only what a resend needs (its entities' keys: the buffer sends their
current state again, never the old one), not its data. The poll tells each batch's fate from
its RQ job hash: FINISHED is committed, a live status waits (unless its worker stopped
heart-beating), a refusal by the workers is final (sending it again cannot help), and anything
else (failed, or vanished with a Redis restart) makes its writes dirty again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime

from rq.job import JobStatus

from . import wire
from .batch import EncodedBatch
from .broker import LIVE_STATUSES
from .buffer import Buffer, Chunk, Receipt, Touch
from .masking import masked_logger

__all__ = ["LOG_EVERY", "InFlight", "InFlightTracker", "Summary"]

logger = masked_logger("perth_pipeline.producer")

LOG_EVERY = 30.0  # at most one line per this many seconds for a repeated condition


class Summary:
    """One log line for many batches of one kind, at most every ``LOG_EVERY`` seconds.

    After a Redis restart hundreds of batches vanish at once; an outage must not flood
    the terminal's log with a line per batch.
    """

    def __init__(self, what: str, level: int) -> None:
        self.what = what
        self.level = level
        self.reasons: dict[str, int] = {}
        self.example = ""
        self.logged_at = -LOG_EVERY

    def note(self, reason: str, job_id: str) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self.example = self.example or job_id

    def emit(self) -> None:
        if not self.reasons or time.monotonic() - self.logged_at < LOG_EVERY:
            return
        self.logged_at = time.monotonic()
        total = sum(self.reasons.values())
        detail = "; ".join(f"{n} {reason}" for reason, n in sorted(self.reasons.items()))
        logger.log(
            self.level,
            "%d %s: %s",
            total,
            self.what,
            detail,
            extra={"batches": total, "reasons": dict(self.reasons), "example_job_id": self.example},
        )
        self.reasons, self.example = {}, ""


@dataclass(slots=True)
class InFlight:
    """A batch on the queue, not yet known to be committed: what a resend needs, not its data."""

    job_id: str
    receipt: Receipt  # its entities' keys (the buffer resends their current state)
    touches: list[Touch]
    chunks: list[Chunk]  # scrollback is appended, not state: kept whole for a resend
    min_seq: int
    sent_at: float


class InFlightTracker:
    """The in-flight set and the being-sent mark of one producer, under one state lock.

    The flusher thread moves batches in and out; ``settled`` and the gauges may be read from
    any thread. ``counters`` is the producer's own dict: settling counts into it.
    """

    def __init__(self, buffer: Buffer, counters: dict[str, int], *, job_lease: float) -> None:
        self.buffer = buffer
        self.counters = counters
        self.job_lease = job_lease
        self._jobs: OrderedDict[str, InFlight] = OrderedDict()
        self._sending_min_seq: int | None = None
        self._state = threading.Lock()
        self._resync_log = Summary("batches sent again", logging.INFO)
        self._refusal_log = Summary("batches refused by the workers (not sent again)", logging.WARNING)

    # --- the flush-ordering invariant -----------------------------------------------------------

    def settled(self, target: int) -> bool:
        """Whether every write up to sequence number ``target`` is in a committed batch."""
        with self._state:
            if self._sending_min_seq is not None and self._sending_min_seq <= target:
                return False
            if any(job.min_seq <= target for job in self._jobs.values()):
                return False
            unsent = self.buffer.min_unsent_seq()
        return unsent is None or unsent > target

    def begin_send(self) -> None:
        """Before a drain: from now on something may be in transit, and ``flush()`` waits for it."""
        with self._state:
            self._sending_min_seq = 0

    def sending(self, min_seq: int | None) -> None:
        """The drain is made: what is in transit is no older than its oldest write."""
        with self._state:
            self._sending_min_seq = min_seq

    def end_send(self) -> None:
        """The drained writes are in flight (``add``) or dirty again: nothing is in transit."""
        with self._state:
            self._sending_min_seq = None

    def add(self, batches: list[EncodedBatch], receipts: list[Receipt]) -> None:
        """These batches are on the queue (called before ``end_send``)."""
        with self._state:
            sent_at = time.monotonic()
            for batch, receipt in zip(batches, receipts, strict=True):
                self._jobs[batch.id] = InFlight(
                    batch.id, receipt, batch.touches, batch.chunks, batch.min_seq, sent_at
                )

    def _forget(self, job: InFlight) -> None:
        with self._state:
            self._jobs.pop(job.job_id, None)

    # --- gauges -----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._jobs)

    def has_room(self, limit: int) -> bool:
        with self._state:
            return len(self._jobs) < limit

    def oldest(self, limit: int) -> list[InFlight]:
        """The ``limit`` batches sent longest ago (what one poll reads)."""
        with self._state:
            return list(self._jobs.values())[:limit]

    def gauges(self) -> tuple[int, bool, float | None]:
        """Batches in flight, whether a drain is in transit, and when the oldest batch was sent."""
        with self._state:
            oldest = next(iter(self._jobs.values()), None)
            sending = self._sending_min_seq is not None
            return len(self._jobs), sending, None if oldest is None else oldest.sent_at

    # --- settling ---------------------------------------------------------------------------------

    def settle(self, job: InFlight, status: str | None, heartbeat: bytes | None, meta: bytes | None) -> None:
        """Judge one batch by its job hash's ``status``, ``last_heartbeat`` and ``meta``."""
        if status == JobStatus.FINISHED.value:
            self._forget(job)
            if job.receipt.deletes:
                self.buffer.confirm_deletes(job.receipt.deletes)
            self.counters["committed_jobs"] += 1
            return
        if status in LIVE_STATUSES:
            if status == "started" and heartbeat and self._abandoned(heartbeat):
                # the worker stopped heart-beating: do not rest on RQ's registry maintenance alone
                self.counters["abandoned_jobs"] += 1
                self.buffer.redirty_receipt(job.receipt, job.touches, job.chunks)
                self._forget(job)  # after: see the module's docstring
                self._resync_log.note("abandoned by its worker", job.job_id)
            return
        refused = wire.refusal(meta)
        if refused is not None:
            # the workers refused what this producer sent: sending it again cannot help
            self._forget(job)
            self.counters["refused_jobs"] += 1
            self._refusal_log.note(refused, job.job_id)
            return
        if status is None:
            # Redis lost it (restarted without persistence, or flushed): nothing says it ran
            self.counters["vanished_jobs"] += 1
        else:
            self.counters["failed_jobs"] += 1
        self.buffer.redirty_receipt(job.receipt, job.touches, job.chunks)
        self._forget(job)  # after its writes are dirty again: see the module's docstring
        self._resync_log.note("vanished from Redis" if status is None else f"ended {status}", job.job_id)

    def emit_logs(self) -> None:
        """The summary lines of what the last polls settled, if one is due."""
        self._resync_log.emit()
        self._refusal_log.emit()

    def _abandoned(self, heartbeat: bytes) -> bool:
        try:
            beat = datetime.fromisoformat(heartbeat.decode().replace("Z", "+00:00"))
        except ValueError:
            return False
        if beat.tzinfo is None:
            beat = beat.replace(tzinfo=UTC)
        return (datetime.now(UTC) - beat).total_seconds() > 3 * self.job_lease
