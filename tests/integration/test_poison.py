"""Poison jobs: anything on the queue that is not a valid batch of this project.

Each case is put on the queue directly (through RQ's API or raw Redis), with
retries configured, followed by a valid batch; one worker then works the queue.
Every poison job must end in the failed registry with a clear reason after a
single run (no retry), nothing it names may be imported or run, and the worker
must go on to apply the valid batch behind it.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import sys
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from rq import Queue, Retry
from rq.job import Callback, Job, JobStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.webhook import Webhook

from perth_pipeline.batch import JOB_FUNCTION
from perth_pipeline.broker import make_queue, make_redis
from perth_pipeline.operations import Batch, SessionUpsert
from perth_pipeline.settings import Settings
from perth_pipeline.wire import FORMAT_VERSION
from workers.worker import MAX_JOB_BYTES, PerthJob, PerthWorker

from ..helpers import now, session, tab

RETRY = Retry(max=3, interval=[1, 1, 1])


class Harness:
    """A queue of the test's own, a way to put anything on it, and one worker to work it."""

    def __init__(self, settings: Settings, rconn: redis.Redis, pg: psycopg.Connection[Any]) -> None:
        self.settings = settings
        self.redis = rconn
        self.pg = pg
        self.queue = Queue(settings.queue, connection=rconn, serializer=JSONSerializer)

    def enqueue(self, func: str = JOB_FUNCTION, args: Any = (), **options: Any) -> Job:
        options.setdefault("retry", RETRY)
        job = self.queue.create_job(func, args=args, **options)
        return self.queue.enqueue_job(job)

    def enqueue_data(self, data: bytes) -> Job:
        """A job whose stored data is exactly ``data`` (RQ keeps it zlib-compressed)."""
        job = self.queue.create_job(JOB_FUNCTION, args=({},), retry=RETRY)
        job.data = data
        return self.queue.enqueue_job(job)

    def valid_batch(self) -> tuple[Job, uuid.UUID]:
        record = session("after the poison")
        payload = Batch(
            id=uuid.uuid4(),
            origin="poison-test",
            created_at=now(),
            ops=[SessionUpsert(version=1, record=record)],
        ).model_dump(mode="json")
        return self.enqueue(args=(payload,)), record.id

    def work(self) -> bool:
        connection = make_redis(self.settings.redis_url or "", connect_timeout=2.0, socket_timeout=30.0)
        try:
            queue = make_queue(self.settings.queue, connection, job_class=PerthJob)
            worker = PerthWorker([queue], settings=self.settings, connection=connection)
            return bool(worker.work(burst=True, with_scheduler=False, logging_level="WARNING"))
        finally:
            connection.close()

    def fetch(self, job: Job) -> PerthJob:
        return PerthJob.fetch(job.id, connection=self.redis, serializer=JSONSerializer)

    def reason(self, job: Job, *, readable: bool = True) -> str:
        result = self.fetch(job).latest_result() if readable else None
        if result is not None and result.exc_string:
            return result.exc_string
        raw = self.redis.hget(Job.key_for(job.id), "exc_info")
        return zlib.decompress(raw).decode() if raw else ""

    def assert_refused(self, job: Job, *fragments: str) -> str:
        """Failed after one run, no retry left or scheduled, with a reason naming what was wrong."""
        assert job.id in FailedJobRegistry(queue=self.queue).get_job_ids()
        assert job.id not in ScheduledJobRegistry(queue=self.queue).get_job_ids()  # type: ignore[no-untyped-call]
        assert job.id not in self.queue.get_job_ids()
        stored = self.fetch(job)
        assert stored.get_status() == JobStatus.FAILED
        assert not stored.retries_left
        reason = self.reason(job)
        for fragment in fragments:
            assert fragment in reason, reason
        return reason

    def assert_kept_working(self, job: Job, session_id: uuid.UUID) -> None:
        assert self.fetch(job).get_status() == JobStatus.FINISHED
        assert self.pg.execute("SELECT name FROM sessions WHERE id = %s", (session_id,)).fetchone() == (
            "after the poison",
        )
        assert self.queue.count == 0


@pytest.fixture
def harness(settings: Settings, rconn: redis.Redis, pg: psycopg.Connection[Any]) -> Harness:
    return Harness(settings, rconn, pg)


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "side-effect-ran"
    yield path


def test_malformed_json_job_data(harness: Harness) -> None:
    poison = harness.enqueue_data(b'["workers.jobs.apply_batch", null, [{"format": 2,')
    valid, sid = harness.valid_batch()
    assert harness.work()
    harness.assert_refused(poison, "not JSON")
    harness.assert_kept_working(valid, sid)


