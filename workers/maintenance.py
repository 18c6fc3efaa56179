"""Maintenance jobs, enqueued by ``perth-pipeline scheduler`` (JSON, allowlisted like ``apply_batch``).

``cleanup`` runs the same retention as ``perth-pipeline cleanup`` on the worker
process's own PostgreSQL connection. Its one argument is a JSON object,
validated here; anything else is refused into the failed registry.
"""

from __future__ import annotations

from typing import Any

import psycopg
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from perth_pipeline.errors import DatabaseUnavailable
from perth_pipeline.masking import masked_logger
from perth_pipeline.retention import MIN_JOB_RETENTION, run_cleanup

from .context import current_context
from .refusal import refuse

__all__ = ["CleanupOptions", "cleanup"]

logger = masked_logger("workers.maintenance")

#: Sessions listed in the job's result (the counts are always complete).
_LISTED = 100


class CleanupOptions(BaseModel):
    """The argument of a cleanup job."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    older_than: float = Field(ge=MIN_JOB_RETENTION)
    #: default: the worker's PERTH_TOMBSTONE_RETENTION
    tombstone_retention: float | None = Field(default=None, ge=MIN_JOB_RETENTION)
    dry_run: bool = False


def cleanup(options: Any) -> dict[str, Any]:
    """Remove old sessions, orphan rows and tombstones; returns the report (JSON)."""
    try:
        opts = CleanupOptions.model_validate(options)
    except ValidationError as exc:
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'options'}: {e['msg']}"
            for e in exc.errors(include_input=False, include_url=False)
        )
        raise refuse(f"invalid cleanup options: {reasons}") from None
    context = current_context()
    retention = opts.tombstone_retention or context.settings.tombstone_retention
    try:
        report = run_cleanup(
            context.connection(),
            older_than=opts.older_than,
            tombstone_retention=retention,
            dry_run=opts.dry_run,
        )
    except (psycopg.OperationalError, DatabaseUnavailable) as exc:
        context.discard_connection()
        context.database_failed(exc)
        raise
    except BaseException:
        context.after_failure()  # never hand the next batch a connection left mid-transaction
        raise
    context.database_ok()
    return report.as_dict(max_sessions=_LISTED)
