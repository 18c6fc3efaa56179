"""Chaos: many producers, many workers, SIGKILLs and a PostgreSQL restart; every table against the model.

Producers (one in this process's thread, the others in processes of their own)
make thousands of random creates, updates, deletes and scrollback appends over a
handful of sessions; all of them write the same tabs, panes, scrollback and
templates (each session record is written by one producer: see below). Meanwhile
worker processes are SIGKILLed at random (one of them, for certain, while its
batch waits inside an open transaction, as pg_stat_activity shows), and the
throwaway PostgreSQL the test started is restarted once.

Every producer records each write call with the version its clock gave it. At
the end the queue must drain (nothing failed) and every table must equal the
model of tests/model.py: the final state those writes imply by their versions
alone, never by arrival order. Tombstones are compared with one allowance: a
delete still buffered when the producer deletes an ancestor is superseded by
that ancestor's delete (whose cascade covers it) and may never be sent.

Session records are written by one producer each so that ``last_active`` (a max
register, see docs/guarantees.md) grows with the version, as it does for a
terminal; tabs, panes, scrollback and templates are written by all.

Seeded: ``PERTH_CHAOS_SEED`` picks the workload and the kill schedule (timing
stays the machine's). The CI run takes about two minutes; ``--run-slow`` runs a
longer one.
"""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest
import redis
import zstandard
from pydantic import TypeAdapter
from rq import Queue, Retry
from rq.job import Job
from rq.registry import FailedJobRegistry, FinishedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from perth_pipeline import PaneHistoryChunk, PaneRecord, PersistenceManager, SessionRecord, TabRecord
from perth_pipeline.batch import JOB_FUNCTION
from perth_pipeline.operations import (
    HistoryAppend,
    Operation,
    PaneDelete,
    PaneUpsert,
    SessionDelete,
    SessionUpsert,
    TabDelete,
    TabUpsert,
    TemplateDelete,
    TemplateUpsert,
)
from perth_pipeline.records import TemplateRecord
from perth_pipeline.settings import Settings
from perth_pipeline.testing import ThrowawayPostgres

from ..helpers import test_settings, wait_for
from ..model import TABLES, Tables, Write, differences, expected_tables, origin_ranker, read_tables
from .procs import WorkerProcs, backend_of

OPERATION: TypeAdapter[Any] = TypeAdapter(Operation)


@dataclass(frozen=True)
class Chaos:
    seed: int
    producers: int = 3  # the first runs in this process
    ops_per_producer: int = 1000
    duration: float = 40.0  # seconds over which each producer spreads its writes
    sessions: int = 5
    tabs_per_session: int = 3
    panes_per_tab: int = 3
    templates: int = 3
    workers: int = 3
    kill_every: tuple[float, float] = (2.0, 5.0)
    replay_every: float = 0.25  # seconds between two replays of an already applied batch
    # How often a producer writes a pane under a tab it does not hold, or deletes such a tab (as
    # two terminals sharing a session do): it does not know their session, and must learn it
    # from the database, however late the other's batches arrive.
    share: float = 0.0


# --- the workload ------------------------------------------------------------------------------------


@dataclass
class Universe:
    """The entities everyone writes: fixed ids, fixed parents (a tab never moves, nor a pane)."""

    sessions: list[UUID]
    tab_session: dict[UUID, UUID]
    pane_tab: dict[UUID, UUID]
    templates: list[str]

    @classmethod
    def make(cls, chaos: Chaos) -> Universe:
        rng = random.Random(chaos.seed)

        def new_id() -> UUID:
            return UUID(int=rng.getrandbits(128), version=4)

        sessions = [new_id() for _ in range(chaos.sessions)]
        tab_session = {new_id(): s for s in sessions for _ in range(chaos.tabs_per_session)}
        pane_tab = {new_id(): t for t in tab_session for _ in range(chaos.panes_per_tab)}
        return cls(sessions, tab_session, pane_tab, [f"layout-{n}" for n in range(chaos.templates)])


