"""Case 5: restoring one session (tabs, panes and scrollback) through the API, as a restarted terminal does.

The session is written through the producer and committed by a worker first.
Each run reads it back with the manager's whole-session read
(``restore_session_tree``, with the scrollback, through
``perth_pipeline.snapshot.session_document``, as ``perth-pipeline restore`` does),
and the first run is checked against what was written.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from perth_pipeline import PaneHistoryChunk, PersistenceManager
from perth_pipeline.settings import Settings
from perth_pipeline.snapshot import session_document

from .backends import WorkerPool, drop_queue, settings_for, truncate, unique_queue
from .stats import percentiles
from .workload import Tree

__all__ = ["run_restore"]


def run_restore(
    base: Settings, tree: Tree, history: list[PaneHistoryChunk], runs: int, log_dir: Path
) -> dict[str, Any]:
    database_url = base.database_url or ""
    truncate(database_url)
    settings = settings_for(base, unique_queue("restore"))
    session = tree.sessions[0]
    expected: dict[str, bytes] = {}
    for chunk in history:
        expected[str(chunk.pane_id)] = expected.get(str(chunk.pane_id), b"") + chunk.content
    samples: list[float] = []
    try:
        with WorkerPool(settings, 1, log_dir=log_dir):
            manager = PersistenceManager(settings=settings)
            try:
                manager.create_session(session)
                for t in tree.tabs:
                    manager.create_tab(t)
                for p in tree.panes:
                    manager.create_pane(p)
                for chunk in history:
                    manager.append_pane_history(chunk)
                if not manager.flush(timeout=120.0):
                    raise RuntimeError("restore: the session was not committed")
            finally:
                manager.close(timeout=5.0)
        # a terminal that restarts: a new manager, reads only
        reader = PersistenceManager(settings=settings, start=False)
        try:
            for run in range(runs):
                started = time.perf_counter()
                document = session_document(reader, session.id, with_history=True)
                samples.append(time.perf_counter() - started)
                if run == 0:
                    _check(document, tree, expected)
        finally:
            reader.close(timeout=1.0)
    finally:
        drop_queue(settings.redis_url or "", settings.queue)
    return {
        "tabs": len(tree.tabs),
        "panes": len(tree.panes),
        "scrollback_bytes": sum(len(c.content) for c in history),
        "chunks": len(history),
        "ms": percentiles(samples, 0.001),
    }


def _check(document: dict[str, Any], tree: Tree, expected: dict[str, bytes]) -> None:
    panes = [pane for tab in document["tabs"] for pane in tab["panes"]]
    if len(document["tabs"]) != len(tree.tabs) or len(panes) != len(tree.panes):
        raise RuntimeError(f"restore: {len(document['tabs'])} tabs and {len(panes)} panes came back")
    for pane in panes:
        if pane["history"] != expected.get(pane["id"], b""):
            raise RuntimeError(f"restore: the scrollback of pane {pane['id']} differs from what was written")