def test_a_pickled_payload_is_never_unpickled(harness: Harness, marker: Path) -> None:
    class Evil:
        def __reduce__(self) -> Any:
            return (os.system, (f"touch {marker}",))

    pickled = Queue(harness.settings.queue, connection=harness.redis).create_job(  # RQ's default: pickle
        JOB_FUNCTION, args=({"format": 2},), retry=RETRY
    )
    harness.queue.enqueue_job(pickled)
    evil = harness.enqueue_data(pickle.dumps((JOB_FUNCTION, None, [Evil()], {})))
    valid, sid = harness.valid_batch()
    assert harness.work()
    harness.assert_refused(pickled, "not JSON", "no pickle")
    harness.assert_refused(evil, "not JSON")
    assert not marker.exists()
    harness.assert_kept_working(valid, sid)


@pytest.mark.parametrize(
    ("call", "why"),
    [
        (("os.system", ["touch {marker}"], {}), "refused job function 'os.system'"),
        (("subprocess.run", [["touch", "{marker}"]], {}), "refused job function 'subprocess.run'"),
        (("builtins.exec", ["open('{marker}', 'w')"], {}), "refused job function 'builtins.exec'"),
        ((JOB_FUNCTION, [], {}), "arguments do not fit"),
        ((JOB_FUNCTION, [{}], {"evil": 1}), "arguments do not fit"),
    ],
)
def test_functions_and_arguments_outside_the_allowlist(
    harness: Harness, marker: Path, call: tuple[str, Any, dict[str, Any]], why: str
) -> None:
    func, args, kwargs = call
    args = json.loads(json.dumps(args).replace("{marker}", str(marker)))
    poison = harness.enqueue(func, args=args, kwargs=kwargs)
    valid, sid = harness.valid_batch()
    assert harness.work()
    harness.assert_refused(poison, why)
    assert not marker.exists()
    harness.assert_kept_working(valid, sid)


def test_a_method_on_an_instance_is_refused(harness: Harness) -> None:
    poison = harness.enqueue_data(json.dumps(["keys", {"a": 1}, [], {}]).encode())
    valid, sid = harness.valid_batch()
    assert harness.work()
    harness.assert_refused(poison, "refused job function 'keys'")
    harness.assert_kept_working(valid, sid)


