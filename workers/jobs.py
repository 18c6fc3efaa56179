"""The job functions that cross the queue. ``apply_batch`` is the one producers send.

A worker runs only the functions in :data:`ALLOWED` (see ``workers.worker``).
Their arguments are JSON, validated here by the same models the producer
used; nothing is ever unpickled.

Failures are of two kinds:

* the database is unreachable, restarting, or a statement timed out or lost a
  deadlock too often (:class:`TransientFailure`): RQ retries the batch with
  growing back-off. A connection found dead at the first statement (the server
  restarted since the last batch) is replaced and the batch tried once more at
  once, so a restart costs no retry;
* the payload is not a valid batch, or the database refuses its content
  (:class:`PoisonBatch`): the batch goes to the failed registry at once with the
  reason, and is not retried. Valid operations of a batch with an invalid
  neighbour are applied first.

Reasons are one line and never quote the user's data: a database error is
reported by its primary message only (its DETAIL and CONTEXT may quote a row).

The refusal (:func:`workers.refusal.refuse`) and the process's context
(:func:`workers.context.current_context`) are shared with ``workers.maintenance``,
which this module imports to allowlist its function: they live below both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import psycopg
import redis
from pydantic import TypeAdapter, ValidationError
from rq import get_current_job

from perth_pipeline.errors import DatabaseUnavailable
from perth_pipeline.limits import MAX_OPS_PER_BATCH
from perth_pipeline.masking import first_line, masked_logger
from perth_pipeline.operations import BATCH_ADAPTER, Batch, BatchEnvelope, Operation, upgrade_payload
from perth_pipeline.wire import APPLY_BATCH, CLEANUP, SUPPORTED_FORMATS

from . import maintenance, metrics
from .applier import AppliedBatch, ApplyResult
from .context import JobContext, bind, current_context
from .refusal import PoisonBatch, refuse
from .serializer import ParsedBatch

__all__ = ["ALLOWED", "PoisonBatch", "TransientFailure", "apply_batch", "bind", "parse_batch"]

logger = masked_logger("workers.jobs")


_OP_ADAPTER: TypeAdapter[Any] = TypeAdapter(Operation)


class TransientFailure(Exception):
    """The batch could not be applied now (database down, restarting, a statement timed out): retried."""


def _reasons(exc: ValidationError, prefix: str = "") -> list[str]:
    # include_input=False: a reason must not carry the user's data (titles, paths, scrollback)
    out = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        out.append(f"{prefix}{loc}: {err['msg']}" if loc else f"{prefix}{err['msg']}")
    return out


_OBJECT_TYPES = frozenset({"model_type", "model_attributes_type", "dict_type"})
_JSON_KINDS = {
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def _op_reasons(exc: ValidationError, index: int, raw: Any) -> list[str]:
    """Why operation ``index`` is invalid: ``ops[<index>].<its kind>.<field>: <what is wrong>``.

    Where pydantic's discriminated union has no field to name (the operation is not an object,
    its ``op`` is missing or unknown), the reason names the operation or its ``op`` field, and,
    as everywhere, never the value (pydantic's message for an unknown tag quotes it).
    """
    out = []
    for err in exc.errors(include_input=False, include_url=False):
        kind = err["type"]
        if kind == "union_tag_invalid":
            out.append(f"ops[{index}].op: not an operation of this format")
        elif kind == "union_tag_not_found":
            out.append(f"ops[{index}].op: Field required")
        elif not err["loc"] and not isinstance(raw, dict):
            found = _JSON_KINDS.get(type(raw), "value")
            out.append(f"ops[{index}]: an operation is a JSON object, not a JSON {found}")
        else:
            loc = ".".join(str(p) for p in err["loc"])
            # "a valid dictionary or instance of TabRecord": pydantic's words, not the wire format's
            msg = "Input should be a JSON object" if kind in _OBJECT_TYPES else err["msg"]
            out.append(f"ops[{index}].{loc}: {msg}" if loc else f"ops[{index}]: {msg}")
    return out


def parse_batch(payload: Any) -> tuple[Batch, list[Any], list[str]]:
    """Validate a payload: (the batch, its valid operations, reasons for the invalid ones).

    Raises :class:`PoisonBatch` when the envelope itself is invalid or no operation is.
    """
    payload = upgrade_payload(payload)
    if not isinstance(payload, dict):
        raise PoisonBatch(f"payload is a JSON {type(payload).__name__}, not a batch object")
    try:
        batch = BATCH_ADAPTER.validate_python(payload)
        return batch, list(batch.ops), []
    except ValidationError:
        pass
    try:
        envelope = BatchEnvelope.model_validate(payload)
    except ValidationError as exc:
        raise PoisonBatch("invalid batch envelope: " + "; ".join(_reasons(exc)[:5])) from None
    if envelope.format not in SUPPORTED_FORMATS:
        raise PoisonBatch(f"batch format {envelope.format} is not supported (supported: {SUPPORTED_FORMATS})")
    if not envelope.ops or len(envelope.ops) > MAX_OPS_PER_BATCH:
        raise PoisonBatch(f"a batch holds 1 to {MAX_OPS_PER_BATCH} operations, not {len(envelope.ops)}")
    valid: list[Any] = []
    rejected: list[str] = []
    for index, raw in enumerate(envelope.ops):
        try:
            valid.append(_OP_ADAPTER.validate_python(raw))
        except ValidationError as exc:
            rejected.extend(_op_reasons(exc, index, raw))
    if not valid:
        # (before the envelope is validated with its operations: with none, that would only say
        # that ops[0] is not an operation, not what is wrong with it)
        raise PoisonBatch(f"none of the {len(envelope.ops)} operations is valid: " + "; ".join(rejected[:5]))
    try:
        batch = BATCH_ADAPTER.validate_python({**payload, "ops": valid})
    except ValidationError as exc:
        raise PoisonBatch("invalid batch envelope: " + "; ".join(_reasons(exc)[:5])) from None
    return batch, valid, rejected


def apply_batch(payload: Any) -> dict[str, Any]:
    """Apply one batch in one transaction. The only job producers send.

    ``payload`` is the batch as JSON, or (from a worker's :class:`JobSerializer`) a batch that
    was validated whole while its job data was read.
    """
    json_texts: dict[int, tuple[Any, str]] | None = None
    batch: AppliedBatch
    if isinstance(payload, ParsedBatch):
        batch, ops, json_texts = payload.batch, payload.batch.ops, payload.json_texts
        rejected: list[str] = []
    else:
        try:
            batch, ops, rejected = parse_batch(payload)
        except PoisonBatch as exc:
            raise refuse(str(exc)) from None
    context = current_context()
    result = _apply(context, batch, ops, json_texts)
    context.database_ok()
    _settle_outstanding(context, batch)
    metrics.record_batch(result)
    logger.info(
        "applied batch %s: %d ops, %d sessions, %d rows in %.1f ms",
        batch.id,
        result.ops,
        result.sessions,
        result.rows_written,
        result.ms,
        extra={"batch_id": str(batch.id), **result.as_dict()},
    )
    if rejected:
        raise refuse(
            f"{len(rejected)} invalid operation field(s) refused (the {len(ops)} valid operations "
            f"were applied): " + "; ".join(rejected[:10])
        )
    return result.as_dict()


def _apply(
    context: JobContext,
    batch: AppliedBatch,
    ops: Sequence[Any],
    json_texts: dict[int, tuple[Any, str]] | None,
) -> ApplyResult:
    """Apply on the process's connection; classify what went wrong (see the module's docstring)."""
    for attempt in (1, 2):
        try:
            return context.applier.apply(context.connection(), batch, ops, json_texts=json_texts)
        except DatabaseUnavailable as exc:  # could not (re)connect
            context.database_failed(exc)
            raise TransientFailure(str(exc)) from None
        except (psycopg.DataError, psycopg.IntegrityError) as exc:
            context.after_failure()
            raise refuse(f"the database refused the batch: {_describe(exc)}") from None
        except psycopg.Error as exc:
            lost = context.connection_lost()
            context.after_failure()
            if not lost:  # a statement timeout, a deadlock lost too often, a read-only server...
                raise TransientFailure(_describe(exc)) from None
            if attempt == 1:
                continue  # most often a connection that died idle (a server restart): once more, fresh
            context.database_failed(exc)
            raise TransientFailure(f"PostgreSQL unavailable: {_describe(exc)}") from None
        except BaseException:
            context.after_failure()  # a job timeout or a cold shutdown mid-statement: never reuse it
            raise
    raise AssertionError("unreachable")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {first_line(exc)}"


def _settle_outstanding(context: JobContext, batch: AppliedBatch) -> None:
    """The batch is committed: reads of its sessions no longer wait for it."""
    job = get_current_job()
    job_id = job.id if job is not None else str(batch.id)
    try:
        with context.redis.pipeline(transaction=False) as pipe:
            for session_id in batch.session_ids():
                pipe.zrem(context.keys.outstanding(session_id), job_id)
            pipe.execute()
    except redis.RedisError:
        pass  # readers skip batches that are no longer queued or started anyway


#: The job functions a worker runs, by the name producers put on the queue.
ALLOWED: dict[str, Callable[..., Any]] = {
    APPLY_BATCH: apply_batch,
    CLEANUP: maintenance.cleanup,
}
