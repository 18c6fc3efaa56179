"""``perth-pipeline up``: the Procfile's processes under honcho, with the backends in their environment."""

from __future__ import annotations

import os
import sys
from importlib import resources
from pathlib import Path

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


def run_stack(settings: Settings, procfile: Path | None = None) -> int:
    from honcho.environ import parse_procfile
    from honcho.manager import Manager
    from honcho.printer import Printer

    processes = parse_procfile(find_procfile(procfile)).processes
    env = {
        **os.environ,
        "REDIS_URL": settings.redis_url or "",
        "DATABASE_URL": settings.database_url or "",
        "PERTH_QUEUE": settings.queue,
        "PYTHONUNBUFFERED": "1",
    }
    # the commands of the Procfile are this environment's: put its scripts first on PATH
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    manager = Manager(Printer(sys.stdout))
    for name, command in processes.items():
        manager.add_process(name, command, env=env, cwd=os.getcwd())
    manager.loop()
    return int(manager.returncode or 0)
