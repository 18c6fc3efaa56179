"""docs/protocol.md against the code: every operation and every field, the script's keys and arguments.

The page is what a producer in another language is written from: an operation or a field added to
the models, or an argument added to the enqueue script, must be added there too.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path

from pydantic import BaseModel

from perth_pipeline import wire
from perth_pipeline.operations import Operation
from perth_pipeline.protocol import enqueue_script

DOC = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text(encoding="utf-8")


def _operation_models() -> list[type[BaseModel]]:
    union = typing.get_args(Operation)[0]
    return list(typing.get_args(union))


def _row(op: str) -> str:
    rows = [line for line in DOC.splitlines() if line.startswith(f"| `{op}` |")]
    assert len(rows) == 1, f"docs/protocol.md has no row (or several) for {op}"
    return rows[0]


def test_every_operation_and_each_of_its_fields_is_in_the_table() -> None:
    models = _operation_models()
    assert sorted(m.model_fields["op"].default for m in models) == sorted(wire.OP_NAMES)
    for model in models:
        row = _row(model.model_fields["op"].default)
        for name, field in model.model_fields.items():
            if name in ("op", "version"):
                continue
            assert f"`{name}`" in row, f"{model.__name__}.{name} is not in docs/protocol.md"
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                for inner in field.annotation.model_fields:
                    assert f"`{inner}`" in row, f"{model.__name__}.{name}.{inner} is not in docs/protocol.md"


def test_the_scripts_keys_and_arguments_are_the_ones_the_page_lists() -> None:
    script = enqueue_script()
    in_script = set(re.findall(r"ARGV\[(\d+)\]", script))
    in_doc = set(re.findall(r"^\| `ARGV\[(\d+)\]` \|", DOC, flags=re.MULTILINE))
    assert in_script == in_doc == {str(n) for n in range(1, 9)}
    assert "#ARGV ~= 8" in script
    for key in ("KEYS[1]", "KEYS[2]", "KEYS[3]", "KEYS[4..n]"):
        assert f"| `{key}` |" in DOC and key in script
    # the job hash fields the page lists are those the script writes
    hset = script[script.index("redis.call('HSET'") : script.index("redis.call('SADD'")]
    written = set(re.findall(r"^\s+'(\w+)', ", hset, flags=re.MULTILINE))
    block = DOC[DOC.index("HSET   rq:job:<id>") : DOC.index("SADD   rq:queues")]
    assert len(written) == 19  # RQ 2.12's fields of such a job (tests/integration/test_enqueue_script.py)
    assert written == set(re.findall(r"(\w+) (?:<|\"\"|queued)", block))
