"""What a write call accepts, the workers store: one set of limits, measured the same way on both sides.

Each case was accepted by the call and then refused (or dropped) later: the JSON size measured
before escaping, integers Python can hold but not encode, UTC offsets with seconds, timestamps
whose UTC instant no reader can convert back, and versions far ahead of any clock.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

import perth_pipeline.clock as clock_module
from perth_pipeline import InvalidRecord, SessionRecord
from perth_pipeline.clock import HybridClock
from perth_pipeline.records import (
    BATCH_ADAPTER,
    MAX_CLOCK_SKEW_NS,
    MAX_JSON_INT,
    MAX_VERSION,
    PaneRecord,
    json_size,
)
from perth_pipeline.validation import copy_json, verify_session

from ..helpers import make_buffer, pane, session

BUDGET = 1 << 16


def test_json_is_measured_escaped_as_the_worker_measures_it() -> None:
    b = make_buffer(max_json_bytes=BUDGET)
    escapes = {"screen": "\x1b" * (BUDGET // 6)}  # ~11 KB of characters, 64 KB of JSON
    assert json_size(escapes) > BUDGET
    with pytest.raises(InvalidRecord) as refused:
        b.put_pane(pane(uuid.uuid4(), component_state=escapes))
    assert refused.value.field == "component_state"


@pytest.mark.parametrize("over", [0, 1])
def test_the_call_and_the_worker_agree_at_the_limit(over: int) -> None:
    overhead = json_size({"s": ""})
    value: dict[str, Any] = {
        "s": "é\x1b" * ((BUDGET - overhead) // 8) + "a" * ((BUDGET - overhead) % 8 + over)
    }
    assert json_size(value) == BUDGET + over
    if over:
        with pytest.raises(InvalidRecord, match=f"{BUDGET + over} bytes"):
            copy_json(value, "layout_blob", BUDGET)
    else:
        assert copy_json(value, "layout_blob", BUDGET) == value


@pytest.mark.parametrize("number", [10**5000, 2**64, -(2**63) - 1], ids=["10^5000", "2^64", "-2^63-1"])
def test_integers_beyond_64_bits_are_refused_at_the_call(number: int) -> None:
    b = make_buffer()
    for state in ({"n": number}, {"deep": [{"n": number}]}):
        sneaked = pane(uuid.uuid4()).model_copy(update={"component_state": state})  # not validated
        with pytest.raises(InvalidRecord) as refused:
            b.put_pane(sneaked)
        assert refused.value.field == "component_state"
    b.put_pane(pane(uuid.uuid4(), component_state={"n": MAX_JSON_INT, "m": [-(2**63)]}))


ODD_OFFSET = timezone(timedelta(hours=1, seconds=30))
FAR_WEST = timezone(-timedelta(hours=5))


@pytest.mark.parametrize(
    ("when", "why"),
    [
        (datetime(2025, 1, 1, tzinfo=ODD_OFFSET), "whole number of minutes"),
        (datetime(9999, 12, 31, 22, tzinfo=FAR_WEST), "between"),
        (datetime(1, 1, 1, 1, tzinfo=timezone(timedelta(hours=3))), "between"),
    ],
)
def test_timestamps_no_reader_could_read_back_are_refused(when: datetime, why: str) -> None:
    with pytest.raises(ValidationError, match=why):  # building the record (the workers' models too)
        SessionRecord(id=uuid.uuid4(), name="s", created_at=when, last_active=when)
    sneaked = session().model_copy(update={"last_active": when})  # model_copy does not validate
    with pytest.raises(InvalidRecord, match=why) as refused:
        verify_session(sneaked)
    assert refused.value.field == "last_active"
    with pytest.raises(InvalidRecord):
        make_buffer().put_session(sneaked)


def test_the_ends_of_the_range_are_accepted() -> None:
    for when in (datetime(9999, 12, 29, 23, tzinfo=UTC), datetime(1, 1, 3, tzinfo=UTC)):
        verify_session(SessionRecord(id=uuid.uuid4(), name="s", created_at=when, last_active=when))


def _pane_batch(version: int) -> dict[str, Any]:
    record = pane(uuid.uuid4())
    return {
        "format": 2,
        "id": str(uuid.uuid4()),
        "origin": "p-test",
        "created_at": datetime.now(UTC).isoformat(),
        "ops": [
            {
                "op": "pane.upsert",
                "version": version,
                "session_id": str(uuid.uuid4()),
                "record": PaneRecord.model_dump(record, mode="json"),
            }
        ],
    }


def test_the_workers_refuse_versions_far_ahead_of_their_clock() -> None:
    BATCH_ADAPTER.validate_python(_pane_batch(clock_module.time.time_ns()))
    with pytest.raises(ValidationError) as refused:
        BATCH_ADAPTER.validate_python(_pane_batch(clock_module.time.time_ns() + MAX_CLOCK_SKEW_NS + 10**12))
    (error,) = refused.value.errors()
    assert error["loc"][:3] == ("ops", 0, "pane.upsert") and error["loc"][-1] == "version"


def test_a_poisoned_stored_version_is_not_adopted() -> None:
    clock = HybridClock()
    clock.observe(MAX_VERSION)
    first = clock.next()
    assert first < clock_module.time.time_ns() + MAX_CLOCK_SKEW_NS
    clock.observe(first + 10**9)  # a version a second ahead (another host's clock): adopted
    assert clock.next() == first + 10**9 + 1


def test_a_clock_past_2262_still_issues_storable_increasing_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = HybridClock()
    before = clock.next()
    monkeypatch.setattr(clock_module, "_time_ns", lambda: 2**63 + 10**15)
    versions = [clock.next() for _ in range(1000)]
    assert versions == sorted(set(versions)) and versions[0] > before
    assert versions[-1] <= MAX_VERSION
