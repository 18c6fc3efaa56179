"""perth_pipeline.rqcompat: the installed RQ still has every private attribute the project uses."""

from __future__ import annotations

from typing import Any

import fakeredis
import rq
from rq import SimpleWorker
from rq.job import Job

from perth_pipeline import rqcompat


def test_the_installed_rq_has_every_private_attribute_rqcompat_uses() -> None:
    connection = fakeredis.FakeRedis()
    lacking = rqcompat.missing(Job(connection=connection), SimpleWorker(["q"], connection=connection))
    assert not lacking, (
        f"RQ {rq.__version__} lacks {', '.join(lacking)}, used by perth_pipeline.rqcompat "
        f"(checked against RQ {rqcompat.CHECKED_AGAINST}): adapt rqcompat before upgrading RQ"
    )


def test_exception_handlers_follow_rqs_chain_semantics() -> None:
    calls: list[str] = []

    def handler(name: str, result: Any) -> Any:
        def run(job: Any, *exc_info: Any) -> Any:
            calls.append(name)
            return result

        return run

    # None falls through (RQ reads no return value as True); an explicit false value stops the chain
    chain = [handler("a", None), handler("b", True), handler("c", False), handler("d", None)]
    rqcompat.run_exception_handlers(chain, None, ValueError, ValueError(), None)  # type: ignore[arg-type]
    assert calls == ["a", "b", "c"]


def test_a_worker_hands_its_exception_handlers_over_in_the_order_they_were_pushed() -> None:
    worker = SimpleWorker(["q"], connection=fakeredis.FakeRedis())
    first, second = (lambda *a: None), (lambda *a: None)
    worker.push_exc_handler(first)
    worker.push_exc_handler(second)
    assert rqcompat.exception_handlers(worker) == [first, second]
    assert rqcompat.stop_requested(worker) is False and rqcompat.shutdown_requested_at(worker) is None


def test_perth_worker_walks_the_exception_handlers_as_rq_does() -> None:
    from tests.helpers import test_settings
    from workers import context
    from workers.jobs import PoisonBatch
    from workers.worker import PerthWorker

    connection = fakeredis.FakeRedis()
    settings = test_settings("redis://127.0.0.1:1/0", "postgresql://nobody@127.0.0.1:1/none")
    worker = PerthWorker([settings.queue], settings=settings, connection=connection)
    try:
        calls: list[str] = []
        worker.push_exc_handler(lambda *a: calls.append("first"))  # returns None: the chain goes on
        worker.push_exc_handler(lambda *a: calls.append("second") or False)  # False: it stops here
        worker.push_exc_handler(lambda *a: calls.append("third"))
        job = Job.create("workers.jobs.apply_batch", args=[{}], connection=connection, origin=settings.queue)
        exc = PoisonBatch("refused")
        worker.handle_exception(job, PoisonBatch, exc, exc.__traceback__)
        assert calls == ["first", "second"]
    finally:
        context.bind(None)


def test_a_stop_requested_during_registry_maintenance_stops_the_worker() -> None:
    """SIGTERM during start-up maintenance: RQ raises StopRequested inside a Redis read there.

    Maintenance logs and skips what one unreadable job raises, but a stop is not one job's
    fault: swallowed, it left the worker running after its pool had been told to stop.
    """
    from rq.exceptions import StopRequested

    from tests.helpers import test_settings
    from workers import registries
    from workers.worker import PerthWorker

    connection = fakeredis.FakeRedis()
    settings = test_settings("redis://127.0.0.1:1/0", "postgresql://nobody@127.0.0.1:1/none")
    worker = PerthWorker([settings.queue], settings=settings, connection=connection)

    def stop(queue: Any) -> None:
        raise StopRequested()

    worker._requeue_abandoned = stop  # type: ignore[method-assign]
    try:
        worker.clean_registries()
    except StopRequested:
        pass
    else:
        raise AssertionError("clean_registries() swallowed StopRequested")

    quarantined: list[str] = []

    def fetch(*args: Any, **kwargs: Any) -> Any:
        raise StopRequested()

    original_fetch, original_quarantine = registries.PerthJob.fetch, registries.quarantine
    registries.PerthJob.fetch = fetch  # type: ignore[method-assign, assignment]
    registries.quarantine = lambda *a, **k: quarantined.append(a[2])  # type: ignore[assignment]
    try:
        registries._fetch(connection, worker.queues[0], "some-job", settings)
    except StopRequested:
        pass
    else:
        raise AssertionError("reading a job swallowed StopRequested")
    finally:
        registries.PerthJob.fetch = original_fetch  # type: ignore[method-assign]
        registries.quarantine = original_quarantine
    assert quarantined == [], "a job read during a stop was quarantined as unreadable"
