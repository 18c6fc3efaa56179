"""Microbenchmark of the encoder of operations (issue 15): before (f-strings) against now (msgspec).

    PYTHONPATH=. python -m tests.bench_op_json [--ops 100000] [--repeat 5]

"Before" is ``perth_pipeline/batch.py`` as of commit ``BEFORE`` (read with ``git show``), the
encoder of every operation until msgspec; "now" is :mod:`perth_pipeline.opjson`. Both run in one
process, alternately, over the same drained items built from ``bench.workload.build_tree``'s
records (snapshots copied as the write calls copy them). CPU time (``time.process_time``) per
operation, the median of ``--repeat`` runs. Each pair is checked byte for byte first.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import time
import types
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import zstandard

from perth_pipeline import opjson
from perth_pipeline.bench.workload import build_tree, scrollback
from perth_pipeline.buffer import PANE, SESSION, TAB, Item, Touch
from perth_pipeline.scrollback import Chunk
from perth_pipeline.validation import copy_json

BEFORE = "0824f84"
ROOT = Path(__file__).resolve().parents[1]
VERSION = 1_732_000_000_000_000_000


def load_before() -> Any:
    show = ["git", "show", f"{BEFORE}:perth_pipeline/batch.py"]
    source = subprocess.run(show, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("perth_pipeline._batch_before")
    module.__package__ = "perth_pipeline"
    sys.modules[module.__name__] = module
    exec(compile(source, "batch.py@" + BEFORE, "exec"), module.__dict__)
    return module


def workloads(n: int) -> dict[str, tuple[list[Any], Callable[[Any, Any], str], Callable[[Any, Any], str]]]:
    old = load_before()
    tree = build_tree(n // 100, n, n)
    session_of_tab = {t.id: t.session_id for t in tree.tabs}
    budget = 1 << 20

    def item(kind: str, record: Any, snapshot: Any, *parents: Any, deleted: bool = False) -> Item:
        key, (tab_id, session_id) = (kind, record.id), parents
        record = None if deleted else record
        return Item(kind, key, VERSION, 0, record, snapshot, deleted, tab_id, session_id, key)

    panes = [
        item(PANE, p, copy_json(p.component_state, "c", budget), p.tab_id, session_of_tab[p.tab_id])
        for p in tree.panes
    ]
    floats = [
        item(PANE, p, {**i.snapshot, "ratio": 0.25 + (i.snapshot["scroll"] % 7)}, p.tab_id, i.session_id)
        for p, i in zip(tree.panes, panes, strict=True)
    ]
    tabs = [item(TAB, t, copy_json(t.layout_blob, "l", budget), None, t.session_id) for t in tree.tabs]
    offset = timezone(timedelta(hours=2))
    sessions = [
        item(SESSION, s.model_copy(update={"last_active": datetime.now(offset)}), None, None, None)
        for s in (tree.sessions * (n // len(tree.sessions) + 1))[:n]
    ]
    deletes = [item(PANE, p, None, p.tab_id, session_of_tab[p.tab_id], deleted=True) for p in tree.panes]
    touches = [Touch(uuid.uuid4(), datetime.now(UTC), VERSION + k, k) for k in range(n)]
    content = scrollback(tree.panes[0].id, 256 * 1024, 512)
    chunks = [
        Chunk(content[k % len(content)], p.id.int, VERSION, k, p.tab_id, session_of_tab[p.tab_id])
        for k, p in enumerate(tree.panes)
    ]
    zstd = zstandard.ZstdCompressor(level=3)

    def new_item(x: Item, ids: Any) -> str:
        return opjson.item_json(x, ids)

    def old_item(x: Item, ids: Any) -> str:
        return str(old.item_json(x, ids))

    return {
        "pane.upsert": (panes, new_item, old_item),
        "pane.upsert, a float in component_state": (floats, new_item, old_item),
        "tab.upsert (a list in layout_blob)": (tabs, new_item, old_item),
        "session.upsert": (sessions, new_item, old_item),
        "pane.delete": (deletes, new_item, old_item),
        "session.touch": (
            touches,
            lambda t, ids: opjson.touch_json(t),
            lambda t, ids: str(old.touch_json(t)),
        ),
        "history.append, 512 B, identity": (
            chunks,
            lambda c, ids: opjson.chunk_json(c, None, ids),
            lambda c, ids: str(old.chunk_json(c, None, ids)),
        ),
        "history.append, 512 B, zstd": (
            chunks,
            lambda c, ids: opjson.chunk_json(c, zstd, ids),
            lambda c, ids: str(old.chunk_json(c, zstd, ids)),
        ),
    }, old


def timed(ops: Sequence[Any], encode: Callable[[Any, Any], str], ids: Any) -> float:
    """CPU µs per operation of one pass, with a fresh cache of parent ids (as per batch)."""
    start = time.process_time()
    for op in ops:
        encode(op, ids)
    return (time.process_time() - start) / len(ops) * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    cases, old = workloads(args.ops)
    gc.collect()
    gc.freeze()
    print(f"python {sys.version.split()[0]}, msgspec {opjson.msgspec.__version__}, {args.ops} ops per kind")
    print(f"{'operation':42} {'before µs':>10} {'now µs':>8} {'ratio':>6}")
    for name, (ops, new, before) in cases.items():
        for op in ops[:2000]:
            assert new(op, opjson.Ids()) == before(op, old._Ids()), name
        old_runs, new_runs = [], []
        for _ in range(args.repeat):
            old_runs.append(timed(ops, before, old._Ids()))
            new_runs.append(timed(ops, new, opjson.Ids()))
        b, a = statistics.median(old_runs), statistics.median(new_runs)
        print(f"{name:42} {b:10.2f} {a:8.2f} {b / a:6.2f}")


if __name__ == "__main__":
    main()