@dataclass
class Workload:
    """One producer's random writes. What it writes under a tab or pane needs that entity in its
    own view (created by it, not deleted since): a terminal writes under what it holds."""

    universe: Universe
    index: int
    producers: int
    rng: random.Random
    manager: PersistenceManager
    record: Callable[[Any], None]
    tabs: set[UUID] = field(default_factory=set)
    panes: set[UUID] = field(default_factory=set)
    sessions: set[UUID] = field(default_factory=set)
    created: dict[UUID, datetime] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    sharing: float = 0.0

    def own_sessions(self) -> list[UUID]:
        return [s for n, s in enumerate(self.universe.sessions) if n % self.producers == self.index]

    def version(self) -> int:
        return self.manager.buffer.clock.last  # the version the call just made (one writing thread)

    def step(self) -> None:
        kinds = ["session", "session_delete", "tab", "tab_delete", "pane", "pane_delete", "history"]
        kinds += ["template", "template_delete"]
        weights = [6, 1, 14, 3, 24, 4, 30, 3, 1]
        kind = self.rng.choices(kinds, weights)[0]
        done = getattr(self, f"_{kind}")()
        if not done:
            self._tab()
            kind = "tab"
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def _session(self) -> bool:
        mine = self.own_sessions()
        if not mine:
            return False
        sid = self.rng.choice(mine)
        now = datetime.now(UTC)
        created = self.created.setdefault(sid, now) if sid in self.sessions else now
        self.created[sid] = created
        record = SessionRecord(
            id=sid,
            name=f"session {self.rng.randrange(1000)}",
            template_name=self.rng.choice([None, *self.universe.templates]),
            created_at=created,
            last_active=now,
        )
        self.manager.update_session(record)
        self.record(SessionUpsert(version=self.version(), record=record))
        self.sessions.add(sid)
        return True

    def _session_delete(self) -> bool:
        live = sorted(self.sessions)
        if not live:
            return False
        sid = self.rng.choice(live)
        self.manager.delete_session(sid)
        self.record(SessionDelete(version=self.version(), id=sid))
        self.sessions.discard(sid)
        gone = {t for t in self.tabs if self.universe.tab_session[t] == sid}
        self.tabs -= gone
        self.panes = {p for p in self.panes if self.universe.pane_tab[p] not in gone}
        return True

    def _tab(self) -> bool:
        tid = self.rng.choice(sorted(self.universe.tab_session))
        record = TabRecord(
            id=tid,
            session_id=self.universe.tab_session[tid],
            position=self.rng.randrange(6),
            name=f"tab {self.rng.randrange(1000)}",
            layout_blob={"split": self.rng.choice(["vertical", "horizontal"]), "n": self.rng.randrange(100)},
        )
        self.manager.update_tab(record)
        self.record(TabUpsert(version=self.version(), record=record))
        self.tabs.add(tid)
        return True

    def _tab_delete(self) -> bool:
        if self.share():
            tid = self.rng.choice(sorted(self.universe.tab_session))  # perhaps another's
        elif not self.tabs:
            return False
        else:
            tid = self.rng.choice(sorted(self.tabs))
        self.manager.delete_tab(tid)
        self.record(TabDelete(version=self.version(), id=tid, session_id=self.universe.tab_session[tid]))
        self.tabs.discard(tid)
        self.panes = {p for p in self.panes if self.universe.pane_tab[p] != tid}
        return True

    def share(self) -> bool:
        return self.rng.random() < self.sharing

    def _pane(self) -> bool:
        shared = self.share()  # under any tab, perhaps one only another terminal holds
        choices = sorted(p for p, t in self.universe.pane_tab.items() if shared or t in self.tabs)
        if not choices:
            return False
        pid = self.rng.choice(choices)
        tid = self.universe.pane_tab[pid]
        n = self.rng.randrange(1000)
        record = PaneRecord(
            id=pid,
            tab_id=tid,
            pane_id=f"terminal_{pid.int % 97}",
            pane_type=self.rng.choice(["terminal", "plugin", "bloodbank-feed"]),
            component_state={"scroll": n, "focus": self.rng.random() < 0.5},
            title=f"title {n}",
            cwd=self.rng.choice([None, f"/home/perth/{n}"]),
            command=self.rng.choice([None, f"vim {n}.txt"]),
        )
        self.manager.update_pane(record)
        self.record(
            PaneUpsert(version=self.version(), session_id=self.universe.tab_session[tid], record=record)
        )
        self.panes.add(pid)
        return True

    def _pane_delete(self) -> bool:
        if not self.panes:
            return False
        pid = self.rng.choice(sorted(self.panes))
        tid = self.universe.pane_tab[pid]
        self.manager.delete_pane(pid)
        self.record(
            PaneDelete(version=self.version(), id=pid, tab_id=tid, session_id=self.universe.tab_session[tid])
        )
        self.panes.discard(pid)
        return True

    def _history(self) -> bool:
        if not self.panes:
            return False
        pid = self.rng.choice(sorted(self.panes))
        tid = self.universe.pane_tab[pid]
        index = self.rng.randrange(8)  # producers overlap on chunk indexes: last writer wins
        line = f"$ make {self.rng.randrange(10**6)}\n".encode()
        content = line * self.rng.choice([1, 4, 20])  # some long enough to be compressed
        self.manager.append_pane_history(PaneHistoryChunk(pane_id=pid, chunk_index=index, content=content))
        self.record(
            HistoryAppend(
                version=self.version(),
                pane_id=pid,
                tab_id=tid,
                session_id=self.universe.tab_session[tid],
                chunk_index=index,
                raw_size=len(content),
                content=base64.b64encode(content),
            )
        )
        return True

    def _template(self) -> bool:
        name = self.rng.choice(self.universe.templates)
        record = TemplateRecord(id=uuid.uuid4(), name=name, definition={"tabs": self.rng.randrange(5)})
        self.manager.save_template(record)
        self.record(TemplateUpsert(version=self.version(), record=record))
        return True

    def _template_delete(self) -> bool:
        name = self.rng.choice(self.universe.templates)
        self.manager.delete_template(name)
        self.record(TemplateDelete(version=self.version(), name=name))
        return True


