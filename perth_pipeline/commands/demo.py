"""``perth-pipeline demo``: a simulated terminal, real workers, a restore, the counters."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import click

from ..producer import PersistenceManager
from ..records import PaneHistoryChunk, PaneRecord, SessionRecord, TabRecord
from ..settings import Settings
from ..snapshot import session_document

__all__ = ["run_demo"]

SESSIONS = 3
TABS = 3
PANES = 3
STEPS = 1500


def _start_workers(settings: Settings, count: int) -> list[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        "REDIS_URL": settings.redis_url or "",
        "DATABASE_URL": settings.database_url or "",
        "PERTH_QUEUE": settings.queue,
        "PERTH_LOG_LEVEL": "WARNING",
    }
    return [
        subprocess.Popen([sys.executable, "-m", "workers"], env=env, stdin=subprocess.DEVNULL)
        for _ in range(count)
    ]


def _stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _workload(rng: random.Random) -> tuple[list[SessionRecord], list[TabRecord], list[PaneRecord]]:
    now = datetime.now(UTC)
    sessions = [
        SessionRecord(id=uuid.uuid4(), name=f"demo-{i}", template_name=None, created_at=now, last_active=now)
        for i in range(SESSIONS)
    ]
    tabs = [
        TabRecord(
            id=uuid.uuid4(),
            session_id=s.id,
            position=t,
            name=f"tab {t}",
            layout_blob={"direction": "vertical", "sizes": [50, 50]},
        )
        for s in sessions
        for t in range(TABS)
    ]
    panes = [
        PaneRecord(
            id=uuid.uuid4(),
            tab_id=tab.id,
            pane_id=f"terminal_{n}",
            pane_type=rng.choice(["terminal", "terminal", "command", "bloodbank-feed"]),
            title="zsh",
            cwd="/home/perth",
            command=None,
        )
        for tab in tabs
        for n in range(PANES)
    ]
    return sessions, tabs, panes


def run_demo(settings: Settings, echo: Callable[[str], None] = click.echo) -> dict[str, Any]:
    rng = random.Random(7)
    started = time.perf_counter()
    echo("starting 2 worker processes ...")
    workers = _start_workers(settings, 2)
    try:
        with PersistenceManager(settings=settings) as manager:
            sessions, tabs, panes = _workload(rng)
            for s in sessions:
                manager.create_session(s)
            for tab in tabs:
                manager.create_tab(tab)
            for pane in panes:
                manager.create_pane(pane)
            _simulate(manager, rng, sessions, panes)
            # one tab closed, with its panes
            manager.delete_tab(tabs[-1].id)
            echo("waiting for the workers to commit everything ...")
            committed = manager.flush(timeout=30.0)
            if not committed:
                raise click.ClickException("the workers did not commit the demo's writes within 30 s")
            document = session_document(manager, sessions[0].id)
            stats = manager.stats()
        elapsed = time.perf_counter() - started
        echo(f"\nrestored session {sessions[0].name} ({sessions[0].id}):")
        echo(_summary(document))
        echo("\nas JSON (perth-pipeline restore prints the same):")
        echo(json.dumps(document, indent=2)[:1500] + "\n  ...")
        keys = ["submitted", "coalesced", "enqueued_jobs", "enqueued_ops", "committed_jobs", "dropped_jobs"]
        echo("\ncounters: " + "  ".join(f"{k}={stats[k]}" for k in keys))
        echo(
            f"{stats['submitted']} write calls became {stats['enqueued_ops']} operations in "
            f"{stats['enqueued_jobs']} jobs; done in {elapsed:.1f} s"
        )
        return {"document": document, "stats": stats, "seconds": elapsed}
    finally:
        echo("stopping workers ...")
        _stop_workers(workers)


def _simulate(
    manager: PersistenceManager, rng: random.Random, sessions: list[SessionRecord], panes: list[PaneRecord]
) -> None:
    """Title and cwd changes, scrollback and activity, as a busy terminal makes them."""
    chunk_index = dict.fromkeys((p.id for p in panes), 0)
    current = {p.id: p for p in panes}
    dirs = ["/home/perth", "/srv/app", "/var/log", "/tmp", "/home/perth/src/perth"]
    with click.progressbar(range(STEPS), label="simulating a terminal", width=30) as steps:
        for step in steps:
            pane = current[rng.choice(panes).id]
            roll = rng.random()
            if roll < 0.45:
                pane = pane.model_copy(update={"title": f"vim notes-{step % 17}.md"})
                manager.update_pane(pane)
            elif roll < 0.7:
                pane = pane.model_copy(update={"cwd": rng.choice(dirs)})
                manager.update_pane(pane)
            elif roll < 0.95:
                line = f"$ make test  # step {step}\nok {rng.randint(1, 999)} passed\n".encode()
                chunk = PaneHistoryChunk(pane_id=pane.id, chunk_index=chunk_index[pane.id], content=line * 8)
                manager.append_pane_history(chunk)
                chunk_index[pane.id] += 1
            else:
                manager.touch_session(rng.choice(sessions).id)
            current[pane.id] = pane
            if step % 50 == 0:
                time.sleep(0.002)  # a terminal is not a tight loop: let the flusher send as it goes


def _summary(document: dict[str, Any]) -> str:
    lines = []
    for tab in document["tabs"]:
        lines.append(f"  tab {tab['position']} {tab['name']!r}")
        for pane in tab["panes"]:
            lines.append(
                f"    pane {pane['pane_id']:<12} {pane['pane_type']:<15} {pane['title']!r} in {pane['cwd']}"
            )
    return "\n".join(lines)
