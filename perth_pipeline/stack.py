"""``perth-pipeline up``: the Procfile's processes under honcho, with the backends in their environment.

The command line starts the embedded servers first when no URLs are set (and
stops them when this returns). honcho runs each Procfile line in a shell of its
own process group; Ctrl-C (or SIGTERM) makes it send SIGTERM to every group,
then SIGKILL to what is left after a few seconds, so nothing it started outlives
it: a worker finishes the batch in hand, the dashboard stops at once. Its lines
say what happened in words ("worker stopped", "worker failed (exit code 1)"),
not honcho's return codes.

One ``up`` runs per data directory: :class:`StackLock` holds a lock file there
for as long as it runs, which says where the stack is to a second ``up``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import sys
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from .embedded import pid_alive
from .logs import mask_secrets
from .settings import Settings

__all__ = ["StackLock", "StackRunning", "find_procfile", "run_stack", "stack_processes"]


class StackRunning(Exception):
    """Another ``up`` runs on this data directory; the message says where."""


class StackLock:
    """One ``up`` per data directory: a lock (``flock``) on ``up.lock`` held while it runs.

    The kernel lets the lock go when its holder dies, so a stale file never blocks: liveness
    is the lock itself. The file's text (JSON: pid, the masked URLs, the queue, the dashboard)
    is what a second ``up`` shows. The file is never removed (a lock on a removed file would
    let two holders in), only emptied.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / "up.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 65536, 0).decode(errors="replace")
            os.close(fd)
            raise StackRunning(self._running_message(text)) from None
        self._fd = fd
        self.describe({"pid": os.getpid()})

    def describe(self, info: Mapping[str, Any]) -> None:
        """Say where this stack is, for a second ``up`` to show (no secrets: URLs come masked)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, json.dumps(dict(info)).encode(), 0)

    def release(self) -> None:
        import fcntl

        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
                # processes forked from this one (honcho's) share the lock: let it go for all
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def _running_message(self, text: str) -> str:
        try:
            info = json.loads(text)
        except ValueError:
            info = {}
        pid = info.get("pid")
        who = f"pid {pid}" if pid else "starting"
        lines = [f"perth-pipeline up is already running on {self.data_dir} ({who}):"]
        keys = ("REDIS_URL", "DATABASE_URL", "PERTH_QUEUE")
        lines += [f"  {key}={info[key]}" for key in keys if info.get(key)]
        if info.get("dashboard"):
            lines.append(f"  dashboard: {info['dashboard']}")
        if isinstance(pid, int) and not pid_alive(pid):
            # killed with SIGKILL: honcho's helpers (forked from it) and what they run hold the lock
            lines.append(f"pid {pid} is gone, but processes it started still run: `fuser -v {self.path}`")
            stop = "stop them first"
        else:
            stop = f"stop it first (Ctrl-C in its terminal, or kill {pid})" if pid else "stop it first"
        lines.append(f"Use it, {stop}, or run this one with another PERTH_DATA_DIR.")
        return "\n".join(lines)


def find_procfile(explicit: Path | None = None) -> str:
    """The Procfile's text: the given path, ./Procfile, or the one shipped with the package."""
    if explicit is not None:
        return explicit.read_text(encoding="utf-8")
    local = Path.cwd() / "Procfile"
    if local.is_file():
        return local.read_text(encoding="utf-8")
    packaged = resources.files("perth_pipeline").joinpath("Procfile")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    checkout = Path(__file__).resolve().parent.parent / "Procfile"
    return checkout.read_text(encoding="utf-8")


