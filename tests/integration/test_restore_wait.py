"""A terminal that restarts reads its session only once the batches it sent before are applied.

The first manager writes and closes (its batch is on the queue, no worker has
run); a second manager, the restarted terminal, restores while the worker is
held back. The read must wait for the batch (bounded), not return stale rows.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest
import redis
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from perth_pipeline import NotFound, PersistenceManager, SessionRecord
from perth_pipeline.broker import Keys
from perth_pipeline.settings import Settings

from ..helpers import drain, session, tab, wait_for


class CountingRedis(redis.Redis):
    """Counts the reader's looks at a session's outstanding batches."""

    polls = 0

    def zrange(self, name: Any, *args: Any, **kwargs: Any) -> Any:
        if ":outstanding:" in str(name):
            self.polls += 1
        return super().zrange(name, *args, **kwargs)


def written_and_closed(settings: Settings) -> tuple[SessionRecord, Any]:
    """What a terminal wrote just before it exited: enqueued, not applied."""
    s = session("before the restart")
    t = tab(s.id, name="editor")
    first = PersistenceManager(settings=settings)
    first.create_session(s)
    first.create_tab(t)
    first.close(timeout=10)
    assert first.stats()["enqueued_jobs"] == 1 and first.stats()["dirty"] == 0
    return s, t


def restarted(settings: Settings) -> tuple[PersistenceManager, CountingRedis]:
    client = CountingRedis.from_url(settings.redis_url or "", socket_connect_timeout=1, socket_timeout=2)
    return PersistenceManager(settings=settings, redis_client=client), client


@pytest.mark.parametrize("reader_method", ["restore_session", "restore_session_tree"])
def test_a_restore_waits_for_the_batches_enqueued_before_the_restart(
    settings: Settings, reader_method: str
) -> None:
    s, t = written_and_closed(settings)
    second, client = restarted(settings)
    outcome: dict[str, Any] = {}

    def restore() -> None:
        try:
            outcome["session"] = getattr(second, reader_method)(s.id, wait=60)
        except BaseException as exc:  # reported by the main thread
            outcome["error"] = exc
        outcome["at"] = time.monotonic()

    reader = threading.Thread(target=restore)
    try:
        reader.start()
        # the reader has seen the batch pending and is still polling: only now does a worker run
        wait_for(lambda: client.polls >= 3, timeout=10, what="the reader to wait on the queued batch")
        assert reader.is_alive() and not outcome
        assert drain(settings)
        applied_at = time.monotonic()
        reader.join(timeout=30)
        assert not reader.is_alive()
        assert "error" not in outcome, outcome.get("error")
        restored = outcome["session"]  # not NotFound: the read waited for the batch
        if reader_method == "restore_session_tree":
            assert restored.tabs == [t] and restored.panes == {t.id: []}
            restored = restored.session
        assert restored == s
        assert outcome["at"] >= applied_at - 1.0
        assert second.restore_tabs(s.id) == [t]
        assert not client.exists(Keys(settings.queue).outstanding(s.id))
    finally:
        reader.join(timeout=30)
        second.close()
        client.close()


def test_the_wait_is_bounded_and_says_the_read_may_be_stale(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    s, _ = written_and_closed(settings)
    second, client = restarted(settings)
    try:
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="perth_pipeline.producer"), pytest.raises(NotFound):
            second.restore_session(s.id, wait=0.5)
        took = time.monotonic() - started
        assert 0.5 <= took < 10
        assert any("may be stale" in r.getMessage() for r in caplog.records)
        assert client.polls >= 2
    finally:
        second.close()
        client.close()


def test_a_batch_that_can_no_longer_be_applied_is_not_waited_for(
    settings: Settings, rconn: redis.Redis
) -> None:
    s, _ = written_and_closed(settings)
    (job_id,) = [m.decode() for m in rconn.zrange(Keys(settings.queue).outstanding(s.id), 0, -1)]
    job = Job.fetch(job_id, connection=rconn, serializer=JSONSerializer)
    job.set_status(JobStatus.FAILED)  # ended in the failed registry: nothing to wait for
    second, _client = restarted(settings)
    try:
        started = time.monotonic()
        with pytest.raises(NotFound):
            second.restore_session(s.id, wait=30)
        assert time.monotonic() - started < 10
    finally:
        second.close()
        _client.close()