def test_a_module_named_by_a_job_is_never_imported(
    harness: Harness, marker: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = f"perth_side_effect_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\ndef run(*args, **kwargs):\n    return None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    poison = harness.enqueue(f"{module}.run", args=[1])
    callback = harness.enqueue(JOB_FUNCTION, args=[{}], on_failure=Callback(f"{module}.run"))
    valid, sid = harness.valid_batch()
    assert harness.work()
    harness.assert_refused(poison, f"refused job function '{module}.run'")
    harness.assert_refused(callback, "callback")
    assert module not in sys.modules
    assert not marker.exists(), "the module's import side effect ran"
    harness.assert_kept_working(valid, sid)


def test_callbacks_on_a_job_are_refused_before_it_runs(harness: Harness, marker: Path) -> None:
    record = session("never applied")
    payload = Batch(
        id=uuid.uuid4(), origin="poison-test", created_at=now(), ops=[SessionUpsert(version=1, record=record)]
    ).model_dump(mode="json")
    jobs = [
        harness.enqueue(args=[payload], on_success=Callback("os.system")),
        harness.enqueue(args=[payload], on_failure=Callback("os.system")),
        harness.enqueue(args=[payload], on_stopped=Callback("os.system")),
    ]
    valid, sid = harness.valid_batch()
    assert harness.work()
    for job in jobs:
        harness.assert_refused(job, "refused callback(s) 'os.system'")
    # refused before anything ran: the batch they carry was not applied
    assert harness.pg.execute("SELECT count(*) FROM sessions WHERE id = %s", (record.id,)).fetchone() == (0,)
    harness.assert_kept_working(valid, sid)


def test_webhooks_are_refused_and_never_called(harness: Harness) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/hook"
        poison = harness.enqueue(args=[{}], webhooks=[Webhook(url, job_status="failed")])
        valid, sid = harness.valid_batch()
        assert harness.work()
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    harness.assert_refused(poison, "webhook")
    harness.assert_kept_working(valid, sid)


def test_an_invalid_operation_is_refused_and_its_valid_neighbours_applied(
    harness: Harness, pg: psycopg.Connection[Any]
) -> None:
    s = session("neighbour")
    good, bad = tab(s.id, 0, name="good"), tab(s.id, 1, name="bad")
    payload = {
        "format": FORMAT_VERSION,
        "id": str(uuid.uuid4()),
        "origin": "poison-test",
        "created_at": now().isoformat(),
        "ops": [
            {"op": "session.upsert", "version": 1, "record": s.model_dump(mode="json")},
            {"op": "tab.upsert", "version": 2, "record": good.model_dump(mode="json")},
            {"op": "tab.upsert", "version": 3, "record": {**bad.model_dump(mode="json"), "position": -1}},
            {"op": "pane.explode", "version": 4},
        ],
    }
    poison = harness.enqueue(args=[payload])
    valid, sid = harness.valid_batch()
    assert harness.work()
    reason = harness.assert_refused(poison, "ops[2]", "position", "ops[3]", "2 valid operations were applied")
    assert "bad" not in reason.replace("batch", "")  # reasons name fields, never the values
    assert pg.execute("SELECT name FROM sessions WHERE id = %s", (s.id,)).fetchone() == ("neighbour",)
    assert pg.execute("SELECT name FROM tabs WHERE session_id = %s", (s.id,)).fetchall() == [("good",)]
    # the producer is told that sending these again cannot help
    assert harness.fetch(poison).meta.get("perth_refused")
    harness.assert_kept_working(valid, sid)


def test_oversize_payloads_are_refused_unread(harness: Harness) -> None:
    # 33 MiB of JSON that zlib stores in a few dozen KiB: refused before it is decompressed whole
    big = b'["workers.jobs.apply_batch", null, ["' + b"x" * (MAX_JOB_BYTES + (1 << 20)) + b'"], {}]'
    bomb = harness.enqueue_data(big)
    assert len(harness.redis.hget(Job.key_for(bomb.id), "data") or b"") < 1 << 20
    op = {"op": "session.delete", "version": 1, "id": str(uuid.uuid4())}
    too_many = {
        "format": FORMAT_VERSION,
        "id": str(uuid.uuid4()),
        "origin": "poison-test",
        "created_at": now().isoformat(),
        "ops": [op] * 10_001,
    }
    crowd = harness.enqueue(args=[too_many])
    valid, sid = harness.valid_batch()
    assert harness.work()
    harness.assert_refused(bomb, "over the limit", "not read")
    harness.assert_refused(crowd, "1 to 10000 operations")
    harness.assert_kept_working(valid, sid)


def test_an_unreadable_job_hash_does_not_stop_the_worker(harness: Harness) -> None:
    poison = harness.enqueue(args=[{}])
    harness.redis.hset(Job.key_for(poison.id), "retries_left", "not a number")  # RQ cannot read it back
    valid, sid = harness.valid_batch()
    assert harness.work()
    assert poison.id in FailedJobRegistry(queue=harness.queue).get_job_ids()
    assert "unreadable job" in harness.reason(poison, readable=False)
    assert harness.redis.hget(Job.key_for(poison.id), "status") == b"failed"
    harness.assert_kept_working(valid, sid)


def test_an_abandoned_job_with_a_callback_does_not_break_maintenance(
    harness: Harness, marker: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job left started by a dead worker is requeued by maintenance, which must import nothing."""
    module = f"perth_side_effect_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{module}.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\ndef run(*a): pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    poison = harness.enqueue(args=[{}], on_failure=Callback(f"{module}.run"))
    # as a worker that died mid-job leaves it: started, with a lease that has run out
    harness.queue.remove(poison)
    registry = StartedJobRegistry(queue=harness.queue)
    harness.redis.zadd(registry.key, {f"{poison.id}:dead-execution": 1})
    harness.redis.hset(Job.key_for(poison.id), "status", JobStatus.STARTED.value)
    valid, sid = harness.valid_batch()
    assert harness.work()  # maintenance runs first: the job is put back, then run and refused
    harness.assert_refused(poison, "callback")
    assert registry.get_job_ids() == []
    assert module not in sys.modules and not marker.exists()
    harness.assert_kept_working(valid, sid)


def push_hash(harness: Harness, fields: dict[str, Any] | None, *, kind: str = "hash") -> PerthJob:
    """A job hash written by hand (HSET) and its id pushed on the queue, as a producer in another
    language that got RQ's format wrong would: no RQ API involved."""
    job_id = f"by-hand-{uuid.uuid4().hex[:8]}"
    key = Job.key_for(job_id)
    if kind == "string":
        harness.redis.set(key, "not a job")
    elif fields is not None:
        harness.redis.hset(key, mapping=fields)
    harness.redis.expire(key, 600)  # the shared Redis keeps no hand-made key for long
    harness.redis.rpush(harness.queue.key, job_id)
    harness.redis.sadd("rq:queues", harness.queue.key)
    return PerthJob(job_id, connection=harness.redis, serializer=JSONSerializer)


def rq_fields(harness: Harness, **changes: Any) -> dict[str, Any]:
    """The fields RQ writes for a job (with a batch that is refused if it ever runs), changed."""
    stamp = "2026-01-01T00:00:00.000000Z"
    fields: dict[str, Any] = {
        "data": zlib.compress(json.dumps([JOB_FUNCTION, None, [{}], {}]).encode()),
        "created_at": stamp,
        "enqueued_at": stamp,
        "description": "by hand",
        "origin": harness.settings.queue,
        "status": "queued",
        "timeout": "180",
    }
    fields.update(changes)
    return {k: v for k, v in fields.items() if v is not None}


def assert_not_left_behind(harness: Harness, job: Job) -> None:
    """Off the queue and off its intermediate list: nothing waits for RQ's clean-up to notice it."""
    assert job.id not in harness.queue.get_job_ids()
    assert job.id.encode() not in harness.redis.lrange(harness.queue.intermediate_queue_key, 0, -1)


def test_a_job_hash_without_data_is_refused_not_lost(harness: Harness) -> None:
    # RQ takes it for a job that does not exist and drops its id, leaving it "queued" in no
    # registry; with no origin either (as HSET by hand writes it), RQ files a failure under a
    # queue named "": it must land in the failed registry of the queue it was taken from
    poison = push_hash(harness, {"status": "queued", "description": "x"})
    valid, sid = harness.valid_batch()
    assert harness.work()
    reason = harness.assert_refused(poison, "the job hash has no 'data'", "'created_at'", "'origin'")
    assert "not a job of RQ's format" in reason
    assert_not_left_behind(harness, poison)
    assert not harness.redis.zscore("rq:failed:", poison.id)
    assert not harness.fetch(poison).meta.get(
        "perth_refused"
    )  # nothing of it was judged: not "refused content"
    harness.assert_kept_working(valid, sid)


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        pytest.param({"data": None}, ("no 'data' field",), id="no-data"),
        pytest.param({"created_at": None}, ("no 'created_at' field",), id="no-created-at"),
        pytest.param({"description": None}, ("no 'description' field",), id="no-description"),
        pytest.param({"origin": None}, ("no 'origin' field",), id="no-origin"),
        pytest.param({"data": b"\x00\xffneither zlib nor JSON"}, ("not JSON",), id="data-not-zlib-nor-json"),
        pytest.param({"data": zlib.compress(b"not json")}, ("not JSON",), id="data-zlib-of-not-json"),
        pytest.param({"data": b""}, ("not JSON",), id="data-empty"),
    ],
)
def test_a_malformed_job_hash_is_refused_with_its_reason(
    harness: Harness, changes: dict[str, Any], fragments: tuple[str, ...]
) -> None:
    poison = push_hash(harness, rq_fields(harness, **changes))
    valid, sid = harness.valid_batch()
    assert harness.work()
    harness.assert_refused(poison, *fragments)
    assert_not_left_behind(harness, poison)
    harness.assert_kept_working(valid, sid)