def run_producer(
    chaos: Chaos, index: int, settings: Settings, settle_within: float
) -> tuple[list[Write], dict[str, Any]]:
    """Write ``ops_per_producer`` operations over ``duration`` seconds, then wait until all are committed."""
    writes: list[Write] = []
    manager = PersistenceManager(settings=settings)
    try:
        workload = Workload(
            Universe.make(chaos), index, chaos.producers, random.Random(chaos.seed * 1009 + index), manager,
            lambda op: writes.append(Write(manager.origin, op)), sharing=chaos.share,
        )  # fmt: skip
        start = time.monotonic()
        pace = chaos.duration / chaos.ops_per_producer
        for n in range(chaos.ops_per_producer):
            workload.step()
            ahead = start + (n + 1) * pace - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)  # pacing the workload over the run, not waiting for anything
        deadline = time.monotonic() + settle_within
        while not manager.flush(timeout=5):
            if time.monotonic() > deadline:
                raise AssertionError(f"producer {index}: writes not committed: {manager.stats()}")
        stats = manager.stats() | {"counts": workload.counts}
    finally:
        manager.close(timeout=5)
    return writes, stats


def producer_main() -> None:
    """A producer process: ``python -c "...producer_main()" CHAOS INDEX SETTINGS OUT``."""
    chaos = Chaos(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(sys.argv[1]).items()})
    index, settings, out = int(sys.argv[2]), Settings(**json.loads(sys.argv[3])), Path(sys.argv[4])
    writes, stats = run_producer(chaos, index, settings, settle_within=float(sys.argv[5]))
    with out.open("w") as f:
        for w in writes:
            f.write(json.dumps({"origin": w.origin, "op": w.op.model_dump(mode="json")}) + "\n")
        f.write(json.dumps({"stats": stats}) + "\n")


def read_producer(path: Path) -> tuple[list[Write], dict[str, Any]]:
    writes, stats = [], {}
    for line in path.read_text().splitlines():
        item = json.loads(line)
        if "stats" in item:
            stats = item["stats"]
        else:
            writes.append(Write(item["origin"], OPERATION.validate_python(item["op"])))
    return writes, stats


# --- the comparison ----------------------------------------------------------------------------------


def decoded(tables: Tables) -> Tables:
    """Scrollback as the terminal wrote it (the producer may have compressed a chunk on the way)."""
    out = dict(tables)
    history = {}
    for key, (stored, encoding, raw_size, *rest) in tables["pane_history"].items():
        content = stored
        if encoding == "zstd":
            content = zstandard.ZstdDecompressor().decompress(stored, max_output_size=raw_size)
        history[key] = (content, "identity", raw_size, *rest)
    out["pane_history"] = history
    return out


