"""The workers' job serializer: RQ's JSON, with ``apply_batch`` jobs validated straight from their bytes.

RQ's :class:`~rq.serializers.JSONSerializer` decodes a job's data with ``json.loads``, and the job
then validated the Python objects with the batch models: two passes over every operation, the
first one building dicts and lists only for the second to throw away. Here the job data of an
``apply_batch`` job, ``["workers.jobs.apply_batch", null, [<batch>], {}]``, is parsed and
validated by the same models in one pass of pydantic-core over the bytes, and the job function
is handed the validated :class:`ParsedBatch`.

Before that, :mod:`workers.decoder` tries the job with msgspec (several times faster): it takes
the batches producers write and declines anything it is not sure the models would take, which
then goes on to pydantic as described here.

Anything else, and any batch that does not validate whole (an invalid operation, a batch of the
previous format), is decoded by ``json.loads`` as before: the job function then validates it
operation by operation, applies the valid ones and names the invalid ones. Either way the job is
vetted (``workers.vetting``) before anything of it runs; parsing imports and runs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import Field, TypeAdapter, ValidationError
from rq.serializers import JSONSerializer

from perth_pipeline.limits import JSON_TEXTS
from perth_pipeline.operations import Batch
from perth_pipeline.wire import APPLY_BATCH, ApplyBatchName

from .decoder import DecodedBatch, decode_apply_batch

__all__ = ["JobSerializer", "ParsedBatch", "parse_apply_batch"]

_NAME = APPLY_BATCH.encode()
#: RQ's job data: [function, instance, args, kwargs]; for a batch exactly one argument and no kwargs.
_APPLY_BATCH_JOB: TypeAdapter[Any] = TypeAdapter(
    tuple[
        ApplyBatchName,
        None,
        tuple[Batch],
        Annotated[dict[str, Any], Field(max_length=0)],
    ]
)


@dataclass(frozen=True, slots=True)
class ParsedBatch:
    """A batch validated whole from the job's bytes, with the JSON text of its JSON fields.

    ``batch`` is the models' :class:`Batch`, or a :class:`DecodedBatch` (whose JSON fields hold
    their text already). ``json_texts`` maps ``id()`` of each JSON field's value (a dict held by
    the batch) to the value and the compact JSON the validators produced when they checked its
    size: the applier copies that text instead of encoding the value again.
    """

    batch: Batch | DecodedBatch
    json_texts: dict[int, tuple[Any, str]] = field(default_factory=dict, repr=False)


def parse_apply_batch(data: bytes) -> ParsedBatch | None:
    """The batch of an ``apply_batch`` job's data, validated whole; None if it is not exactly that."""
    if not isinstance(data, bytes) or _NAME not in data[:64]:
        return None
    decoded = decode_apply_batch(data)
    if decoded is not None:
        return ParsedBatch(decoded)
    texts: dict[int, tuple[Any, str]] = {}
    try:
        _, _, (batch,), _ = _APPLY_BATCH_JOB.validate_json(data, context={JSON_TEXTS: texts})
    except (ValidationError, ValueError):
        return None
    return ParsedBatch(batch, texts)


def _default(value: Any) -> Any:
    if isinstance(value, ParsedBatch):  # never expected: RQ saves a job's data as it was read
        if isinstance(value.batch, DecodedBatch):
            return JSONSerializer.loads(value.batch.data)[2][0]  # type: ignore[no-untyped-call]
        return value.batch.model_dump(mode="json")
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


class JobSerializer:
    """JSON only (never pickle), as :class:`rq.serializers.JSONSerializer`; batches validated on load."""

    @staticmethod
    def dumps(obj: Any, /) -> bytes:
        return JSONSerializer.dumps(obj, default=_default)  # type: ignore[no-any-return,no-untyped-call]

    @staticmethod
    def loads(data: bytes, /) -> Any:
        parsed = parse_apply_batch(data)
        if parsed is not None:
            return (APPLY_BATCH, None, [parsed], {})
        return JSONSerializer.loads(data)  # type: ignore[no-untyped-call]
