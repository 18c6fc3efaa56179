"""`perth-pipeline up`'s lifecycle on the test's servers: its lines, one per data directory,
`up worker` and `-c worker=N` as with honcho start."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from rq import Worker

from perth_pipeline.broker import make_queue
from perth_pipeline.settings import Settings

from ..helpers import cli_env, wait_for

ROOT = Path(__file__).resolve().parents[2]
SLEEPER = f"exec {sys.executable} -c 'import time; time.sleep(120)'"


class Up:
    """`perth-pipeline up ...` in a session of its own, its output collected as it comes."""

    def __init__(self, settings: Settings, data: Path, *args: str) -> None:
        env = cli_env(settings, PERTH_DATA_DIR=str(data), PYTHONUNBUFFERED="1", PERTH_LOG_LEVEL="WARNING")
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "perth_pipeline.cli", "up", *args],
            cwd=data.parent,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        stdout = self.proc.stdout
        assert stdout is not None
        self._reader = threading.Thread(
            target=lambda: self.lines.extend(iter(stdout.readline, "")), daemon=True
        )
        self._reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def started(self, *names: str) -> dict[str, int]:
        """The pids of ``names`` once honcho said each started."""

        def pids() -> dict[str, int]:
            assert self.proc.poll() is None, f"`up` exited with {self.proc.returncode}:\n{self.output}"
            found = dict(re.findall(r"(\S+) started \(pid=(\d+)\)", self.output))
            return {n: int(found[n]) for n in names} if all(n in found for n in names) else {}

        return wait_for(pids, 60.0, what=f"{names} to start")

    def finish(self) -> int:
        """Its exit code, once it exits by itself."""
        code = self.proc.wait(timeout=60)
        self._reader.join(timeout=10)
        return code

    def stop(self, signum: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signum)
        code = self.proc.wait(timeout=60)
        self._reader.join(timeout=10)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._reader.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def ups() -> Iterator[list[Up]]:
    made: list[Up] = []
    yield made
    for up in made:
        up.close()


def _lock_free(path: Path) -> bool:
    import fcntl

    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # and the lock with it
    return True


def _procfile(tmp_path: Path, text: str) -> str:
    path = tmp_path / "Procfile"
    path.write_text(text)
    return str(path)


@pytest.mark.timeout(120)
def test_stopping_up_ends_with_stopped_lines_not_return_codes(
    settings: Settings, tmp_path: Path, ups: list[Up]
) -> None:
    procfile = _procfile(tmp_path, f"one: {SLEEPER}\ntwo: {SLEEPER}\n")
    up = Up(settings, tmp_path / "data", "--procfile", procfile)
    ups.append(up)
    up.started("one", "two")
    assert up.stop(signal.SIGTERM) == 143
    out = up.output
    assert "rc=" not in out, out
    assert re.search(r"system \| one stopped\n", out) and re.search(r"system \| two stopped\n", out), out
    assert out.rstrip().endswith("perth-pipeline up: all processes stopped"), out


@pytest.mark.timeout(120)
def test_a_process_that_fails_is_reported_as_a_failure(
    settings: Settings, tmp_path: Path, ups: list[Up]
) -> None:
    failing = f"exec {sys.executable} -c 'import sys; sys.exit(3)'"
    procfile = _procfile(tmp_path, f"steady: {SLEEPER}\nbroken: {failing}\n")
    up = Up(settings, tmp_path / "data", "--procfile", procfile)
    ups.append(up)
    assert up.finish() == 3
    text = up.output
    assert "broken failed (exit code 3)" in text and "steady stopped" in text, text
    assert "perth-pipeline up: stopped; failed: broken (exit code 3)" in text and "rc=" not in text, text


@pytest.mark.timeout(120)
def test_a_second_up_on_the_same_data_dir_says_where_the_first_is_and_leaves_it_alone(
    settings: Settings, tmp_path: Path, ups: list[Up]
) -> None:
    procfile = _procfile(tmp_path, f"one: {SLEEPER}\n")
    data = tmp_path / "data"
    first = Up(settings, data, "--procfile", procfile)
    ups.append(first)
    [pid] = first.started("one").values()

    second = Up(settings, data, "--procfile", procfile)
    ups.append(second)
    assert second.finish() == 1
    message = second.output
    assert "already running" in message and f"pid {first.proc.pid}" in message, message
    assert f"PERTH_QUEUE={settings.queue}" in message and str(data) in message, message
    assert "one started" not in message
    # the first goes on, untouched
    assert first.proc.poll() is None and "stopping" not in first.output
    os.kill(pid, 0)
    assert first.stop() == 143
    # once it stopped, the data directory is free again
    third = Up(settings, data, "--procfile", procfile)
    ups.append(third)
    third.started("one")
    assert third.stop() == 143


def _registered(settings: Settings) -> set[int]:
    client = redis.Redis.from_url(settings.redis_url or "", socket_timeout=10)
    try:
        return {w.pid for w in Worker.all(queue=make_queue(settings.queue, client)) if w.pid}
    finally:
        client.close()


@pytest.mark.timeout(180)
def test_up_runs_the_named_processes_with_concurrency_and_the_workers_are_execed(
    settings: Settings, tmp_path: Path, ups: list[Up]
) -> None:
    up = Up(settings, tmp_path / "data", "--procfile", str(ROOT / "Procfile"), "-c", "worker=2", "worker")
    ups.append(up)
    pids = up.started("worker.1", "worker.2")
    # `exec` in the Procfile: the process honcho started is the worker itself, not a shell
    wait_for(lambda: _registered(settings) == set(pids.values()), 60.0, what="the two workers to register")
    assert "dashboard" not in up.output and "scheduler" not in up.output
    assert up.stop(signal.SIGINT) == 130
    out = up.output
    assert "worker.1 stopped" in out and "worker.2 stopped" in out and "rc=" not in out, out


def test_up_refuses_an_unknown_process_or_a_malformed_concurrency(settings: Settings, tmp_path: Path) -> None:
    env = cli_env(settings, PERTH_DATA_DIR=str(tmp_path / "data"))
    base = [sys.executable, "-m", "perth_pipeline.cli", "up", "--procfile", str(ROOT / "Procfile")]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [*base, *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)

    unknown = run("nosuch")
    assert unknown.returncode == 2 and "no process nosuch in the Procfile" in unknown.stderr, unknown.stderr
    malformed = run("-c", "worker")
    assert malformed.returncode == 2 and "PROCESS=NUMBER" in malformed.stderr, malformed.stderr


@pytest.mark.timeout(120)
def test_an_up_killed_outright_leaves_the_lock_to_what_still_runs_and_says_so(
    settings: Settings, tmp_path: Path, ups: list[Up]
) -> None:
    procfile = _procfile(tmp_path, f"one: {SLEEPER}\n")
    data = tmp_path / "data"
    first = Up(settings, data, "--procfile", procfile)
    ups.append(first)
    [pid] = first.started("one").values()
    try:
        first.proc.kill()  # `up` alone, SIGKILL: honcho's helpers and the process they run go on
        first.proc.wait(timeout=10)
        second = Up(settings, data, "--procfile", procfile)
        ups.append(second)
        assert second.finish() == 1
        assert f"pid {first.proc.pid} is gone, but processes it started still run" in second.output
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    # once they are gone too, the data directory is free
    wait_for(lambda: _lock_free(data / "up.lock"), 30.0, what="honcho's helpers to exit")
    third = Up(settings, data, "--procfile", procfile)
    ups.append(third)
    third.started("one")
    assert third.stop() == 143