def tombstone_problems(
    actual: Tables, expected: Tables, universe: Universe, writes: list[Write]
) -> list[str]:
    """Stored tombstones are deletes that were made; one missing or older was superseded by an ancestor's."""
    deletes: dict[UUID, set[tuple[str, int, str]]] = {}
    for w in writes:
        if isinstance(w.op, SessionDelete | TabDelete | PaneDelete):
            kind = type(w.op).__name__.removesuffix("Delete").lower()
            deletes.setdefault(w.op.id, set()).add((kind, w.op.version, w.origin))
    stored, wanted = actual["tombstones"], expected["tombstones"]

    def ancestors(ident: UUID) -> list[UUID]:
        if ident in universe.pane_tab:
            tab = universe.pane_tab[ident]
            return [tab, universe.tab_session[tab]]
        return [universe.tab_session[ident]] if ident in universe.tab_session else []

    problems = []
    for ident, value in stored.items():
        if value not in deletes.get(ident, set()):
            problems.append(f"tombstone {ident} {value} matches no delete that was made")
    for ident, value in wanted.items():
        if stored.get(ident) == value:
            continue
        covering = [stored[a] for a in ancestors(ident) if a in stored and stored[a][1] > value[1]]
        if not covering:
            problems.append(
                f"tombstone {ident}: database {stored.get(ident)}, model {value}, no ancestor above it"
            )
    return problems


# --- the run -----------------------------------------------------------------------------------------


