"""perth_pipeline.wire: the names both sides of the queue share agree with the models and the workers."""

from __future__ import annotations

import json
import typing
import zlib

from perth_pipeline import operations, wire
from workers import jobs


def test_every_operation_model_is_named_in_wire_and_every_name_has_a_model() -> None:
    models = typing.get_args(typing.get_args(operations.Operation)[0])
    names = {model.model_fields["op"].default for model in models}
    assert names == set(wire.OP_NAMES) and len(wire.OP_NAMES) == len(models)


def test_the_job_names_on_the_wire_are_the_paths_of_the_functions_workers_run() -> None:
    assert set(jobs.ALLOWED) == set(wire.JOB_FUNCTIONS)
    for name, function in jobs.ALLOWED.items():
        assert f"{function.__module__}.{function.__qualname__}" == name


def test_a_refusal_marked_in_meta_is_read_back_from_the_stored_meta() -> None:
    meta: dict[str, typing.Any] = {"other": 1}
    wire.mark_refused(meta, "x" * 600)
    assert wire.refusal(json.dumps(meta).encode()) == "x" * wire.MAX_REFUSAL_CHARS
    assert wire.refusal(None) is None and wire.refusal(b"not json") is None
    assert wire.refusal(b"[" * 100_000) is None  # nested too deeply: not a refusal
    assert wire.refusal(b'{"other": 1}') is None


def test_job_data_is_inflated_up_to_the_limit_only() -> None:
    plain = wire.apply_batch_data('{"ops":[]}')
    assert wire.inflate_job_data(zlib.compress(plain)) == (plain, None)
    assert wire.inflate_job_data(plain) == (plain, None)  # stored as it is
    assert wire.inflate_job_data(zlib.compress(plain)[:-4]) == (zlib.compress(plain)[:-4], None)
    bomb = zlib.compress(b"\0" * (wire.MAX_JOB_BYTES + 10))
    data, size = wire.inflate_job_data(bomb)
    assert data is None and size is not None and size > wire.MAX_JOB_BYTES
    assert wire.read_apply_batch(bomb) == (None, "its data is over 32 MiB")
    assert wire.read_apply_batch(zlib.compress(plain)) == ({"ops": []}, "")
