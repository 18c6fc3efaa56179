"""Running workers: one in this process, or N supervised processes that are restarted when they crash."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

import redis

from perth_pipeline.broker import make_queue, make_redis
from perth_pipeline.logs import configure_logging
from perth_pipeline.masking import first_line, mask_url, masked_logger
from perth_pipeline.settings import Settings

from .worker import PerthJob, PerthWorker

__all__ = ["Supervisor", "main", "run_worker", "wait_for_redis"]

logger = masked_logger("workers.runner")

_PR_SET_PDEATHSIG = 1
_registered: set[int] = set()  # processes that registered the fork hook (it is not undone)


def _forked_children_die_with_this_process() -> None:
    """Make any child forked from here (RQ's scheduler) die when this worker process dies.

    RQ forks its scheduler from the worker, and the fork inherits the worker's Redis socket.
    If the worker is SIGKILLed, the orphaned scheduler keeps that socket open, so Redis never
    sees the worker go: its pending BLMOVE stays blocked and swallows the next batch into the
    intermediate queue, where it waits a minute and more for RQ's clean-up. Linux only.
    """
    if not sys.platform.startswith("linux") or os.getpid() in _registered:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    forking = [0]

    def before() -> None:
        forking[0] = os.getpid()

    def in_child() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != forking[0]:  # the parent died between the fork and the prctl
            os._exit(0)

    os.register_at_fork(before=before, after_in_child=in_child)
    _registered.add(os.getpid())


#: Allocations (of container objects) between two young-generation collections in a worker process.
GC_YOUNG_THRESHOLD = 100_000


def _tune_gc() -> None:
    """Collect garbage far less often: a worker allocates in bursts that it frees in one go.

    A batch of 1,000 operations is about 20,000 objects (models, dicts, UUIDs, rows) that live
    until the batch is applied, then go at once by reference counting (they hold no cycles).
    With CPython's default threshold (700) they are traversed by a young collection every 700
    allocations, survive, are promoted, and soon make a full collection walk the whole heap: a
    tenth to a quarter of a worker's CPU, measured. A young collection every 100,000 allocations,
    and the start-up objects (modules, classes) frozen out of the full collections, leave cycles
    (exceptions, RQ's own) collected all the same, a little later.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


#: While Redis is unreachable at start, it is tried again after 1 s, then 2 s, 4 s... at most this.
REDIS_RETRY_MAX = 30.0


class _StopSignals:
    """SIGTERM and SIGINT set a flag while the worker waits for Redis (RQ's handlers come later)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def sleep(self, seconds: float) -> bool:
        """Sleep ``seconds``, or less if a stop signal comes: whether one came."""
        deadline = time.monotonic() + seconds
        while self.received is None and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(0.1, left))
        return self.received is not None


def _ping(client: redis.Redis) -> BaseException | None:
    try:
        client.ping()
    except redis.RedisError as exc:
        return exc
    return None


def wait_for_redis(url: str, *, burst: bool = False) -> bool:
    """Whether Redis answers; if not, one warning, then retries with back-off until it does.

    False when a stop signal (SIGTERM, SIGINT) came while waiting, or at once in burst mode.
    A worker that cannot reach Redis at start neither fails nor spins: it waits, as it waits
    for PostgreSQL (:meth:`workers.worker.PerthWorker._wait_for_database`).
    """
    client = make_redis(url, connect_timeout=1.0, socket_timeout=2.0)
    try:
        error = _ping(client)
        if error is None:
            return True
        then = "exiting (--burst)" if burst else "waiting for it (retrying with back-off)"
        logger.warning("Redis unreachable at %s (%s); %s", mask_url(url), first_line(error), then)
        if burst:
            return False
        down_since, delay = time.monotonic(), 1.0
        with _StopSignals() as stop:
            while not stop.sleep(delay):
                error = _ping(client)
                if error is None:
                    logger.info("Redis reachable after %.1f s; starting", time.monotonic() - down_since)
                    return True
                delay = min(delay * 2, REDIS_RETRY_MAX)
                logger.debug("Redis still unreachable (%s); next try in %.0f s", first_line(error), delay)
        logger.info("stopped while waiting for Redis (signal %d)", stop.received)
        return False
    finally:
        client.close()


def run_worker(settings: Settings, *, burst: bool = False, with_scheduler: bool = True) -> bool:
    """Run one worker in this process until it is stopped (or, with ``burst``, the queue is empty).

    Redis unreachable at start: the worker waits for it (see :func:`wait_for_redis`); stopped
    while waiting, it returns False; in burst mode it exits with status 1.
    """
    if not settings.redis_url or not settings.database_url:
        raise SystemExit("workers need REDIS_URL and DATABASE_URL")
    if not wait_for_redis(settings.redis_url, burst=burst):
        if burst:
            raise SystemExit(1)
        return False
    # the worker blocks on BLMOVE for a few seconds at a time: its read timeout is longer than that
    connection = make_redis(settings.redis_url, connect_timeout=5.0, socket_timeout=30.0)
    queue = make_queue(settings.queue, connection, job_class=PerthJob)
    worker = PerthWorker([queue], settings=settings, connection=connection)
    _forked_children_die_with_this_process()
    _tune_gc()
    # RQ's own per-job lines are replaced by one structured line per batch (workers.jobs)
    return bool(worker.work(burst=burst, with_scheduler=with_scheduler, logging_level="WARNING"))


#: A child that ran at least this long before it died is restarted as if it had never failed.
STABLE_AFTER = 60.0


def restart_delay(failures: int) -> float:
    """Seconds before a child is restarted after its ``failures``-th quick death in a row."""
    return min(30.0, 0.5 * (1 << min(max(failures, 1), 6)))


class Supervisor:
    """N worker processes; a child that dies is restarted (with back-off); SIGTERM/SIGINT stop all.

    Restarts are scheduled, never slept for: the loop keeps watching the other children and
    answers a stop signal at once. The back-off grows with quick deaths in a row and starts
    over once a child has run for :data:`STABLE_AFTER` seconds.
    """

    def __init__(self, processes: int, *, burst: bool = False, env: dict[str, str] | None = None) -> None:
        self.processes = processes
        self.burst = burst
        self.env = env
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._started: dict[int, float] = {}
        self._due: dict[int, float] = {}  # slot -> when its restart is due
        self._stopping = False
        self._restarts: dict[int, int] = {}  # slot -> quick deaths in a row

    def _spawn(self, slot: int) -> None:
        args = [sys.executable, "-m", "workers"]
        if self.burst:
            args.append("--burst")
        # a session (and process group) of its own: what a dead child leaves behind is reaped with it
        self._children[slot] = subprocess.Popen(args, env=self.env, start_new_session=True)
        self._started[slot] = time.monotonic()

    @staticmethod
    def _reap_group(child: subprocess.Popen[bytes]) -> None:
        """Kill whatever is left of an exited child's process group (an orphaned RQ scheduler)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self._due.clear()
        if self._stopping:
            for child in self._children.values():
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)  # a second signal: cold shutdown of the children
            return
        self._stopping = True
        logger.info("stopping %d workers", len(self._children))
        for child in self._children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    def _exited(self, slot: int, code: int) -> None:
        if self._stopping or (self.burst and code == 0):
            return
        now = time.monotonic()
        if now - self._started.get(slot, now) >= STABLE_AFTER:
            self._restarts[slot] = 0
        failures = self._restarts.get(slot, 0) + 1
        self._restarts[slot] = failures
        delay = restart_delay(failures)
        logger.warning(
            "worker process exited with %s; restarting in %.1f s",
            code,
            delay,
            extra={"slot": slot, "failures_in_a_row": failures},
        )
        self._due[slot] = now + delay

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        # the children have sessions of their own: a closed terminal reaches them through here
        signal.signal(signal.SIGHUP, self._stop)
        for slot in range(self.processes):
            self._spawn(slot)
        while self._children or self._due:
            for slot, child in list(self._children.items()):
                code = child.poll()
                if code is None:
                    continue
                del self._children[slot]
                self._reap_group(child)
                self._exited(slot, code)
            now = time.monotonic()
            for slot, due in list(self._due.items()):
                if due <= now and not self._stopping:
                    del self._due[slot]
                    self._spawn(slot)
            time.sleep(0.2)
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers", description="one perth-pipeline worker")
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    parser.add_argument("--no-scheduler", action="store_true", help="do not run RQ's scheduler for retries")
    args = parser.parse_args(argv)
    configure_logging(os.environ.get("PERTH_LOG_LEVEL", "INFO"), os.environ.get("PERTH_LOG_FORMAT", "text"))
    run_worker(Settings.from_env(), burst=args.burst, with_scheduler=not args.no_scheduler)
    return 0
