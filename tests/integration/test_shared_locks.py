"""Shared session locks on a real PostgreSQL: upserts pass a shared holder, deletes wait for it.

Another connection holds a session's advisory lock (the key the applier computes: the first 8
bytes of the session id, signed). The applier runs on a connection with a short
``lock_timeout``, so a batch that has to wait fails with ``LockNotAvailable`` instead of
hanging, and nothing of it is written.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import psycopg
import pytest

from perth_pipeline.locks import lock_key
from perth_pipeline.operations import (
    Batch,
    SessionUpsert,
    TabDelete,
    TabUpsert,
    TemplateDelete,
    TemplateUpsert,
)
from perth_pipeline.records import SessionRecord, TabRecord, TemplateRecord
from perth_pipeline.store import connect
from workers.applier import Applier
from workers.reduction import reduce_batch

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def session_key(session_id: UUID) -> int:
    """The session's advisory-lock key as the applier takes it (``_signed64(id.int >> 64)``)."""
    high = session_id.int >> 64
    return high - (1 << 64) if high >= 1 << 63 else high


def batch(*ops: Any) -> Batch:
    return Batch(id=uuid.uuid4(), origin="lock-test", created_at=T0, ops=list(ops))


def s_up(v: int, s: UUID, name: str = "s") -> SessionUpsert:
    return SessionUpsert(version=v, record=SessionRecord(id=s, name=name, created_at=T0, last_active=T0))


def t_up(v: int, s: UUID, t: UUID, name: str = "t") -> TabUpsert:
    return TabUpsert(version=v, record=TabRecord(id=t, session_id=s, position=0, name=name))


@pytest.fixture
def applier_conn(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    with connect(database_url) as conn:
        conn.execute("SET lock_timeout = '2s'")
        yield conn


@pytest.fixture
def holder(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn
        conn.execute("SELECT pg_advisory_unlock_all()")


def tab_names(pg: psycopg.Connection[Any], s: UUID) -> list[str]:
    return [row[0] for row in pg.execute("SELECT name FROM tabs WHERE session_id = %s ORDER BY name", (s,))]


def test_the_key_is_the_one_the_applier_takes() -> None:
    s = UUID("80000000-0000-0001-ffff-ffffffffffff")
    assert session_key(s) == lock_key(s) == -(1 << 63) + 1
    assert reduce_batch([s_up(1, s)]).lock_keys() == ([session_key(s)], [False])


def test_upserts_pass_a_shared_holder_and_a_delete_waits_for_it(
    pg: psycopg.Connection[Any], applier_conn: psycopg.Connection[Any], holder: psycopg.Connection[Any]
) -> None:
    s, t1, t2 = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    applier = Applier()
    applier.apply(applier_conn, batch(s_up(1, s), t_up(2, s, t1, "first")))
    holder.execute("SELECT pg_advisory_lock_shared(%s)", (session_key(s),))

    # upserts only: the shared lock is shared with the holder
    applier.apply(applier_conn, batch(s_up(3, s, "renamed"), t_up(4, s, t2, "second")))
    assert tab_names(pg, s) == ["first", "second"]
    assert pg.execute("SELECT name FROM sessions WHERE id = %s", (s,)).fetchone() == ("renamed",)

    # a tab delete: exclusive, so it waits for the holder (and gives up after lock_timeout)
    delete = batch(TabDelete(version=5, id=t1, session_id=s), t_up(6, s, t2, "second, again"))
    with pytest.raises(psycopg.errors.LockNotAvailable):
        applier.apply(applier_conn, delete)
    assert tab_names(pg, s) == ["first", "second"]  # nothing of it was written
    assert pg.execute("SELECT count(*) FROM tombstones").fetchone() == (0,)

    # a batch of another session is not held up by this one's lock
    other = uuid.uuid4()
    applier.apply(
        applier_conn, batch(s_up(7, other), TabDelete(version=8, id=uuid.uuid4(), session_id=other))
    )

    holder.execute("SELECT pg_advisory_unlock_shared(%s)", (session_key(s),))
    applier.apply(applier_conn, delete)  # the same connection and applier, once the lock is free
    assert tab_names(pg, s) == ["second, again"]
    assert pg.execute("SELECT kind, version FROM tombstones WHERE id = %s", (t1,)).fetchone() == ("tab", 5)


def test_upserts_do_take_the_lock_they_wait_for_an_exclusive_holder(
    pg: psycopg.Connection[Any], applier_conn: psycopg.Connection[Any], holder: psycopg.Connection[Any]
) -> None:
    s = uuid.uuid4()
    holder.execute("SELECT pg_advisory_lock(%s)", (session_key(s),))  # as a cascade or retention does
    with pytest.raises(psycopg.errors.LockNotAvailable):
        Applier().apply(applier_conn, batch(s_up(1, s), t_up(2, s, uuid.uuid4())))
    assert pg.execute("SELECT count(*) FROM sessions WHERE id = %s", (s,)).fetchone() == (0,)
    holder.execute("SELECT pg_advisory_unlock(%s)", (session_key(s),))
    Applier().apply(applier_conn, batch(s_up(1, s), t_up(2, s, uuid.uuid4())))
    assert pg.execute("SELECT count(*) FROM sessions WHERE id = %s", (s,)).fetchone() == (1,)


def test_a_template_save_passes_a_shared_holder_and_a_template_delete_waits(
    pg: psycopg.Connection[Any], applier_conn: psycopg.Connection[Any], holder: psycopg.Connection[Any]
) -> None:
    name = f"dev-{uuid.uuid4().hex[:8]}"
    save = batch(TemplateUpsert(version=1, record=TemplateRecord(id=uuid.uuid4(), name=name, definition={})))
    delete = batch(TemplateDelete(version=2, name=name))
    holder.execute("SELECT pg_advisory_lock_shared(%s)", (lock_key(name),))
    applier = Applier()
    applier.apply(applier_conn, save)
    assert pg.execute("SELECT count(*) FROM templates WHERE name = %s", (name,)).fetchone() == (1,)
    with pytest.raises(psycopg.errors.LockNotAvailable):
        applier.apply(applier_conn, delete)
    assert pg.execute("SELECT count(*) FROM templates WHERE name = %s", (name,)).fetchone() == (1,)
    holder.execute("SELECT pg_advisory_unlock_shared(%s)", (lock_key(name),))
    applier.apply(applier_conn, delete)
    assert pg.execute("SELECT count(*) FROM templates WHERE name = %s", (name,)).fetchone() == (0,)