def stack_environment(settings: Settings, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of the Procfile's processes: ours, with the backends and this Python's scripts."""
    env = dict(os.environ if base is None else base)
    env.update(
        {
            "REDIS_URL": settings.redis_url or "",
            "DATABASE_URL": settings.database_url or "",
            "PERTH_QUEUE": settings.queue,
            "PYTHONUNBUFFERED": "1",
        }
    )
    # the Procfile's commands are this environment's: put its scripts first on PATH
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _dashboard_missing(command: str, path: str) -> bool:
    """Whether ``command`` runs rq-dashboard (itself, or ours around it) and it is not installed."""
    if "perth-pipeline dashboard" in command:
        return importlib.util.find_spec("rq_dashboard") is None
    return "rq-dashboard" in command and shutil.which("rq-dashboard", path=path) is None


#: Exit statuses that mean "stopped as asked": 0, killed by SIGTERM or SIGINT, or a shell's 128+N for them.
_STOPPED = {0, -signal.SIGTERM, -signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGINT}


class _Lines:
    """honcho's printer, its own lines said in words: "worker stopped", not "worker stopped (rc=-15)".

    A process that honcho was asking to stop and that stopped is "stopped"; one that exited by
    itself with a non-zero status (or was killed by another signal) "failed", and is counted.
    """

    _SENDING = re.compile(r"sending (SIGTERM|SIGKILL) to (\S+) \(pid (\d+)\)\n")
    _STOP = re.compile(r"(\S+) stopped \(rc=(-?\d+)\)\n")

    def __init__(self, printer: Any) -> None:
        self.printer = printer
        self.asked: set[str] = set()
        self.killed: set[str] = set()
        self.failures: list[str] = []

    @property
    def width(self) -> int:
        return int(self.printer.width)

    @width.setter
    def width(self, value: int) -> None:
        self.printer.width = value

    def write(self, message: Any) -> None:
        if message.type == "line" and message.name == "system":
            message = message._replace(data=self.reword(message.data))
        self.printer.write(message)

    def reword(self, data: str) -> str:
        sending = self._SENDING.fullmatch(data)
        if sending:
            how, name, pid = sending.groups()
            if how == "SIGKILL":
                self.killed.add(name)
                return f"{name} did not stop in time: killing it (pid {pid})\n"
            self.asked.add(name)
            return f"stopping {name} (pid {pid})\n"
        stop = self._STOP.fullmatch(data)
        if not stop:
            return data
        name, code = stop[1], int(stop[2])
        if name in self.killed:
            return f"{name} killed\n"
        if name in self.asked and code in _STOPPED:
            return f"{name} stopped\n"
        if code == 0:
            return f"{name} exited\n"
        what = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        self.failures.append(f"{name} ({what})")
        return f"{name} failed ({what})\n"


def select_processes(
    processes: Mapping[str, str], names: Sequence[str] = (), concurrency: Mapping[str, int] | None = None
) -> dict[str, str]:
    """The processes to run, as ``honcho start NAME... -c NAME=N`` picks them: NAME.1, NAME.2... for N > 1.

    Raises ValueError naming an unknown process.
    """
    counts = dict(concurrency or {})
    unknown = sorted({*names, *counts} - set(processes))
    if unknown:
        raise ValueError(f"no process {', '.join(unknown)} in the Procfile (it has {', '.join(processes)})")
    chosen: dict[str, str] = {}
    for name, command in processes.items():
        if names and name not in names:
            continue
        count = counts.get(name, 1)
        for n in range(count):
            chosen[name if count == 1 else f"{name}.{n + 1}"] = command
    return chosen


def _dashboard_url(processes: Mapping[str, str], env: Mapping[str, str]) -> str | None:
    if not any("dashboard" in command for command in processes.values()):
        return None
    return f"http://{env.get('RQ_DASHBOARD_BIND', '127.0.0.1')}:{env.get('RQ_DASHBOARD_PORT', '9181')}"


def stack_processes(
    procfile: Path | None = None, names: Sequence[str] = (), concurrency: Mapping[str, int] | None = None
) -> dict[str, str]:
    """The Procfile's processes to run: those named (all if none), each as many times as asked.

    Raises ValueError for an unknown name or a Procfile without processes.
    """
    from honcho.environ import parse_procfile

    processes = select_processes(parse_procfile(find_procfile(procfile)).processes, names, concurrency)
    if not processes:
        raise ValueError("the Procfile has no processes")
    return processes


def run_stack(settings: Settings, processes: Mapping[str, str], lock: StackLock | None = None) -> int:
    """Run ``processes`` (from :func:`stack_processes`) under honcho until one stops or Ctrl-C.

    Returns honcho's exit code: 130 after SIGINT, 143 after SIGTERM; a process that failed makes
    it non-zero.
    """
    from honcho.manager import Manager
    from honcho.printer import Printer

    env = stack_environment(settings)
    # where Perth (or `perth-pipeline status` in another terminal) finds this stack
    where = {
        "REDIS_URL": mask_secrets(env["REDIS_URL"]),
        "DATABASE_URL": mask_secrets(env["DATABASE_URL"]),
        "PERTH_QUEUE": settings.queue,
    }
    print("perth-pipeline up: " + " ".join(f"{k}={v}" for k, v in where.items()), flush=True)
    lines = _Lines(Printer(sys.stdout))
    manager = Manager(lines)
    for name, command in processes.items():
        if _dashboard_missing(command, env["PATH"]):
            # honcho stops the whole stack when one process exits: leave it out rather than fail
            print(
                f"perth-pipeline up: {name} left out: rq-dashboard is not installed "
                "(pip install 'perth-pipeline[dashboard]')",
                file=sys.stderr,
                flush=True,
            )
            continue
        manager.add_process(name, command, env=env, cwd=os.getcwd())
    if lock is not None:
        dashboard = _dashboard_url(processes, env)
        lock.describe({"pid": os.getpid(), **where, **({"dashboard": dashboard} if dashboard else {})})
    manager.loop()
    code = int(manager.returncode or 0)
    code = 128 - code if code < 0 else code  # killed by a signal: as a shell says it
    if lines.failures:
        print(f"perth-pipeline up: stopped; failed: {', '.join(lines.failures)}", flush=True)
        return code or 1
    print("perth-pipeline up: all processes stopped", flush=True)
    return code
