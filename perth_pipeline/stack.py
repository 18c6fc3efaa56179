"""``perth-pipeline up``: the Procfile's processes under honcho, with the backends in their environment.

The command line starts the embedded servers first when no URLs are set (and
stops them when this returns). honcho runs each Procfile line in a shell of its
own process group; Ctrl-C (or SIGTERM) makes it send SIGTERM to every group,
then SIGKILL to what is left after a few seconds, so nothing it started outlives
it: a worker finishes the batch in hand, the dashboard stops at once.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from importlib import resources
from pathlib import Path

from .logs import mask_secrets
from .settings import Settings

__all__ = ["find_procfile", "run_stack"]


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


def run_stack(settings: Settings, procfile: Path | None = None) -> int:
    """Run every process of the Procfile until one stops or Ctrl-C; returns honcho's exit code."""
    from honcho.environ import parse_procfile
    from honcho.manager import Manager
    from honcho.printer import Printer

    processes = parse_procfile(find_procfile(procfile)).processes
    if not processes:
        print("perth-pipeline up: the Procfile has no processes", file=sys.stderr)
        return 2
    env = stack_environment(settings)
    # where Perth (or `perth-pipeline status` in another terminal) finds this stack
    print(
        mask_secrets(
            f"perth-pipeline up: REDIS_URL={env['REDIS_URL']} DATABASE_URL={env['DATABASE_URL']}"
            f" PERTH_QUEUE={settings.queue}"
        ),
        flush=True,
    )
    manager = Manager(Printer(sys.stdout))
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
    manager.loop()
    return int(manager.returncode or 0)
