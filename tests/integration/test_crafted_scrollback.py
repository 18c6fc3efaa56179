"""Crafted scrollback: a chunk must inflate to exactly its raw_size, and a bad stored one is only a gap."""

from __future__ import annotations

import base64
import logging
import re
import uuid
from typing import Any

import psycopg
import pytest
import zstandard
from pydantic import ValidationError

from perth_pipeline import PaneHistoryChunk, PersistenceManager
from perth_pipeline.operations import HistoryAppend, inflate_chunk
from perth_pipeline.settings import Settings

from ..helpers import pane, session, settle, tab

BOMB = zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 << 20))  # ~2 KB that declares 64 MiB


def append(content: bytes, encoding: str, raw_size: int) -> dict[str, Any]:
    return {
        "op": "history.append",
        "version": 1,
        "pane_id": str(uuid.uuid4()),
        "tab_id": str(uuid.uuid4()),
        "session_id": str(uuid.uuid4()),
        "chunk_index": 0,
        "encoding": encoding,
        "raw_size": raw_size,
        "content": base64.b64encode(content).decode(),
    }


@pytest.mark.parametrize(
    ("content", "encoding", "raw_size", "why"),
    [
        (BOMB, "zstd", 100, "inflates to 101+ bytes"),
        (zstandard.ZstdCompressor().compress(b"hello"), "zstd", 9, "inflates to 5 bytes"),
        (b"\x28\xb5\x2f\xfd garbage", "zstd", 5, "not a valid zstd frame"),
        (b"hello", "identity", 6, "holds 5 bytes"),
    ],
)
def test_the_workers_models_refuse_a_chunk_that_does_not_inflate_to_its_size(
    content: bytes, encoding: str, raw_size: int, why: str
) -> None:
    assert len(BOMB) < 64 << 10
    with pytest.raises(ValidationError, match=re.escape(why)):
        HistoryAppend.model_validate(append(content, encoding, raw_size))


def test_a_good_chunk_passes_and_inflates_no_further_than_its_size() -> None:
    data = b"$ ls\r\n" * 100
    op = HistoryAppend.model_validate(append(zstandard.ZstdCompressor().compress(data), "zstd", len(data)))
    assert inflate_chunk(op.content, op.encoding, op.raw_size) == data


def test_a_corrupt_stored_chunk_is_a_gap_not_a_session_that_cannot_be_restored(
    settings: Settings, pg: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    s = session("with a bad chunk")
    t = tab(s.id)
    p = pane(t.id)
    with PersistenceManager(settings=settings) as m:
        m.create_session(s)
        m.create_tab(t)
        m.create_pane(p)
        for i in range(3):
            m.append_pane_history(
                PaneHistoryChunk(pane_id=p.id, chunk_index=i, content=f"line {i}\n".encode())
            )
        settle(m, settings)
        # altered where it is stored (or stored before the workers checked)
        pg.execute(
            "UPDATE pane_history SET content = %s, encoding = 'zstd', raw_size = 100 "
            "WHERE pane_id = %s AND chunk_index = 1",
            (BOMB, p.id),
        )
        with caplog.at_level(logging.WARNING, logger="perth_pipeline.store"):
            tree = m.restore_session_tree(s.id)
            alone = m.restore_pane_history(p.id)
    assert tree.history[p.id] == alone == b"line 0\nline 2\n"
    assert "unreadable" in caplog.text
