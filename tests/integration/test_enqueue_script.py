"""The shipped enqueue script (perth_pipeline/lua/enqueue.lua) against the Python producer: same job on Redis.

A batch the Python producer enqueued through RQ and the same batch (another id) enqueued with the
script leave the same keys, fields, types and TTLs; a burst worker applies both alike, files both in
the finished registry and settles the outstanding sets that restores wait on.
"""

from __future__ import annotations

import json
import re
import uuid
import zlib
from typing import Any

import pytest
import redis
from rq.registry import FinishedJobRegistry

from perth_pipeline import PersistenceManager, TemplateRecord
from perth_pipeline.broker import Keys, make_queue
from perth_pipeline.protocol import enqueue_args, enqueue_keys, run_enqueue
from perth_pipeline.settings import Settings
from workers.worker import PerthJob

from ..helpers import drain, pane, session, tab, wait_for

_STAMP = re.compile(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def _job_hash(rconn: redis.Redis, job_id: str) -> dict[str, bytes]:
    return {k.decode(): v for k, v in rconn.hgetall(f"rq:job:{job_id}").items()}


def _script_args(settings: Settings, job_id: str, data: bytes, description: str) -> list[Any]:
    return enqueue_args(
        settings.queue,
        job_id,
        data,
        description,
        timeout=settings.job_timeout,
        result_ttl=settings.result_ttl,
        failure_ttl=settings.failed_ttl,
        retry_intervals=settings.retry_intervals,
    )


def _python_job(settings: Settings, rconn: redis.Redis) -> tuple[PersistenceManager, str, Any]:
    """A session with a tab and a pane written by the Python producer, enqueued and not applied."""
    s = session("both")
    t = tab(s.id)
    manager = PersistenceManager(settings=settings)
    manager.create_session(s)
    manager.create_tab(t)
    manager.create_pane(pane(t.id, 1))
    queue_key = f"rq:queue:{settings.queue}"
    ids = wait_for(lambda: manager.flush(timeout=0.05) or rconn.lrange(queue_key, 0, -1), what="the job")
    assert len(ids) == 1
    return manager, ids[0].decode(), s


def _same_batch_other_id(packed: bytes, old_id: str, new_id: str) -> bytes:
    plain = zlib.decompress(packed)
    assert plain.count(old_id.encode()) == 1  # the batch's id (the job's id is not in its data)
    return zlib.compress(plain.replace(old_id.encode(), new_id.encode()), 1)


def test_a_job_of_the_script_is_the_python_producers_job(settings: Settings, rconn: redis.Redis) -> None:
    manager, py_id, s = _python_job(settings, rconn)
    try:
        py_hash = _job_hash(rconn, py_id)
        lua_id = str(uuid.uuid4())
        data = _same_batch_other_id(py_hash["data"], py_id, lua_id)
        keys = enqueue_keys(settings.queue, lua_id, [s.id])
        args = _script_args(settings, lua_id, data, py_hash["description"].decode())
        assert run_enqueue(rconn, keys, args) == 1
        lua_hash = _job_hash(rconn, lua_id)

        # the same fields, and the same values but for the two timestamps and the batch id
        assert sorted(lua_hash) == sorted(py_hash)
        for name in ("created_at", "enqueued_at"):
            assert _STAMP.match(lua_hash[name]) and _STAMP.match(py_hash[name])
        differ = {"created_at", "enqueued_at", "data"}
        assert {k: v for k, v in lua_hash.items() if k not in differ} == {
            k: v for k, v in py_hash.items() if k not in differ
        }
        assert json.loads(zlib.decompress(lua_hash["data"]).replace(lua_id.encode(), py_id.encode())) == (
            json.loads(zlib.decompress(py_hash["data"]))
        )
        for job_id in (py_id, lua_id):
            assert rconn.type(f"rq:job:{job_id}") == b"hash" and rconn.ttl(f"rq:job:{job_id}") == -1
        assert rconn.lrange(f"rq:queue:{settings.queue}", 0, -1) == [py_id.encode(), lua_id.encode()]
        assert f"rq:queue:{settings.queue}".encode() in rconn.smembers("rq:queues")
        outstanding = Keys(settings.queue).outstanding(s.id)
        assert set(rconn.zrange(outstanding, 0, -1)) == {py_id.encode(), lua_id.encode()}
        assert settings.failed_ttl - 5 <= rconn.ttl(outstanding) <= settings.failed_ttl

        # RQ reads both back alike
        queue = make_queue(settings.queue, rconn, job_class=PerthJob)
        py_job, lua_job = (
            PerthJob.fetch(i, connection=rconn, serializer=queue.serializer) for i in (py_id, lua_id)
        )
        for attr in ("origin", "timeout", "result_ttl", "failure_ttl", "retries_left", "retry_intervals"):
            assert getattr(lua_job, attr) == getattr(py_job, attr), attr
        assert lua_job.get_status() == py_job.get_status() == "queued"
        assert lua_job.refusal() is None and lua_job.args[0]["id"] == lua_id

        # the worker applies both, files both as finished, and restores no longer wait for either
        assert drain(settings)
        finished = FinishedJobRegistry(settings.queue, connection=rconn)
        assert {py_id, lua_id} <= set(finished.get_job_ids())
        after_py, after_lua = _job_hash(rconn, py_id), _job_hash(rconn, lua_id)
        assert after_py["status"] == after_lua["status"] == b"finished"
        assert sorted(after_py) == sorted(after_lua)
        assert rconn.zcard(outstanding) == 0
        assert manager.flush(timeout=5)
        tree = manager.restore_session_tree(s.id, wait=0)
        assert tree.session == s and len(tree.tabs) == 1
    finally:
        manager.close(timeout=2)


def test_the_script_enqueues_a_job_once_and_its_data_may_be_uncompressed(
    settings: Settings, rconn: redis.Redis
) -> None:
    s = session("plain")
    job_id = str(uuid.uuid4())
    op = {"op": "session.upsert", "version": 1, "record": s.model_dump(mode="json")}
    created = s.created_at.isoformat()
    batch = {"format": 2, "id": job_id, "origin": "lua-test", "created_at": created, "ops": [op]}
    data = json.dumps(["workers.jobs.apply_batch", None, [batch], {}]).encode()
    keys, args = enqueue_keys(settings.queue, job_id, [s.id]), _script_args(settings, job_id, data, "one")
    assert run_enqueue(rconn, keys, args) == 1
    assert run_enqueue(rconn, keys, [*args[:3], "again", *args[4:]]) == 0  # sent again: nothing changes
    assert rconn.llen(f"rq:queue:{settings.queue}") == 1
    assert _job_hash(rconn, job_id)["description"] == b"one"
    assert drain(settings)
    assert _job_hash(rconn, job_id)["status"] == b"finished"
    with PersistenceManager(settings=settings) as manager:
        assert manager.restore_session(s.id, wait=0) == s


def test_a_batch_of_templates_only_touches_no_session(settings: Settings, rconn: redis.Redis) -> None:
    template = TemplateRecord(id=uuid.uuid4(), name="dev", definition={"tabs": [{"name": "editor"}]})
    job_id = str(uuid.uuid4())
    op = {"op": "template.upsert", "version": 1, "record": template.model_dump(mode="json")}
    created = "2026-01-01T00:00:00Z"
    batch = {"format": 2, "id": job_id, "origin": "lua-test", "created_at": created, "ops": [op]}
    data = zlib.compress(json.dumps(["workers.jobs.apply_batch", None, [batch], {}]).encode())
    keys = enqueue_keys(settings.queue, job_id, [])
    assert len(keys) == 3
    assert run_enqueue(rconn, keys, _script_args(settings, job_id, data, "templates")) == 1
    assert drain(settings)
    assert _job_hash(rconn, job_id)["status"] == b"finished"
    with PersistenceManager(settings=settings) as manager:
        assert manager.get_template("dev") == template


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda k, a: (k, ["NOT-A-UUID", *a[1:]]), "ARGV[1]"),
        (lambda k, a: (k, [a[0], "bad queue", *a[2:]]), "ARGV[2]"),
        (lambda k, a: (k, [*a[:4], 0, *a[5:]]), "ARGV[5]"),
        (lambda k, a: (k, [*a[:7], '{"a": 1}']), "ARGV[8]"),
        (lambda k, a: ([*k, "rq:queue:other"], a), "KEYS[5]"),
        (lambda k, a: (["rq:queue:other", *k[1:]], a), "KEYS[1]"),
        (lambda k, a: ([*k[:3], "perth:other:outstanding:x"], a), "KEYS[4]"),
    ],
)
def test_the_script_refuses_arguments_that_break_its_rules_and_writes_nothing(
    settings: Settings, rconn: redis.Redis, change: Any, named: str
) -> None:
    job_id = str(uuid.uuid4())
    keys = enqueue_keys(settings.queue, job_id, [uuid.uuid4()])
    args = _script_args(settings, job_id, b"x", "d")
    bad_keys, bad_args = change(keys, args)
    with pytest.raises(redis.ResponseError, match=re.escape(named)):
        run_enqueue(rconn, bad_keys, bad_args)
    assert not rconn.exists(*keys[:2], *keys[3:])
