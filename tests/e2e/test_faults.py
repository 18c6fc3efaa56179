"""Faults end to end: the terminal never waits, and an outage loses none of the live state.

docs/design.md, rules 1 to 3, under four faults, each on a server of the test's own
(perth_pipeline/testing.py: the shared Redis and PostgreSQL are never stopped):

* Redis refusing connections (not started yet, then stopped);
* Redis paused (``CLIENT PAUSE ... ALL``: every command blocks, as a stuck server);
* Redis killed and restarted without persistence (the queued batches vanish);
* PostgreSQL stopped and restarted.

Simulated terminals (several managers, several sessions each) keep creating, updating and
deleting sessions, tabs and panes and appending scrollback through the fault, at a human
pace, with every write call timed: none may raise or take longer than ``BOUND``. Each also
writes a "quiet" session around the fault (a session, tab, panes and scrollback written once
and never touched again), so that a lost batch cannot be covered by a later write. Workers
run as processes (``python -m workers``). After recovery the stored rows must equal a model
of the terminals' final state, deletes made during the outage included; the test waits for
that with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import gc
import random
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import zstandard

from perth_pipeline import PaneHistoryChunk, PaneRecord, PersistenceManager, SessionRecord, TabRecord
from perth_pipeline.settings import Settings
from perth_pipeline.testing import ThrowawayPostgres, ThrowawayRedis

from ..helpers import now, require, test_settings, wait_for
from .procs import WorkerProcs

BOUND = 0.05  # seconds: a write call takes microseconds; this is generous for a busy 2-core machine
CONVERGE = 90.0  # seconds for the stored state to catch up after recovery


# --- the terminal ------------------------------------------------------------------------------


@dataclass
class State:
    sessions: dict[uuid.UUID, SessionRecord] = field(default_factory=dict)
    tabs: dict[uuid.UUID, TabRecord] = field(default_factory=dict)
    panes: dict[uuid.UUID, PaneRecord] = field(default_factory=dict)
    history: dict[tuple[uuid.UUID, int], bytes] = field(default_factory=dict)

    def merge(self, other: State) -> None:
        self.sessions |= other.sessions
        self.tabs |= other.tabs
        self.panes |= other.panes
        self.history |= other.history


class Terminal:
    """One terminal process: a manager, the state it has written, random writes, each timed."""

    def __init__(self, settings: Settings, seed: int) -> None:
        self.manager = PersistenceManager(settings=settings)
        self.rng = random.Random(seed)
        self.state = State()
        self.chunks: dict[uuid.UUID, int] = {}
        self.calls = 0
        self.slowest = 0.0
        self.deletes = 0
        self.quiet: set[uuid.UUID] = set()
        self.quiet_sessions: set[uuid.UUID] = set()

    def call(self, fn: Callable[..., None], *args: Any) -> None:
        started = time.perf_counter()
        fn(*args)  # a raise fails the test: no write call may raise for an outage
        took = time.perf_counter() - started
        self.calls += 1
        self.slowest = max(self.slowest, took)

    def steps(self, n: int) -> None:
        for _ in range(n):
            self.step()

    def pick(self, entities: dict[uuid.UUID, Any]) -> uuid.UUID | None:
        """A random entity of the workload (quiet ones are left alone)."""
        ids = [k for k in entities if k not in self.quiet]
        return self.rng.choice(ids) if ids else None

    def step(self) -> None:
        st, r = self.state, self.rng.random()
        sid, tid, pid = self.pick(st.sessions), self.pick(st.tabs), self.pick(st.panes)
        if sid is None or len(st.sessions) - len(self.quiet_sessions) < 2 or r < 0.03:
            self.new_session()
        elif r < 0.10:
            self.new_tab(sid)
        elif r < 0.20 and tid:
            self.new_pane(tid)
        elif r < 0.55 and pid:
            update: dict[str, Any] = {"title": f"{self.rng.choice(['vim', 'htop', 'zsh'])} {self.calls}"}
            if self.rng.random() < 0.5:
                update["component_state"] = {"scroll": self.calls, "marks": [self.calls % 7]}
            self.write_pane(st.panes[pid].model_copy(update=update))
        elif r < 0.65 and tid:
            update = {"name": f"tab {self.calls}", "position": self.rng.randrange(8)}
            self.write_tab(st.tabs[tid].model_copy(update=update))
        elif r < 0.70:
            update = {"name": f"session {self.calls}", "last_active": now()}
            self.write_session(st.sessions[sid].model_copy(update=update))
        elif r < 0.82 and pid:
            self.append(pid)
        elif r < 0.90 and pid:
            self.delete_pane(pid)
        elif r < 0.95 and tid:
            self.delete_tab(tid)
        elif len(st.sessions) - len(self.quiet_sessions) > 2:
            self.delete_session(sid)

    def quiet_session(self) -> None:
        """A session, tab, panes and scrollback written once and never again: if a batch of
        them is lost, nothing later covers for it."""
        before = set(self.state.sessions) | set(self.state.tabs) | set(self.state.panes)
        self.new_session()
        sid = next(k for k in self.state.sessions if k not in before)
        tid = next(k for k in self.state.tabs if k not in before)
        self.new_pane(tid)
        for p in [k for k in self.state.panes if k not in before]:
            self.append(p)
            self.append(p)
        self.quiet_sessions.add(sid)
        self.quiet |= {sid, tid} | {k for k in self.state.panes if k not in before}

    def new_session(self) -> None:
        s = SessionRecord(id=uuid.uuid4(), name="new", created_at=now(), last_active=now())
        self.write_session(s)
        self.new_pane(self.new_tab(s.id))

    def new_tab(self, session_id: uuid.UUID) -> uuid.UUID:
        t = TabRecord(
            id=uuid.uuid4(), session_id=session_id, position=0, name="new", layout_blob={"split": [50, 50]}
        )
        self.write_tab(t)
        return t.id

    def new_pane(self, tab_id: uuid.UUID) -> None:
        n = self.calls
        p = PaneRecord(
            id=uuid.uuid4(), tab_id=tab_id, pane_id=f"terminal_{n}", pane_type="terminal", cwd="/src"
        )
        self.write_pane(p)

    def write_session(self, s: SessionRecord) -> None:
        self.call(self.manager.update_session, s)
        self.state.sessions[s.id] = s

    def write_tab(self, t: TabRecord) -> None:
        self.call(self.manager.update_tab, t)
        self.state.tabs[t.id] = t

    def write_pane(self, p: PaneRecord) -> None:
        self.call(self.manager.update_pane, p)
        self.state.panes[p.id] = p

    def append(self, pane_id: uuid.UUID) -> None:
        index = self.chunks.get(pane_id, 0)
        self.chunks[pane_id] = index + 1
        content = f"$ make step {index}\n".encode() * self.rng.choice([1, 40])
        self.call(
            self.manager.append_pane_history,
            PaneHistoryChunk(pane_id=pane_id, chunk_index=index, content=content),
        )
        self.state.history[(pane_id, index)] = content

    def delete_session(self, session_id: uuid.UUID) -> None:
        self.call(self.manager.delete_session, session_id)
        self.deletes += 1
        del self.state.sessions[session_id]
        for t in [t.id for t in self.state.tabs.values() if t.session_id == session_id]:
            self.forget_tab(t)

    def delete_tab(self, tab_id: uuid.UUID) -> None:
        self.call(self.manager.delete_tab, tab_id)
        self.deletes += 1
        self.forget_tab(tab_id)

    def delete_pane(self, pane_id: uuid.UUID) -> None:
        self.call(self.manager.delete_pane, pane_id)
        self.deletes += 1
        self.forget_pane(pane_id)

    def forget_tab(self, tab_id: uuid.UUID) -> None:
        del self.state.tabs[tab_id]
        for p in [p.id for p in self.state.panes.values() if p.tab_id == tab_id]:
            self.forget_pane(p)

    def forget_pane(self, pane_id: uuid.UUID) -> None:
        del self.state.panes[pane_id]
        for key in [k for k in self.state.history if k[0] == pane_id]:
            del self.state.history[key]


class Terminals:
    """Several terminal processes writing at a human pace; every call's time is kept."""

    def __init__(self, settings: Settings, count: int = 2) -> None:
        self.all = [Terminal(settings, seed) for seed in range(count)]

    def steps(self, n: int) -> None:
        for t in self.all:
            t.steps(n)

    def quiet_sessions(self) -> None:
        for t in self.all:
            t.quiet_session()

    def drive(self, seconds: float, per_tick: int = 3, tick: float = 0.01) -> None:
        """Write for ``seconds``, a few calls every ``tick`` (pacing the workload, not waiting)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.steps(per_tick)
            time.sleep(tick)

    def drive_until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """Write at a human pace until ``condition`` holds (failing after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}: {self.stats()}")
            self.steps(3)
            time.sleep(0.01)

    def expected(self) -> State:
        out = State()
        for t in self.all:
            out.merge(t.state)
        return out

    def stats(self) -> list[dict[str, Any]]:
        return [t.manager.stats() for t in self.all]

    def total(self, counter: str) -> int:
        return sum(int(s[counter]) for s in self.stats())

    def check_calls(self) -> None:
        slowest = max(t.slowest for t in self.all)
        calls = sum(t.calls for t in self.all)
        assert slowest < BOUND, f"a write call took {slowest * 1000:.1f} ms (of {calls} calls)"

    def close(self) -> None:
        for t in self.all:
            t.manager.close(timeout=2)


