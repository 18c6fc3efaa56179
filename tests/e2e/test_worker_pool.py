"""The worker pool: `perth-pipeline worker --processes N` and `honcho start -c worker=N`.

A child killed with SIGKILL is replaced, the pool applies batches, and SIGTERM stops
every process it started, leaving none behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from rq import Queue, Worker

from perth_pipeline import PersistenceManager
from perth_pipeline.settings import Settings

from ..helpers import pane, require, session, tab, wait_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _proc() -> None:
    require(Path("/proc/self/stat").exists(), "reads the process tree in /proc")


def _children(pid: int) -> set[int]:
    """The live child processes of ``pid`` (from /proc; zombies do not count)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after its closing parenthesis
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def _descendants(pid: int) -> set[int]:
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in _children(todo.pop()):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


def _env(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_URL": settings.redis_url or "",
        "DATABASE_URL": settings.database_url or "",
        "PERTH_QUEUE": settings.queue,
        "PERTH_LOG_LEVEL": "WARNING",
        # the Procfile's commands are this environment's scripts
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }


def _worker_pids(settings: Settings, client: redis.Redis) -> set[int]:
    """Pids of the workers registered on the queue that are alive."""
    queue = Queue(settings.queue, connection=client)
    return {w.pid for w in Worker.all(queue=queue) if w.pid and _alive(w.pid)}


def _two_workers(settings: Settings, client: redis.Redis) -> set[int]:
    pids = _worker_pids(settings, client)
    return pids if len(pids) == 2 else set()


def _stop(proc: subprocess.Popen[bytes], pids: set[int]) -> None:
    """Leave nothing behind even when the test failed half way."""
    pids = pids | _descendants(proc.pid)
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _deliver(settings: Settings, sessions: int = 3) -> None:
    """Writes through the producer; the pool must commit them."""
    with PersistenceManager(settings=settings) as manager:
        written = []
        for n in range(sessions):
            s = session(f"pool-{n}")
            t = tab(s.id)
            panes = [pane(t.id, i) for i in range(5)]
            manager.create_session(s)
            manager.create_tab(t)
            for p in panes:
                manager.create_pane(p)
            written.append((s, panes))
        assert manager.flush(timeout=60.0), manager.stats()
        for _, panes in written:
            restored = manager.restore_panes(panes[0].tab_id)
            assert sorted(p.id for p in restored) == sorted(p.id for p in panes)


@pytest.fixture
def client(settings: Settings) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(settings.redis_url or "", socket_timeout=10)
    yield c
    c.close()


def test_pool_replaces_a_killed_child_and_stops_them_all(settings: Settings, client: redis.Redis) -> None:
    command = [sys.executable, "-m", "perth_pipeline.cli", "worker", "--processes", "2"]
    proc = subprocess.Popen(command, env=_env(settings), cwd=ROOT, stdin=subprocess.DEVNULL)
    seen: set[int] = set()
    try:
        first = wait_for(lambda: _two_workers(settings, client), 60.0, what="two workers")
        assert first <= _descendants(proc.pid), "the registered workers are the supervisor's children"
        seen |= first
        # the worker that runs RQ's scheduler (a forked child of its own), if one does yet
        wait_for(lambda: any(_children(pid) for pid in first), 30.0, what="a scheduler process")
        victim = max(first, key=lambda pid: len(_children(pid)))
        left = _descendants(victim)
        seen |= _descendants(proc.pid)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: not _alive(victim), 10.0, what="the killed child to be gone")
        # an orphaned scheduler would keep the dead worker's Redis socket (and its blocked BLMOVE,
        # which swallows the next batch) open: it goes with the worker
        wait_for(lambda: not any(_alive(pid) for pid in left), 10.0, what="the killed child's scheduler")

        def replaced() -> set[int]:
            live = _worker_pids(settings, client)
            return live if len(live) == 2 and victim not in live else set()

        second = wait_for(replaced, 60.0, what="a replacement worker")
        assert first - {victim} < second, "the other child kept running"
        seen |= second | _descendants(proc.pid)

        _deliver(settings)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        wait_for(lambda: not any(_alive(pid) for pid in seen), 30.0, what="every child to exit")
        assert not _worker_pids(settings, client)
    finally:
        _stop(proc, seen)


def test_honcho_scales_the_procfile_worker_line(settings: Settings, client: redis.Redis) -> None:
    procfile = (ROOT / "Procfile").read_text()
    assert any(line.startswith("worker:") for line in procfile.splitlines())
    command = [
        sys.executable,
        "-m",
        "honcho",
        "-f",
        str(ROOT / "Procfile"),
        "start",
        "-c",
        "worker=2",
        "worker",
    ]
    proc = subprocess.Popen(
        command, env=_env(settings), cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    seen: set[int] = set()
    try:
        seen |= wait_for(lambda: _two_workers(settings, client), 60.0, what="two workers")
        seen |= _descendants(proc.pid)
        _deliver(settings, sessions=2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        wait_for(lambda: not any(_alive(pid) for pid in seen), 30.0, what="every worker to exit")
    finally:
        _stop(proc, seen)


def test_a_child_that_keeps_dying_is_restarted_with_growing_back_off_and_a_stop_is_prompt(
    settings: Settings, tmp_path: Path
) -> None:
    # a Redis URL the children cannot parse: every child dies at start-up (an unreachable Redis
    # is waited for instead: test_worker_redis_wait.py)
    env = {**_env(settings), "REDIS_URL": "redis://127.0.0.1:notaport/0", "PERTH_LOG_LEVEL": "INFO"}
    command = [sys.executable, "-m", "perth_pipeline.cli", "worker", "--processes", "2"]
    log = tmp_path / "supervisor.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:

        def delays() -> list[str]:
            return [
                line.split("restarting in ")[1].split(" s")[0]
                for line in log.read_text(errors="replace").splitlines()
                if "restarting in" in line and "slot=0" in line
            ]

        # the first quick deaths of one slot: 1 s, 2 s, then 4 s before the next start
        wait_for(lambda: len(delays()) >= 3, 60.0, what="three restarts")
        assert delays()[:3] == ["1.0", "2.0", "4.0"]
        # the supervisor is waiting 4 s for the next restart; a stop is answered at once
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=3) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_back_off_starts_over_after_a_child_ran_for_a_while() -> None:
    from workers import runner

    supervisor = runner.Supervisor(1)
    assert [runner.restart_delay(n) for n in (1, 2, 3, 6, 7, 50)] == [1.0, 2.0, 4.0, 30.0, 30.0, 30.0]
    for _ in range(4):  # quick deaths in a row
        supervisor._started[0] = runner.time.monotonic()
        supervisor._exited(0, 1)
    assert supervisor._restarts[0] == 4
    supervisor._started[0] = runner.time.monotonic() - runner.STABLE_AFTER - 1  # ran a long time
    supervisor._exited(0, 1)
    assert supervisor._restarts[0] == 1
    assert supervisor._due[0] - runner.time.monotonic() <= runner.restart_delay(1)
