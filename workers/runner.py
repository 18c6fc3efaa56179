"""Running workers: one in this process, or N supervised processes that are restarted when they crash."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

from perth_pipeline.broker import make_queue, make_redis
from perth_pipeline.logs import configure_logging
from perth_pipeline.settings import Settings

from .worker import PerthJob, PerthWorker

__all__ = ["Supervisor", "main", "run_worker"]

logger = logging.getLogger("workers.runner")


def run_worker(settings: Settings, *, burst: bool = False, with_scheduler: bool = True) -> bool:
    """Run one worker in this process until it is stopped (or, with ``burst``, the queue is empty)."""
    if not settings.redis_url or not settings.database_url:
        raise SystemExit("workers need REDIS_URL and DATABASE_URL")
    # the worker blocks on BLMOVE for a few seconds at a time: its read timeout is longer than that
    connection = make_redis(settings.redis_url, connect_timeout=5.0, socket_timeout=30.0)
    queue = make_queue(settings.queue, connection, job_class=PerthJob)
    worker = PerthWorker([queue], settings=settings, connection=connection)
    # RQ's own per-job lines are replaced by one structured line per batch (workers.jobs)
    return bool(worker.work(burst=burst, with_scheduler=with_scheduler, logging_level="WARNING"))


class Supervisor:
    """N worker processes; a child that dies is restarted (with back-off); SIGTERM/SIGINT stop all."""

    def __init__(self, processes: int, *, burst: bool = False, env: dict[str, str] | None = None) -> None:
        self.processes = processes
        self.burst = burst
        self.env = env
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._stopping = False
        self._restarts: dict[int, int] = {}

    def _spawn(self, slot: int) -> None:
        args = [sys.executable, "-m", "workers"]
        if self.burst:
            args.append("--burst")
        self._children[slot] = subprocess.Popen(args, env=self.env)

    def _stop(self, signum: int, frame: FrameType | None) -> None:
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

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        for slot in range(self.processes):
            self._spawn(slot)
        while self._children:
            for slot, child in list(self._children.items()):
                code = child.poll()
                if code is None:
                    continue
                del self._children[slot]
                if self._stopping or (self.burst and code == 0):
                    continue
                restarts = self._restarts.get(slot, 0) + 1
                self._restarts[slot] = restarts
                delay = min(30.0, 0.5 * 2 ** min(restarts, 6))
                logger.warning(
                    "worker process exited with %s; restarting in %.1f s", code, delay, extra={"slot": slot}
                )
                time.sleep(delay)
                if not self._stopping:
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
