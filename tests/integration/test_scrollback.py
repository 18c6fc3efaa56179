"""Scrollback: exact bytes back in chunk_index order, zstd on the wire and in BYTEA, retention, limits."""

from __future__ import annotations

import random
import uuid
from typing import Any

import psycopg
import pytest
from pydantic import ValidationError

from perth_pipeline import InvalidRecord, PaneHistoryChunk, PersistenceManager
from perth_pipeline.limits import MAX_CHUNK_BYTES
from perth_pipeline.settings import Settings

from ..helpers import pane, session, settle, tab


@pytest.fixture
def tree(settings: Settings) -> dict[str, Any]:
    """A stored session with one tab and two panes (scrollback goes under them)."""
    s = session("scroll")
    t = tab(s.id)
    panes = [pane(t.id, 1), pane(t.id, 2)]
    with PersistenceManager(settings=settings) as manager:
        manager.create_session(s)
        manager.create_tab(t)
        for p in panes:
            manager.create_pane(p)
        settle(manager, settings)
    return {"session": s, "tab": t, "panes": panes}


def _append(manager: PersistenceManager, pane_id: uuid.UUID, chunks: dict[int, bytes]) -> None:
    for index, content in chunks.items():
        manager.append_pane_history(PaneHistoryChunk(pane_id=pane_id, chunk_index=index, content=content))


def test_random_bytes_come_back_exactly_with_empty_and_large_chunks(
    settings: Settings, tree: dict[str, Any], pg: psycopg.Connection[Any]
) -> None:
    rng = random.Random(6)
    sizes = [0, 1, 127, 128, 4096, 0, settings.max_chunk_bytes, 33_333]
    chunks = {i: rng.randbytes(n) for i, n in enumerate(sizes)}
    # a large, very compressible chunk (a terminal's repeated prompt) and random NUL-heavy bytes
    chunks[len(chunks)] = b"\x1b[32m$\x1b[0m make test\r\n" * 8000
    chunks[len(chunks)] = bytes(rng.choice(b"\x00\xff\n") for _ in range(10_000))
    pane_id = tree["panes"][0].id
    with PersistenceManager(settings=settings) as manager:
        _append(manager, pane_id, chunks)
        settle(manager, settings)
        restored = manager.restore_pane_history(pane_id)
    assert restored == b"".join(chunks[i] for i in sorted(chunks))
    rows = pg.execute(
        "SELECT chunk_index, encoding, raw_size, length(content) FROM pane_history "
        "WHERE pane_id = %s ORDER BY chunk_index",
        (pane_id,),
    ).fetchall()
    assert [(r[0], r[2]) for r in rows] == [(i, len(chunks[i])) for i in sorted(chunks)]
    by_index = {r[0]: (r[1], r[3]) for r in rows}
    compressible = len(sizes)
    assert by_index[compressible][0] == "zstd"  # compressed by the producer, stored as sent
    assert by_index[compressible][1] < len(chunks[compressible]) // 20
    assert by_index[4][0] == "identity"  # random bytes do not compress: sent as they are
    assert by_index[0] == ("identity", 0)


def test_out_of_order_chunk_indexes_and_gaps_restore_in_index_order(
    settings: Settings, tree: dict[str, Any]
) -> None:
    pane_id = tree["panes"][1].id
    chunks = {7: b"seven\n", 3: b"three\n", 0: b"zero\n", 12: b"twelve\n", 5: b"five\n"}
    with PersistenceManager(settings=settings) as manager:
        _append(manager, pane_id, {7: chunks[7], 3: chunks[3]})
        settle(manager, settings)  # two batches: the later one carries lower indexes
        _append(manager, pane_id, {0: chunks[0], 12: chunks[12], 5: chunks[5]})
        settle(manager, settings)
        assert manager.restore_pane_history(pane_id) == b"zero\nthree\nfive\nseven\ntwelve\n"
        # the other pane's scrollback is its own
        assert manager.restore_pane_history(tree["panes"][0].id) == b""
        # a chunk written again at the same index replaces the earlier one (the later write wins)
        _append(manager, pane_id, {3: b"THREE\n"})
        settle(manager, settings)
        assert manager.restore_pane_history(pane_id) == b"zero\nTHREE\nfive\nseven\ntwelve\n"


def test_retention_keeps_the_newest_bytes_of_each_pane(
    redis_url: str, database_url: str, tree: dict[str, Any], pg: psycopg.Connection[Any]
) -> None:
    from ..helpers import test_settings

    settings = test_settings(redis_url, database_url, history_retention_bytes=1000)
    first, second = (p.id for p in tree["panes"])
    chunks = {i: bytes([65 + i]) * 300 for i in range(10)}  # 3000 bytes in chunks of 300
    with PersistenceManager(settings=settings) as manager:
        _append(manager, first, dict(list(chunks.items())[:5]))
        settle(manager, settings)
        _append(manager, first, dict(list(chunks.items())[5:]))
        _append(manager, second, {0: b"short"})
        settle(manager, settings)
        kept = manager.restore_pane_history(first)
        # the newest chunks that hold at least the last 1000 bytes: 6, 7, 8, 9 (1200 bytes)
        assert kept == b"".join(chunks[i] for i in (6, 7, 8, 9))
        assert kept.endswith(b"".join(chunks.values())[-1000:])
        assert manager.restore_pane_history(second) == b"short"  # each pane has its own budget
        # a newest chunk larger than the whole budget is kept, alone: the pane never loses its last output
        _append(manager, second, {1: b"x" * 1500})
        settle(manager, settings)
        assert manager.restore_pane_history(second) == b"x" * 1500
    indexes = pg.execute(
        "SELECT array_agg(chunk_index ORDER BY chunk_index) FROM pane_history WHERE pane_id = %s", (first,)
    ).fetchone()
    assert indexes == ([6, 7, 8, 9],)


def test_an_oversize_chunk_is_refused_in_the_callers_thread(settings: Settings) -> None:
    with PersistenceManager(settings=settings, start=False) as manager:
        too_big = PaneHistoryChunk(
            pane_id=uuid.uuid4(), chunk_index=0, content=b"x" * (settings.max_chunk_bytes + 1)
        )
        with pytest.raises(InvalidRecord) as info:
            manager.append_pane_history(too_big)
        assert info.value.field == "content"
        assert isinstance(info.value, ValueError)
        assert manager.stats()["pending_history_chunks"] == 0
        # exactly at the limit is accepted
        manager.append_pane_history(
            PaneHistoryChunk(pane_id=uuid.uuid4(), chunk_index=0, content=b"x" * settings.max_chunk_bytes)
        )
        assert manager.stats()["pending_history_chunks"] == 1
    # past the wire format's hard limit the record itself cannot be built
    with pytest.raises(ValidationError):
        PaneHistoryChunk(pane_id=uuid.uuid4(), chunk_index=0, content=b"x" * (MAX_CHUNK_BYTES + 1))
    with pytest.raises(ValidationError):
        PaneHistoryChunk(pane_id=uuid.uuid4(), chunk_index=-1, content=b"")