# --- the stored state ------------------------------------------------------------------------


def stored(database_url: str) -> State:
    out = State()
    unzstd = zstandard.ZstdDecompressor()
    with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
        for row in conn.execute("SELECT id, name, template_name, created_at, last_active FROM sessions"):
            s = SessionRecord(
                id=row[0], name=row[1], template_name=row[2], created_at=row[3], last_active=row[4]
            )
            out.sessions[s.id] = s
        for row in conn.execute("SELECT id, session_id, position, name, layout_blob FROM tabs"):
            out.tabs[row[0]] = TabRecord(
                id=row[0], session_id=row[1], position=row[2], name=row[3], layout_blob=row[4]
            )
        query = "SELECT id, tab_id, pane_id, pane_type, component_state, title, cwd, command FROM panes"
        for row in conn.execute(query):
            keys = ("id", "tab_id", "pane_id", "pane_type", "component_state", "title", "cwd", "command")
            out.panes[row[0]] = PaneRecord(**dict(zip(keys, row, strict=True)))
        for pane_id, index, content, encoding, raw_size in conn.execute(
            "SELECT pane_id, chunk_index, content, encoding, raw_size FROM pane_history"
        ):
            data = bytes(content)
            if encoding == "zstd":
                data = unzstd.decompress(data, max_output_size=max(raw_size, 1))
            out.history[(pane_id, index)] = data
    return out


