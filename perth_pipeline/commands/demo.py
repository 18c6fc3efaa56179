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

#: The demo's sessions, by name: a run replaces those of the runs before it.
SESSION_NAMES = ("demo-0", "demo-1", "demo-2")
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


#: What a pane runs: (pane_type, title, command). A command pane always has its command.
PANE_KINDS = [
    ("terminal", "zsh", None),
    ("command", "htop", "htop"),
    ("command", "tail -f app.log", "tail -f /var/log/app.log"),
    ("command", "cargo watch", "cargo watch -x test"),
]


def _sizes(count: int) -> list[int]:
    """Percentages of a split into ``count`` panes, one per pane, that add up to 100."""
    return [100 // count + (1 if n < 100 % count else 0) for n in range(count)]


def _workload(rng: random.Random) -> tuple[list[SessionRecord], list[TabRecord], list[PaneRecord]]:
    now = datetime.now(UTC)
    sessions = [
        SessionRecord(id=uuid.uuid4(), name=name, template_name=None, created_at=now, last_active=now)
        for name in SESSION_NAMES
    ]
    tabs = [
        TabRecord(
            id=uuid.uuid4(),
            session_id=s.id,
            position=t,
            name=f"tab {t}",
            layout_blob={"direction": "vertical", "sizes": _sizes(PANES)},
        )
        for s in sessions
        for t in range(TABS)
    ]
    panes = []
    for tab in tabs:
        # the first pane of a tab is a shell; the others, a shell or a command
        kinds = [PANE_KINDS[0], *(rng.choice(PANE_KINDS) for _ in range(PANES - 1))]
        for n, (pane_type, title, command) in enumerate(kinds):
            panes.append(
                PaneRecord(
                    id=uuid.uuid4(),
                    tab_id=tab.id,
                    pane_id=f"terminal_{n}",
                    pane_type=pane_type,
                    title=title,
                    cwd="/home/perth",
                    command=command,
                )
            )
    return sessions, tabs, panes


def run_demo(settings: Settings, echo: Callable[[str], None] = click.echo) -> dict[str, Any]:
    """The demo on ``settings``' servers and queue (a queue of its own: it is removed at the end)."""
    rng = random.Random(7)
    started = time.perf_counter()
    echo("starting 2 worker processes ...")
    workers = _start_workers(settings, 2)
    try:
        session, document, stats = _write_and_restore(settings, rng, echo)
    finally:
        echo("stopping the workers and removing the demo's queue ...")
        _stop_workers(workers)
        _remove_queue(settings)
    elapsed = time.perf_counter() - started
    echo(f"\nrestored session {session.name} ({session.id}):")
    echo(_summary(document))
    echo("\nas JSON (perth-pipeline restore prints the same):")
    echo(json.dumps(document, indent=2)[:1500] + "\n  ...")
    keys = ["submitted", "coalesced", "enqueued_jobs", "enqueued_ops", "committed_jobs", "dropped_jobs"]
    echo("\ncounters: " + "  ".join(f"{k}={stats[k]}" for k in keys))
    echo(
        f"{stats['submitted']} write calls became {stats['enqueued_ops']} operations in "
        f"{stats['enqueued_jobs']} jobs; done in {elapsed:.1f} s"
    )
    echo(_next_steps(session))
    return {"document": document, "stats": stats, "seconds": elapsed}


def _write_and_restore(
    settings: Settings, rng: random.Random, echo: Callable[[str], None]
) -> tuple[SessionRecord, dict[str, Any], dict[str, Any]]:
    with PersistenceManager(settings=settings) as manager:
        earlier = [s for s in manager.list_sessions() if s.name in SESSION_NAMES]
        if earlier:
            echo(f"replacing the {len(earlier)} sessions of an earlier demo ...")
        for old in earlier:
            manager.delete_session(old.id)
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
        if not manager.flush(timeout=30.0):
            raise click.ClickException("the workers did not commit the demo's writes within 30 s")
        return sessions[0], session_document(manager, sessions[0].id), manager.stats()


def _next_steps(session: SessionRecord) -> str:
    steps = [
        ("perth-pipeline sessions", "the stored sessions: " + ", ".join(SESSION_NAMES)),
        ("perth-pipeline status", "queue, workers, backends"),
        ("perth-pipeline up", "workers, dashboard and scheduler, until Ctrl-C"),
        ('eval "$(perth-pipeline env)"', "this stack's URLs in your shell, for your own scripts"),
    ]
    width = max(len(command) for command, _ in steps)
    return "\n".join(
        [
            "\nnext, try:",
            f"  # {session.name} again (--format kdl: as a zellij layout)",
            f"  perth-pipeline restore {session.name}",
            *(f"  {command:<{width}}  # {what}" for command, what in steps),
        ]
    )


def _remove_queue(settings: Settings) -> None:
    """Remove the demo's queue from Redis: its jobs, RQ's registries, our keys (all name it).

    One scan of the keyspace: fine for a demo, not a tool for a production Redis.
    """
    import redis

    from ..broker import make_redis

    client = make_redis(settings.redis_url or "", connect_timeout=2.0, socket_timeout=10.0)
    name = settings.queue
    try:
        keys = [k.decode() for k in client.scan_iter(count=1000)]
        # job hashes (rq:job:<id>) are named by id: theirs name the queue in their origin
        job_keys = [k for k in keys if k.startswith("rq:job:") and k.count(":") == 2]
        with client.pipeline(transaction=False) as pipe:
            for key in job_keys:
                pipe.hget(key, "origin")
            origins = pipe.execute(raise_on_error=False)
        ours = {name.encode()}
        ids = {k.split(":")[2] for k, origin in zip(job_keys, origins, strict=True) if origin in ours}
        # rq:queue:<name>, rq:wip:<name>..., perth:<name>:..., and rq:job:<id>, rq:results:<id>...
        doomed = [k for k in keys if {name, *ids}.intersection(k.split(":"))]
        for start in range(0, len(doomed), 500):
            client.delete(*doomed[start : start + 500])
        client.srem("rq:queues", f"rq:queue:{name}")
    except redis.RedisError as exc:
        click.echo(f"warning: the demo's queue {name} was not removed: {exc}", err=True)
    finally:
        client.close()


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
            if pane.pane_type != "terminal" and roll < 0.7:
                roll = 0.7 + roll * 0.25 / 0.7  # a command's pane keeps its title and cwd: scrollback
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
