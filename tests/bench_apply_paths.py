"""Microbenchmark of the worker's apply paths (issue 15), in one run, interleaved:

    DATABASE_URL=postgresql://... PYTHONPATH=. python -m tests.bench_apply_paths [--panes 100000] [--rounds 3]

* ``models + COPY``: the job's bytes validated by the pydantic models, rows copied (binary
  ``COPY``) into the staging table, merged (what the workers did before ``workers.decoder``);
* ``msgspec + COPY``: the same, decoded by ``workers.decoder`` (what they do now);
* ``json_to_recordset`` (and ``jsonb_to_recordset``): no Python per row at all: the operations'
  JSON text handed to PostgreSQL as one parameter and expanded into the same staging table, then
  the same merge. It checks nothing (the models' checks would have to be written again in SQL), so
  it is that path's lower bound.

Each path applies the same batches (a producer's, 1,000 fresh panes each) to emptied tables, in
one transaction per batch; reported per row: the worker's CPU (``time.process_time``), its
backend's (``/proc/PID/stat``) and their sum, the median of ``--rounds``. Needs a scratch
database (its tables are truncated) on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import msgspec
import psycopg
import zstandard

from perth_pipeline.batch import encode_batches
from perth_pipeline.bench.cpu import cpu_seconds
from perth_pipeline.bench.workload import build_tree
from perth_pipeline.buffer import Buffer
from perth_pipeline.store import Store
from workers import applier as A
from workers.serializer import _APPLY_BATCH_JOB, parse_apply_batch

_TO_RECORDSET = """
INSERT INTO stage_panes (id, tab_id, pane_id, pane_type, component_state, title, cwd, command,
                         session_id, version, origin)
SELECT r.id, r.tab_id, r.pane_id, r.pane_type, coalesce(r.component_state::text, '{}'), coalesce(r.title, ''),
       r.cwd, r.command, o.session_id, o.version, %(origin)s
FROM json_to_recordset(%(ops)s::json) AS o(op text, version bigint, session_id uuid, record json),
LATERAL json_to_record(o.record) AS r(id uuid, tab_id uuid, pane_id text, pane_type text,
                                      component_state json, title text, cwd text, command text)
"""


_TO_RECORDSET_B = (
    _TO_RECORDSET.replace("json_to_recordset(%(ops)s::json)", "jsonb_to_recordset(%(ops)s::jsonb)")
    .replace("record json)", "record jsonb)")
    .replace("json_to_record(o.record)", "jsonb_to_record(o.record)")
    .replace("component_state json,", "component_state jsonb,")
)


class _Ops(msgspec.Struct):
    origin: str
    ops: msgspec.Raw


class _Job(msgspec.Struct, array_like=True):
    function: str
    instance: None
    args: tuple[_Ops]
    kwargs: dict[str, Any]


def job_data(panes: int) -> list[bytes]:
    """A producer's batches of ``panes`` fresh panes (their sessions and tabs first)."""
    tree = build_tree(max(1, panes // 10_000), max(1, panes // 100), panes)
    buffer = Buffer(
        max_entities=2 * panes + 1000,
        max_pending_history_bytes=1 << 20,
        max_json_bytes=1 << 20,
        max_chunk_bytes=1 << 20,
    )
    for s in tree.sessions:
        buffer.put_session(s)
    for t in tree.tabs:
        buffer.put_tab(t)
    for p in tree.panes:
        buffer.put_pane(p)
    batches = encode_batches(
        buffer.drain(len(tree.sessions) + len(tree.tabs) + panes),
        origin="bench",
        max_ops=1000,
        max_bytes=1 << 20,
        compressor=zstandard.ZstdCompressor(),
    )
    return [b.data for b in batches]


def models_copy(conn: psycopg.Connection[Any], applier: A.Applier, data: bytes) -> int:
    texts: dict[int, tuple[Any, str]] = {}
    _, _, (batch,), _ = _APPLY_BATCH_JOB.validate_json(data, context={"json_texts": texts})
    applier.apply(conn, batch, json_texts=texts)
    return len(batch.ops)


def msgspec_copy(conn: psycopg.Connection[Any], applier: A.Applier, data: bytes) -> int:
    parsed = parse_apply_batch(data)
    assert parsed is not None
    applier.apply(conn, parsed.batch)
    return len(parsed.batch.ops)


def to_recordset(
    conn: psycopg.Connection[Any], applier: A.Applier, data: bytes, sql: str = _TO_RECORDSET
) -> int:
    envelope = msgspec.json.decode(data, type=_Job).args[0]
    ops = bytes(envelope.ops).decode()
    if '"pane.upsert"' not in ops or any(k in ops for k in ('"tab.', '"session.', '"template.')):
        return models_copy(conn, applier, data)  # (the sessions and tabs: not what is compared)
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(sql, {"ops": ops, "origin": envelope.origin})
        staged = cur.rowcount
        cur.execute(applier._sql["upsert_panes"])
        cur.execute("DELETE FROM stage_panes")
    return staged


PATHS: dict[str, Callable[[psycopg.Connection[Any], A.Applier, bytes], int]] = {
    "models + COPY": models_copy,
    "msgspec + COPY": msgspec_copy,
    "json_to_recordset": to_recordset,
    "jsonb_to_recordset": lambda conn, applier, data: to_recordset(conn, applier, data, _TO_RECORDSET_B),
}


def run(database_url: str, batches: list[bytes], path: str) -> tuple[float, float]:
    with psycopg.connect(database_url) as conn:
        conn.execute("TRUNCATE sessions, tabs, panes, pane_history, tombstones")
        conn.commit()
        applier = A.Applier()
        applier.apply(conn, parse_apply_batch(batches[0]).batch)  # type: ignore[union-attr]  (stage, sessions)
        pid = conn.info.backend_pid
        worker, backend = time.process_time(), cpu_seconds(pid) or 0.0
        rows = sum(PATHS[path](conn, applier, data) for data in batches[1:])
        worker, backend = time.process_time() - worker, (cpu_seconds(pid) or 0.0) - backend
    return worker / rows * 1e6, backend / rows * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--panes", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    database_url = os.environ["DATABASE_URL"]
    store = Store(database_url)
    store.init_db()
    store.close()
    batches = job_data(args.panes)
    results: dict[str, list[tuple[float, float]]] = {path: [] for path in PATHS}
    for _ in range(args.rounds):
        for path in PATHS:
            results[path].append(run(database_url, batches, path))
    print(f"{len(batches) - 1} batches of pane upserts, {args.rounds} rounds; CPU us per row (median)")
    print(f"{'path':22} {'worker':>8} {'backend':>8} {'both':>8}")
    for path, runs in results.items():
        w = statistics.median(r[0] for r in runs)
        b = statistics.median(r[1] for r in runs)
        print(f"{path:22} {w:8.2f} {b:8.2f} {w + b:8.2f}")
    print(json.dumps({p: [[round(w, 2), round(b, 2)] for w, b in r] for p, r in results.items()}))


if __name__ == "__main__":
    main()