def diff(expected: State, got: State) -> str:
    lines = []
    for name in ("sessions", "tabs", "panes", "history"):
        want, have = getattr(expected, name), getattr(got, name)
        missing = [k for k in want if k not in have]
        extra = [k for k in have if k not in want]
        wrong = [k for k in want if k in have and want[k] != have[k]]
        if missing or extra or wrong:
            lines.append(f"{name}: {len(missing)} missing, {len(extra)} extra, {len(wrong)} different")
            for k in wrong[:2]:
                lines.append(f"  {k}: want {want[k]!r}\n  {' ' * len(str(k))}  got  {have[k]!r}")
    return "\n".join(lines)


def converge(terminals: Terminals, database_url: str, workers: WorkerProcs | None = None) -> State:
    """Wait (with a deadline) until the stored rows are exactly the terminals' state."""
    expected = terminals.expected()
    last: list[State] = []

    def caught_up() -> bool:
        try:
            last[:] = [stored(database_url)]
        except psycopg.OperationalError:
            return False
        return last[0] == expected

    try:
        wait_for(caught_up, timeout=CONVERGE, interval=0.2, what="the stored state to match the terminals")
    except AssertionError as exc:
        logs = workers.logs()[-6000:] if workers is not None else ""
        detail = diff(expected, last[0]) if last else "no read succeeded"
        raise AssertionError(f"{exc}\n{detail}\nstats: {terminals.stats()}\n{logs}") from None
    assert expected.sessions and expected.history, "the workload wrote nothing to compare"
    return expected


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def redis_server() -> Iterator[ThrowawayRedis]:
    try:
        server = ThrowawayRedis()
    except RuntimeError as exc:
        require(False, f"no redis-server for a throwaway Redis: {exc}")
        raise
    yield server
    server.close()


@pytest.fixture(autouse=True)
def quiet_heap() -> Iterator[None]:
    # A full collection of the test process's heap is the host's pause, not the producer's
    # (as a long-running terminal does with its start-up state, see the benchmark).
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def fault_settings(redis_url: str, database_url: str) -> Settings:
    return test_settings(
        redis_url,
        database_url,
        breaker_base=0.05,
        breaker_max=0.5,  # back in half a second at most (the default caps at 30 s)
        health_ttl=3,
        retry_intervals=(1,) * 60,
        redis_socket_timeout=0.5,
    )


def all_sent(manager: PersistenceManager) -> bool:
    """Nothing dirty and nothing in transit: every write so far is on the queue."""
    return not manager.buffer.has_dirty() and not manager.stats()["sending"]


def queue_length(server: ThrowawayRedis, settings: Settings) -> int:
    client = server.client()
    try:
        return int(client.llen(f"rq:queue:{settings.queue}"))
    finally:
        client.close()


# --- the faults -----------------------------------------------------------------------------------