@pytest.mark.parametrize(
    ("field", "value"),
    [("created_at", "yesterday"), ("status", "bogus"), ("timeout", "forever"), ("retries_left", "many")],
)
def test_a_field_rq_cannot_read_is_named_not_quoted(harness: Harness, field: str, value: str) -> None:
    poison = push_hash(harness, rq_fields(harness, **{field: value}))
    valid, sid = harness.valid_batch()
    assert harness.work()
    assert poison.id in FailedJobRegistry(queue=harness.queue).get_job_ids()
    assert harness.redis.hget(poison.key, "status") == b"failed"
    reason = harness.reason(poison, readable=False)
    assert f"RQ cannot read its field '{field}'" in reason, reason
    assert value not in reason
    assert_not_left_behind(harness, poison)
    harness.assert_kept_working(valid, sid)


def test_an_id_without_a_hash_is_dropped_as_rq_does(harness: Harness) -> None:
    ghost = push_hash(harness, None)
    valid, sid = harness.valid_batch()
    assert harness.work()
    assert ghost.id not in harness.queue.get_job_ids()
    assert ghost.id not in FailedJobRegistry(queue=harness.queue).get_job_ids()
    assert not harness.redis.exists(ghost.key)  # nothing made up for it
    harness.assert_kept_working(valid, sid)
    # not stuck either: the next maintenance (RQ's clean-up of the intermediate list) drops it
    assert not harness.work()
    assert_not_left_behind(harness, ghost)


