"""The wire protocol between producers and workers, in one place.

A producer (:mod:`perth_pipeline.batch`, :mod:`perth_pipeline.requeue`,
:mod:`perth_pipeline.scheduler`) and a worker (:mod:`workers`) agree on a few names and
bytes that no model describes: the names of the job functions on the queue, the names of
the operations, the format versions of a batch, how a batch is framed as RQ job data, how
a worker marks a job it refused, and how much job data anyone inflates. They used to be
spelled out on each side; a change on one side only would have passed every test of that
side. Here they are defined once, and both sides import them.

This module imports nothing of the project, so that anything may import it:
:mod:`perth_pipeline.records` (the pydantic models and limits of the format) takes its op
names and format versions from here. Where a name is also a type (a pydantic ``Literal``),
the type is defined beside the constant and mypy checks that the two agree.

The bytes are those of format 2 (``batch.schema.json``); nothing here may change them.
"""

from __future__ import annotations

import json
import zlib
from json.encoder import encode_basestring
from typing import Any, Final, Literal

__all__ = [
    "APPLY_BATCH",
    "CLEANUP",
    "FORMAT_VERSION",
    "HISTORY_APPEND",
    "IDENTITY",
    "JOB_FUNCTIONS",
    "MAX_JOB_BYTES",
    "MAX_REFUSAL_CHARS",
    "OP_NAMES",
    "PANE_DELETE",
    "PANE_UPSERT",
    "REFUSED",
    "SESSION_DELETE",
    "SESSION_TOUCH",
    "SESSION_UPSERT",
    "SUPPORTED_FORMATS",
    "TAB_DELETE",
    "TAB_UPSERT",
    "TEMPLATE_DELETE",
    "TEMPLATE_UPSERT",
    "ZSTD",
    "apply_batch_data",
    "batch_text",
    "inflate_job_data",
    "mark_refused",
    "read_apply_batch",
    "refusal",
]

# --- job functions: the names a worker allowlists (workers.jobs.ALLOWED) ----------------------

ApplyBatchName = Literal["workers.jobs.apply_batch"]
#: The one job producers send: a batch of operations, applied in one transaction.
APPLY_BATCH: Final[ApplyBatchName] = "workers.jobs.apply_batch"
CleanupName = Literal["workers.maintenance.cleanup"]
#: The periodic retention job that ``perth-pipeline scheduler`` enqueues.
CLEANUP: Final[CleanupName] = "workers.maintenance.cleanup"
JOB_FUNCTIONS: Final = (APPLY_BATCH, CLEANUP)

# --- the batch envelope ------------------------------------------------------------------------

CurrentFormat = Literal[2]
#: The batch format this version writes. Workers accept it and the one before.
FORMAT_VERSION: Final[CurrentFormat] = 2
SUPPORTED_FORMATS: Final = (1, 2)

# --- operations (the ``op`` field of each operation of a batch) --------------------------------

SessionUpsertName = Literal["session.upsert"]
SESSION_UPSERT: Final[SessionUpsertName] = "session.upsert"
SessionDeleteName = Literal["session.delete"]
SESSION_DELETE: Final[SessionDeleteName] = "session.delete"
SessionTouchName = Literal["session.touch"]
SESSION_TOUCH: Final[SessionTouchName] = "session.touch"
TabUpsertName = Literal["tab.upsert"]
TAB_UPSERT: Final[TabUpsertName] = "tab.upsert"
TabDeleteName = Literal["tab.delete"]
TAB_DELETE: Final[TabDeleteName] = "tab.delete"
PaneUpsertName = Literal["pane.upsert"]
PANE_UPSERT: Final[PaneUpsertName] = "pane.upsert"
PaneDeleteName = Literal["pane.delete"]
PANE_DELETE: Final[PaneDeleteName] = "pane.delete"
HistoryAppendName = Literal["history.append"]
HISTORY_APPEND: Final[HistoryAppendName] = "history.append"
TemplateUpsertName = Literal["template.upsert"]
TEMPLATE_UPSERT: Final[TemplateUpsertName] = "template.upsert"
TemplateDeleteName = Literal["template.delete"]
TEMPLATE_DELETE: Final[TemplateDeleteName] = "template.delete"
OP_NAMES: Final = (
    SESSION_UPSERT,
    SESSION_DELETE,
    SESSION_TOUCH,
    TAB_UPSERT,
    TAB_DELETE,
    PANE_UPSERT,
    PANE_DELETE,
    HISTORY_APPEND,
    TEMPLATE_UPSERT,
    TEMPLATE_DELETE,
)