def test_redis_refusing_connections(redis_server: ThrowawayRedis, database_url: str, tmp_path: Path) -> None:
    settings = fault_settings(redis_server.url, database_url)
    terminals = Terminals(settings)  # Redis is not running: every connection is refused
    workers: WorkerProcs | None = None
    try:
        terminals.drive_until(
            lambda: all(s["redis_down"] for s in terminals.stats()), timeout=30, what="Redis seen down"
        )
        terminals.quiet_sessions()
        terminals.drive(1.0)
        redis_server.start()
        workers = WorkerProcs(settings, tmp_path, redis_server.client())
        workers.start()
        terminals.drive(1.0)
        converge(terminals, database_url, workers)
        redis_server.stop()  # refused again, mid-run
        terminals.drive_until(
            lambda: all(s["redis_down"] for s in terminals.stats()), timeout=30, what="Redis seen down"
        )
        deletes = sum(t.deletes for t in terminals.all)
        terminals.quiet_sessions()
        terminals.drive(2.0)
        assert sum(t.deletes for t in terminals.all) > deletes  # deletes made during the outage
        redis_server.start()  # the worker reconnects by itself
        terminals.drive(1.0)
        converge(terminals, database_url, workers)
        terminals.check_calls()
        assert terminals.total("dropped_jobs") > 0
        assert not any(s["redis_down"] for s in terminals.stats())
    finally:
        terminals.close()
        if workers is not None:
            workers.close()


def test_redis_paused(redis_server: ThrowawayRedis, database_url: str, tmp_path: Path) -> None:
    settings = fault_settings(redis_server.url, database_url)
    redis_server.start()
    workers = WorkerProcs(settings, tmp_path, redis_server.client())
    terminals = Terminals(settings)
    try:
        workers.start()
        terminals.drive(1.0)
        converge(terminals, database_url, workers)
        deletes = sum(t.deletes for t in terminals.all)
        redis_server.pause(3000)  # every client blocks for 3 s: producers and workers alike
        terminals.quiet_sessions()
        terminals.drive(3.5)
        assert sum(t.deletes for t in terminals.all) > deletes
        terminals.drive(1.0)
        converge(terminals, database_url, workers)
        terminals.check_calls()
        assert terminals.total("dropped_jobs") > 0  # the pause was felt, by the flusher alone
    finally:
        terminals.close()
        workers.close()


def test_redis_killed_and_restarted_without_persistence(
    redis_server: ThrowawayRedis, database_url: str, tmp_path: Path
) -> None:
    settings = fault_settings(redis_server.url, database_url)
    redis_server.start()
    workers = WorkerProcs(settings, tmp_path, redis_server.client())
    terminals = Terminals(settings)
    try:
        terminals.drive(1.0)  # no worker yet: the batches wait on the queue ...
        terminals.quiet_sessions()
        wait_for(lambda: all(all_sent(t.manager) for t in terminals.all), what="the batches to be queued")
        assert queue_length(redis_server, settings) > 0
        redis_server.kill()  # ... and vanish with it
        terminals.drive(2.0)
        redis_server.start()
        workers.start()
        terminals.drive(1.0)
        converge(terminals, database_url, workers)
        terminals.check_calls()
        assert terminals.total("vanished_jobs") > 0
        assert terminals.total("resynced") > 0
    finally:
        terminals.close()
        workers.close()


def test_postgresql_stopped_and_restarted(
    throwaway_pg: ThrowawayPostgres, redis_url: str, tmp_path: Path
) -> None:
    database_url = throwaway_pg.url
    settings = fault_settings(redis_url, database_url)
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=10)
    workers = WorkerProcs(settings, tmp_path, client)
    terminals = Terminals(settings)
    try:
        workers.start()
        terminals.drive(1.0)
        converge(terminals, database_url, workers)
        throwaway_pg.stop()
        terminals.drive_until(
            lambda: all(s["database_down"] for s in terminals.stats()),
            timeout=60,
            what="PostgreSQL seen down",
        )
        terminals.quiet_sessions()
        enqueued = terminals.total("enqueued_jobs")
        deletes = sum(t.deletes for t in terminals.all)
        terminals.drive(2.0)
        assert terminals.total("enqueued_jobs") == enqueued  # nothing piles up in Redis meanwhile
        assert sum(t.deletes for t in terminals.all) > deletes
        throwaway_pg.start()
        terminals.drive(1.0)
        converge(terminals, database_url, workers)
        terminals.check_calls()
        assert not any(s["database_down"] for s in terminals.stats())
    finally:
        terminals.close()
        workers.close()
        client.close()