def test_an_id_whose_key_is_not_a_hash_does_not_stop_the_worker(harness: Harness) -> None:
    foreign = push_hash(harness, None, kind="string")
    valid, sid = harness.valid_batch()
    assert harness.work()
    assert_not_left_behind(harness, foreign)
    assert harness.redis.get(foreign.key) == b"not a job"  # not ours to touch
    assert foreign.id not in FailedJobRegistry(queue=harness.queue).get_job_ids()
    harness.assert_kept_working(valid, sid)


def test_a_job_naming_another_queue_is_filed_under_the_one_it_was_taken_from(harness: Harness) -> None:
    record = session("after the poison")
    payload = Batch(
        id=uuid.uuid4(), origin="poison-test", created_at=now(), ops=[SessionUpsert(version=1, record=record)]
    ).model_dump(mode="json")
    data = zlib.compress(json.dumps([JOB_FUNCTION, None, [payload], {}]).encode())
    elsewhere = f"{harness.settings.queue}-elsewhere"
    job = push_hash(harness, rq_fields(harness, data=data, origin=elsewhere))
    assert harness.work()
    harness.assert_kept_working(job, record.id)  # not malformed: RQ would run it, and so do we
    assert job.id in FinishedJobRegistry(queue=harness.queue).get_job_ids()
    assert harness.redis.hget(job.key, "origin") == harness.settings.queue.encode()
    assert_not_left_behind(harness, job)


def test_a_redis_error_while_reading_a_job_does_not_refuse_it(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    valid, _ = harness.valid_batch()
    refresh = PerthJob.refresh

    def timing_out(self: PerthJob) -> None:
        if self.id == valid.id:
            raise redis.TimeoutError("Timeout reading from socket")
        refresh(self)

    monkeypatch.setattr(PerthJob, "refresh", timing_out)
    harness.work()  # RQ's worker quits on a Redis timeout
    assert valid.id not in FailedJobRegistry(queue=harness.queue).get_job_ids()
    assert harness.redis.hget(valid.key, "status") == b"queued"  # a good batch, not "unreadable"


def test_a_batch_of_only_invalid_operations_is_refused_naming_their_fields(harness: Harness) -> None:
    record = tab(uuid.uuid4()).model_dump(mode="json")
    payload = {
        "format": FORMAT_VERSION,
        "id": str(uuid.uuid4()),
        "origin": "poison-test",
        "created_at": now().isoformat(),
        "ops": [
            {"op": "tab.upsert", "version": 1, "record": {**record, "position": -1}},
            {"op": "tab.upsert", "version": 1, "record": {**record, "name": ""}},
        ],
    }
    poison = harness.enqueue(args=(payload,))
    valid, sid = harness.valid_batch()
    assert harness.work()
    reason = harness.assert_refused(poison, "none of the 2 operations is valid", "position", "name")
    assert "valid dictionary" not in reason and "ops[0]" in reason and "ops[1]" in reason
    harness.assert_kept_working(valid, sid)


def test_operations_that_are_not_even_operations_are_named_by_position(harness: Harness) -> None:
    # every operation invalid, none for a field of its record: pydantic has no field to name, and its
    # message for an unknown op quotes the value; the reason names each op (and its op field) instead
    record = tab(uuid.uuid4(), name="secret title").model_dump(mode="json")
    payload = {
        "format": FORMAT_VERSION,
        "id": str(uuid.uuid4()),
        "origin": "poison-test",
        "created_at": now().isoformat(),
        "ops": [
            {"op": "tab.upsert-secret-op", "version": 1, "record": record},
            ["tab.upsert", 1, record],
            {"version": 1, "record": record},
            {"op": "tab.upsert", "version": 1, "record": "secret title"},
            {"op": "tab.upsert", "version": 1, "record": {**record, "position": -1}},
        ],
    }
    poison = harness.enqueue(args=(payload,))
    valid, sid = harness.valid_batch()
    assert harness.work()
    reason = harness.assert_refused(
        poison,
        "none of the 5 operations is valid: ",
        "ops[0].op: not an operation of this format",
        "ops[1]: an operation is a JSON object, not a JSON array",
        "ops[2].op: Field required",
        "ops[3].tab.upsert.record: Input should be a JSON object",
        "ops[4].tab.upsert.record.position: Input should be greater than or equal to 0",
    )
    assert "secret" not in reason and "valid dictionary" not in reason and "ops.0" not in reason
    assert harness.fetch(poison).meta.get("perth_refused", "").startswith("none of the 5 operations")
    harness.assert_kept_working(valid, sid)