class Watcher:
    """A connection for pg_stat_activity and the test's own locks; reconnects after the restart."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: psycopg.Connection[Any] | None = None

    def get(self) -> psycopg.Connection[Any]:
        if self.conn is None or self.conn.closed or self.conn.broken:
            self.conn = psycopg.connect(self.url, autocommit=True)
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()

    def backend(self, pid: int) -> dict[str, Any] | None:
        try:
            return backend_of(self.get(), pid)
        except psycopg.OperationalError:
            self.conn = None
            return None

    def in_transaction(self) -> set[int]:
        """The pids of the workers whose backend is inside a transaction now."""
        try:
            rows = (
                self.get()
                .execute(
                    "SELECT application_name FROM pg_stat_activity "
                    "WHERE application_name LIKE 'perth-worker pid=%%' AND xact_start IS NOT NULL"
                )
                .fetchall()
            )
        except psycopg.OperationalError:
            self.conn = None
            return set()
        return {int(r[0].split("=")[1]) for r in rows}

    def blocked_worker(self) -> int | None:
        """The pid of a worker whose batch waits on a lock inside a transaction that has written."""
        try:
            rows = (
                self.get()
                .execute(
                    "SELECT application_name FROM pg_stat_activity "
                    "WHERE application_name LIKE 'perth-worker pid=%%' "
                    "AND wait_event_type = 'Lock' AND backend_xid IS NOT NULL AND xact_start IS NOT NULL"
                )
                .fetchall()
            )
        except psycopg.OperationalError:
            self.conn = None
            return None
        return int(rows[0][0].split("=")[1]) if rows else None


@dataclass
class Report:
    seed: int
    kills: int = 0
    replays: int = 0
    kills_in_transaction: int = 0
    group_kills: int = 0
    locked_kill: dict[str, Any] = field(default_factory=dict)
    restarts: int = 0
    writes: int = 0
    producers: list[dict[str, Any]] = field(default_factory=list)
    committed_after: float = 0.0  # seconds from the start until every producer's writes were committed
    drained_after: float = 0.0
    seconds: float = 0.0


def chaos_settings(redis_url: str, database_url: str) -> Settings:
    return test_settings(
        redis_url,
        database_url,
        job_lease=3,
        maintenance_interval=1,
        statement_timeout=10.0,
        history_retention_bytes=0,  # every chunk kept: the model has no retention
        batch_max_ops=40,
        flush_interval=0.2,
        retry_intervals=(1,) * 4 + (2,) * 8 + (3,) * 20,
    )


def run_chaos(chaos: Chaos, redis_url: str, pg_server: ThrowawayPostgres, folder: Path) -> None:  # noqa: C901, PLR0915
    started = time.monotonic()
    settings = chaos_settings(redis_url, pg_server.url)
    rng = random.Random(chaos.seed)
    report = Report(seed=chaos.seed)
    print(f"chaos seed {chaos.seed} (set PERTH_CHAOS_SEED to repeat)")
    rconn = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=10)
    workers = WorkerProcs(settings, folder, rconn)
    watcher = Watcher(pg_server.url)
    settle_within = chaos.duration + 240
    procs: list[subprocess.Popen[bytes]] = []
    local: dict[str, Any] = {}
    try:
        for _ in range(chaos.workers):
            workers.start()
        # producers: the first in a thread of this process, the others in processes of their own
        for index in range(1, chaos.producers):
            out = folder / f"producer-{index}.jsonl"
            args = [
                sys.executable, "-c", "from tests.e2e.test_chaos import producer_main; producer_main()",
                json.dumps(asdict(chaos)), str(index), settings.model_dump_json(), str(out),
                str(settle_within),
            ]  # fmt: skip
            with (folder / f"producer-{index}.log").open("wb") as log:
                procs.append(
                    subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                )

        def local_producer() -> None:
            try:
                local["result"] = run_producer(chaos, 0, settings, settle_within)
            except BaseException as exc:  # reported by the main thread
                local["error"] = exc

        thread = threading.Thread(target=local_producer, name="chaos-producer-0")
        thread.start()

        # one more producer, in this thread: the write that a held row lock stops mid-transaction
        extra: list[Write] = []
        lock_manager = PersistenceManager(settings=settings)
        locked_at, restart_at = 0.25 * chaos.duration, 0.55 * chaos.duration
        next_kill = rng.uniform(*chaos.kill_every)
        next_replay = 2.0
        t0 = time.monotonic()
        while thread.is_alive() or any(p.poll() is None for p in procs):
            elapsed = time.monotonic() - t0
            for p in procs:
                if p.poll() not in (None, 0):
                    raise AssertionError(
                        f"a producer process failed:\n{(folder / 'producer-1.log').read_text()}"
                    )
            if not report.locked_kill and elapsed > locked_at:
                report.locked_kill = kill_inside_a_transaction(watcher, workers, lock_manager, extra)
            elif not report.restarts and elapsed > restart_at:
                pg_server.restart()
                report.restarts += 1
            elif elapsed > next_replay and elapsed < chaos.duration:
                report.replays += replay_a_finished_batch(rconn, settings, rng)
                next_replay = elapsed + chaos.replay_every
            elif elapsed > next_kill and elapsed < chaos.duration:
                live = [p for p in workers.procs if p.poll() is None]
                busy = watcher.in_transaction()
                aimed = [p for p in live if p.pid in busy] if rng.random() < 0.5 else []
                victim = rng.choice(aimed or live)
                backend = watcher.backend(victim.pid)
                report.kills_in_transaction += bool(backend and backend["in_transaction"])
                group = rng.random() < 0.3  # sometimes with its scheduler process too
                workers.kill(victim, group=group)
                report.kills += 1
                report.group_kills += group
                workers.start(wait=False)
                next_kill = elapsed + rng.uniform(*chaos.kill_every)
            time.sleep(0.05)  # the chaos loop's own pace: the producers run by themselves
        thread.join()
        report.committed_after = round(time.monotonic() - started, 1)
        if "error" in local:
            raise local["error"]
        deadline = time.monotonic() + settle_within
        while not lock_manager.flush(timeout=5):
            assert time.monotonic() < deadline, lock_manager.stats()
        lock_stats = lock_manager.stats()
        lock_manager.close()

        queue = Queue(settings.queue, connection=rconn)

        def drained() -> bool:
            return (
                queue.count == 0
                and StartedJobRegistry(queue=queue).count == 0
                and ScheduledJobRegistry(queue=queue).count == 0  # type: ignore[no-untyped-call]
            )

        wait_for(drained, timeout=120, interval=0.2, what="the queue to drain")
        report.drained_after = round(time.monotonic() - started, 1)
        failed = FailedJobRegistry(queue=queue).get_job_ids()

        writes, stats = list(local["result"][0]) + extra, [local["result"][1]]
        for index in range(1, chaos.producers):
            w, s = read_producer(folder / f"producer-{index}.jsonl")
            writes += w
            stats.append(s)
        stats.append(lock_stats)
        report.writes, report.producers = len(writes), stats
        report.seconds = round(time.monotonic() - started, 1)
        print(json.dumps(asdict(report), indent=1, default=str))

        assert not failed, f"{len(failed)} batches in the failed registry"
        for s in stats:
            assert s["dropped_entities"] == s["dropped_chunks"] == s["unrouted"] == s["refused_jobs"] == 0, s
        assert report.locked_kill.get("in_transaction") and report.locked_kill.get("backend_gone")
        assert report.kills >= 3 and report.restarts == 1

        universe = Universe.make(chaos)
        with psycopg.connect(pg_server.url) as conn:
            actual = decoded(read_tables(conn))
            expected = expected_tables(writes, origin_ranker(conn, {w.origin for w in writes}))
        rows = [t for t in TABLES if t != "tombstones"]
        problems = differences({t: actual[t] for t in rows}, {t: expected[t] for t in rows})
        problems += tombstone_problems(actual, expected, universe, writes)
        assert not problems, "\n".join(problems[:30])
        assert (
            expected["sessions"] and expected["panes"] and expected["pane_history"] and expected["tombstones"]
        )
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        workers.close()
        watcher.close()
        rconn.close()
        print(workers.logs()[-20000:])  # shown when the test failed


def replay_a_finished_batch(rconn: redis.Redis, settings: Settings, rng: random.Random) -> int:
    """At-least-once delivery: a batch applied (maybe long) ago is delivered again, late.

    As when a worker dies after its commit but before RQ records the job finished. Its writes
    are older than what has been applied since: versions and tombstones must keep them out.
    Batches with deletes are preferred: a late delete must not take newer writes with it.
    """
    queue = Queue(settings.queue, connection=rconn, serializer=JSONSerializer)
    done = FinishedJobRegistry(queue=queue).get_job_ids()
    if not done:
        return 0
    picked = [rconn.hget(Job.key_for(job_id), "data") for job_id in rng.sample(done, min(6, len(done)))]
    candidates = [zlib.decompress(raw) for raw in picked if raw is not None]
    if not candidates:
        return 0
    deleting = [data for data in candidates if b'.delete"' in data]
    job = queue.create_job(JOB_FUNCTION, args=[{}], retry=Retry(max=20, interval=[1]))
    job.data = (deleting or candidates)[0]
    queue.enqueue_job(job)
    return 1


def kill_inside_a_transaction(
    watcher: Watcher, workers: WorkerProcs, manager: PersistenceManager, extra: list[Write]
) -> dict[str, Any]:
    """Hold a row lock, write that row, SIGKILL the worker whose batch waits on it mid-transaction."""
    conn = psycopg.connect(watcher.url)  # its transaction holds the lock
    try:
        row = conn.execute(
            "SELECT id, session_id, position, name, layout_blob FROM tabs ORDER BY id LIMIT 1 FOR UPDATE"
        ).fetchone()
        if row is None:
            conn.rollback()
            return {}
        tab = TabRecord(id=row[0], session_id=row[1], position=row[2], name="held", layout_blob=row[4])
        manager.update_tab(tab)
        extra.append(Write(manager.origin, TabUpsert(version=manager.buffer.clock.last, record=tab)))
        pid = wait_for(watcher.blocked_worker, timeout=60, what="a batch waiting mid-transaction")
        state = watcher.backend(pid) or {}
        victim = next(p for p in workers.procs if p.pid == pid)
        workers.kill(victim)
        gone = wait_for(
            lambda: watcher.backend(pid) is None, timeout=30, what="the killed worker's backend to end"
        )
        workers.start(wait=False)
        return {"pid": pid, "in_transaction": state.get("in_transaction"), "backend_gone": gone}
    finally:
        conn.rollback()
        conn.close()


def seed() -> int:
    return int(os.environ.get("PERTH_CHAOS_SEED", "20240611"))


@pytest.mark.timeout(400)
def test_chaos_matches_the_model(redis_url: str, throwaway_pg: ThrowawayPostgres, tmp_path: Path) -> None:
    run_chaos(Chaos(seed=seed()), redis_url, throwaway_pg, tmp_path)


@pytest.mark.timeout(400)
def test_chaos_with_two_terminals_writing_each_others_tabs(
    redis_url: str, throwaway_pg: ThrowawayPostgres, tmp_path: Path
) -> None:
    # one terminal adds panes under the other's tabs and deletes them; workers die twice as often
    chaos = Chaos(
        seed=seed() + 1, producers=2, ops_per_producer=800, duration=25.0, kill_every=(1.0, 2.5), share=0.5
    )
    run_chaos(chaos, redis_url, throwaway_pg, tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_chaos_long(redis_url: str, throwaway_pg: ThrowawayPostgres, tmp_path: Path) -> None:
    chaos = Chaos(seed=seed(), producers=5, ops_per_producer=4000, duration=180.0, sessions=8, workers=4)
    run_chaos(chaos, redis_url, throwaway_pg, tmp_path)