#: How a scrollback chunk's ``content`` is encoded (``history.append``'s ``encoding``).
ChunkEncoding = Literal["identity", "zstd"]
IDENTITY: Final[ChunkEncoding] = "identity"
ZSTD: Final[ChunkEncoding] = "zstd"

# --- framing: a batch as RQ job data -----------------------------------------------------------


def batch_text(batch_id: str, origin: str, created_at: str, ops: list[str]) -> str:
    """A batch's JSON, from its operations' JSON texts (``origin`` as it is; it is quoted here)."""
    return (
        f'{{"format":{FORMAT_VERSION},"id":"{batch_id}","origin":{encode_basestring(origin)},'
        f'"created_at":"{created_at}","ops":[{",".join(ops)}]}}'
    )


def apply_batch_data(batch: str) -> bytes:
    """RQ's job data (``[function, instance, args, kwargs]``) of an ``apply_batch`` of ``batch`` (JSON)."""
    return f'["{APPLY_BATCH}",null,[{batch}],{{}}]'.encode()


#: The most job data (decompressed) anyone reads. A batch of this project is far smaller
#: (PERTH_BATCH_MAX_BYTES is at most 16 MiB, plus one operation); bigger data is refused unread.
MAX_JOB_BYTES: Final = 32 << 20


def inflate_job_data(data: bytes, limit: int = MAX_JOB_BYTES) -> tuple[bytes | None, int | None]:
    """``data`` as RQ reads it (decompressed if it is zlib, else as it is), or ``(None, size)``
    with a lower bound of its size when that is over ``limit``: never more than ``limit`` is inflated.

    RQ decompresses job data without a bound: a small zlib bomb would take its reader down.
    """
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


def read_apply_batch(data: bytes | None) -> tuple[dict[str, Any] | None, str]:
    """The batch payload of RQ job data read leniently as JSON (never pickle), or None and why it
    is not one. The payload itself is not validated: a refused batch may be malformed."""
    if not data:
        return None, "the job has no data"
    raw, _ = inflate_job_data(data)
    if raw is None:
        return None, f"its data is over {MAX_JOB_BYTES >> 20} MiB"
    try:
        func, instance, args, kwargs = json.loads(raw)
    except RecursionError:
        return None, "its data is JSON nested too deeply to be a batch"
    except (ValueError, TypeError):
        return None, "its data is not JSON in RQ's job format"
    if func != APPLY_BATCH:
        return None, f"it runs {str(func)[:80]!r}, not {APPLY_BATCH}"
    if instance is not None or kwargs or not isinstance(args, list) or len(args) != 1:
        return None, "its arguments are not one batch"
    payload = args[0]
    if not isinstance(payload, dict) or not isinstance(payload.get("ops"), list):
        return None, "its argument is not a batch"
    return payload, ""


# --- the refusal marker: a worker's word that a job will never apply ----------------------------

#: The key in a job's meta under which a worker puts why it refused the job. Producers do not send
#: the same entities again; ``requeue-failed`` leaves the job alone unless told otherwise.
REFUSED: Final = "perth_refused"
MAX_REFUSAL_CHARS: Final = 500


def mark_refused(meta: dict[str, Any], reason: str) -> None:
    """Mark a job's ``meta`` as refused, with ``reason`` (cut to :data:`MAX_REFUSAL_CHARS`)."""
    meta[REFUSED] = reason[:MAX_REFUSAL_CHARS]


def refusal(meta: bytes | None) -> str | None:
    """Why the workers refused a job, from its stored ``meta`` (JSON), or None if they did not."""
    if not meta:
        return None
    try:
        value = json.loads(meta)
    except (ValueError, RecursionError):
        return None
    reason = value.get(REFUSED) if isinstance(value, dict) else None
    return str(reason) if reason else None
