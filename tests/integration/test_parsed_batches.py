"""A producer's batch through a real worker: read by the worker's JobSerializer, validated whole.

The job data a PersistenceManager enqueues must take the fast path of ``workers.serializer``
(decoded by msgspec in ``workers.decoder``, JSON fields copied as the text that came) inside a
real ``PerthWorker``, and the rows must hold exactly what was written. (A batch with an invalid
operation takes RQ's JSON path in the same worker: tests/integration/test_poison.py,
test_an_invalid_operation_is_refused_and_its_valid_neighbours_applied.)
"""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest

from perth_pipeline import PersistenceManager, TemplateRecord
from perth_pipeline.settings import Settings
from workers import serializer
from workers.decoder import DecodedBatch
from workers.serializer import ParsedBatch

from ..helpers import pane, session, settle, tab

TRICKY: dict[str, Any] = {
    "text": 'café "☕" \\ \n\t\u2028 \U0001f600',
    "nested": {"list": [1, 2.5, None, True, 10**15], "empty": {}},
}


def test_a_producers_batch_is_applied_through_the_parsed_path(
    settings: Settings, pg: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed: list[ParsedBatch | None] = []
    real = serializer.parse_apply_batch

    def spy(data: bytes) -> ParsedBatch | None:
        result = real(data)
        parsed.append(result)
        return result

    monkeypatch.setattr(serializer, "parse_apply_batch", spy)
    s = session()
    t = tab(s.id, layout_blob={"layout": TRICKY})
    panes = [pane(t.id, n, component_state={"n": n, "state": TRICKY}) for n in range(3)]
    template = TemplateRecord(id=uuid.uuid4(), name=f"dev-{uuid.uuid4().hex[:6]}", definition={"d": TRICKY})
    with PersistenceManager(settings=settings) as manager:
        manager.create_session(s)
        manager.create_tab(t)
        for p in panes:
            manager.create_pane(p)
        manager.save_template(template)
        settle(manager, settings)  # burst PerthWorkers until flush() says committed

    # only JobSerializer.loads calls parse_apply_batch: the burst PerthWorkers read the jobs with it
    batches = [p for p in parsed if p is not None]
    assert batches, "no job took the parsed path"
    assert None not in parsed  # every job the worker read was a whole, valid batch
    assert all(isinstance(b.batch, DecodedBatch) for b in batches)  # msgspec took each of them
    sent = {type(op).__struct_config__.tag for b in batches for op in b.batch.ops}
    assert sent == {"session.upsert", "tab.upsert", "pane.upsert", "template.upsert"}
    assert pg.execute("SELECT layout_blob FROM tabs WHERE id = %s", (t.id,)).fetchone() == (t.layout_blob,)
    stored = dict(pg.execute("SELECT id, component_state FROM panes WHERE tab_id = %s", (t.id,)).fetchall())
    assert stored == {p.id: p.component_state for p in panes}
    row = pg.execute("SELECT definition FROM templates WHERE name = %s", (template.name,)).fetchone()
    assert row == (template.definition,)
