"""The published wire format: the JSON Schema in the repository matches the models."""

from __future__ import annotations

import json
from importlib import resources

from perth_pipeline.operations import batch_json_schema, upgrade_payload


def test_the_published_json_schema_is_the_one_the_models_export() -> None:
    published = json.loads(resources.files("perth_pipeline").joinpath("batch.schema.json").read_text())
    assert published == batch_json_schema(), (
        "batch.schema.json is stale: python -m perth_pipeline.records > perth_pipeline/batch.schema.json"
    )


def test_a_format_1_batch_is_upgraded_to_the_current_format() -> None:
    old = {
        "format": 1,
        "id": "00000000-0000-4000-8000-000000000001",
        "origin": "rust-perth",
        "created_at": "2026-11-27T00:00:00+00:00",
        "ops": [{"op": "history.append", "version": 1, "content": "aGVsbG8="}],
    }
    new = upgrade_payload(old)
    assert new["format"] == 2
    assert new["ops"][0]["encoding"] == "identity"
    assert new["ops"][0]["raw_size"] == 5
