"""What a write call accepts, the workers store: one set of limits, measured the same way on both sides.

Each case was accepted by the call and then refused (or dropped) later: the JSON size measured
before escaping, integers Python can hold but not encode, UTC offsets with seconds, timestamps
whose UTC instant no reader can convert back, and versions far ahead of any clock.
"""

from __future__ import annotations

import logging
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import ValidationError

import perth_pipeline.clock as clock_module
from perth_pipeline import InvalidRecord, SessionRecord
from perth_pipeline.clock import HybridClock
from perth_pipeline.limits import (
    MAX_CLOCK_SKEW_NS,
    MAX_JSON_BYTES,
    MAX_JSON_INT,
    MAX_VERSION,
    MIN_JSON_INT,
    json_size,
)
from perth_pipeline.operations import BATCH_ADAPTER
from perth_pipeline.records import PaneRecord, TabRecord
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


def _exactly(size: int) -> dict[str, Any]:
    """Many small members (the worst case for a size counted per node): ``size`` bytes of JSON."""
    value: dict[str, Any] = {"pad": "", "rows": [[i % 10, None] for i in range(size // 16)]}
    value["pad"] = "x" * (size - json_size(value))
    assert json_size(value) == size
    return value


@pytest.mark.parametrize("size", [BUDGET, MAX_JSON_BYTES])
def test_what_fits_is_never_refused_by_the_estimate(size: int) -> None:
    at = _exactly(size)
    assert copy_json(at, "component_state", size) == at
    assert PaneRecord.model_validate({**_pane_fields(), "component_state": at}).component_state == at
    over = {**at, "pad": at["pad"] + "x"}
    with pytest.raises(InvalidRecord, match=f"over the limit of {size}"):
        copy_json(over, "component_state", size)
    if size == MAX_JSON_BYTES:
        with pytest.raises(ValidationError, match="component_state"):
            PaneRecord.model_validate({**_pane_fields(), "component_state": over})


def _pane_fields() -> dict[str, Any]:
    return {"id": uuid.uuid4(), "tab_id": uuid.uuid4(), "pane_id": "terminal_1", "pane_type": "terminal"}


# any text the calls accept (no NUL, no lone surrogate): escapes, accents, emoji
_TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=20)
_JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=MIN_JSON_INT, max_value=MAX_JSON_INT)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TEXT
)
_JSON_VALUES = st.recursive(
    _JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(_TEXT, inner, max_size=6),
    max_leaves=25,
)


@hypothesis_settings(max_examples=150, deadline=None)
@given(st.dictionaries(_TEXT, _JSON_VALUES, max_size=20))
def test_the_call_accepts_exactly_what_the_worker_measures(value: dict[str, Any]) -> None:
    size = json_size(value)
    assert copy_json(value, "definition", size) == value
    with pytest.raises(InvalidRecord):
        copy_json(value, "definition", size - 1)


def test_a_backslash_before_u0000_is_text_not_a_nul_character() -> None:
    state = {"path": "C:\\u0000", "\\u0000": "\\\\u0000"}  # backslashes, not NULs
    assert copy_json(state, "component_state", BUDGET) == state
    assert PaneRecord.model_validate({**_pane_fields(), "component_state": state}).component_state == state
    for nul in ({"s": "\x00"}, {"s": "\\\x00"}):
        with pytest.raises(ValidationError, match="NUL"):
            PaneRecord.model_validate({**_pane_fields(), "component_state": nul})


@pytest.mark.parametrize("number", [2**64, -(2**63) - 1, 10**5000], ids=["2^64", "-2^63-1", "10^5000"])
def test_the_workers_refuse_integers_beyond_64_bits(number: int) -> None:
    with pytest.raises(ValidationError, match="integers must lie between") as refused:
        PaneRecord.model_validate({**_pane_fields(), "component_state": {"deep": [{"n": number}]}})
    assert refused.value.errors()[0]["loc"] == ("component_state",)
    if number.bit_length() < 100:  # as a worker reads it: JSON text
        ids = f'"id":"{uuid.uuid4()}","session_id":"{uuid.uuid4()}"'
        text = f'{{{ids},"position":0,"name":"t","layout_blob":{{"n":{number}}}}}'
        with pytest.raises(ValidationError, match="layout_blob"):
            TabRecord.model_validate_json(text)


def test_the_ends_of_the_integer_range_and_long_digit_strings_are_stored() -> None:
    state = {"max": MAX_JSON_INT, "min": MIN_JSON_INT, "id": "1" * 40, "big": [1e300, -(2**62)]}
    assert PaneRecord.model_validate({**_pane_fields(), "component_state": state}).component_state == state
    assert copy_json(state, "component_state", BUDGET) == state


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


def _accepted_by_a_worker(version: int) -> bool:
    try:
        BATCH_ADAPTER.validate_python(_pane_batch(version))
    except ValidationError:
        return False
    return True


def test_a_poisoned_stored_version_is_not_adopted(caplog: pytest.LogCaptureFixture) -> None:
    clock = HybridClock()
    with caplog.at_level(logging.WARNING, logger="perth_pipeline.clock"):
        clock.observe(MAX_VERSION)
        clock.observe(MAX_VERSION - 1)  # the same minute: no second warning
    assert len([r for r in caplog.records if "ignored a stored version" in r.getMessage()]) == 1
    first = clock.next()
    assert first < clock_module.time.time_ns() + MAX_CLOCK_SKEW_NS
    assert _accepted_by_a_worker(first)
    clock.observe(first + 10**9)  # a version a second ahead (another host's clock): adopted
    assert clock.next() == first + 10**9 + 1


def test_what_a_producer_issues_after_adopting_a_version_a_worker_behind_it_still_accepts() -> None:
    clock = HybridClock()
    now = time.time_ns()
    clock.observe(now + MAX_CLOCK_SKEW_NS - 3600 * 10**9)  # a row 23 hours ahead of this host
    version = clock.next()
    worker_clock = now - 3600 * 10**9  # a worker an hour behind this host
    assert version <= worker_clock + MAX_CLOCK_SKEW_NS  # the workers' rule (limits.Version)


def test_a_clock_past_2262_still_issues_storable_increasing_versions(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = HybridClock()
    before = clock.next()
    monkeypatch.setattr(clock_module, "_time_ns", lambda: 2**63 + 10**15)
    with caplog.at_level(logging.ERROR, logger="perth_pipeline.clock"):
        versions = [clock.next() for _ in range(1000)]
    assert versions == sorted(set(versions)) and versions[0] > before
    assert versions[-1] <= MAX_VERSION
    # logical increments from the last version: still within the workers' bound, so still stored
    assert _accepted_by_a_worker(versions[0]) and _accepted_by_a_worker(versions[-1])
    assert len([r for r in caplog.records if "past 2262" in r.getMessage()]) == 1


def test_near_2262_a_stored_version_at_the_ceiling_never_makes_versions_overflow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = HybridClock()
    monkeypatch.setattr(clock_module, "_time_ns", lambda: MAX_VERSION - 2**40 - 1)
    clock.observe(MAX_VERSION)
    versions = [clock.next() for _ in range(100)]
    assert versions == sorted(set(versions)) and versions[-1] <= MAX_VERSION
