"""perth_pipeline.dashboard's rules, without a server: basic auth's variables, the cross-site guard."""

from __future__ import annotations

import base64
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from perth_pipeline.dashboard import (
    AuthConfig,
    ConfigError,
    CrossSiteGuard,
    auth_from_env,
    cross_site_refusal,
    main,
    redis_url_from_env,
)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = "127.0.0.1:9181"


def test_a_password_without_a_user_is_refused() -> None:
    with pytest.raises(ConfigError, match="RQ_DASHBOARD_USERNAME is not"):
        auth_from_env({"RQ_DASHBOARD_PASSWORD": "s3cret"})
    with pytest.raises(ConfigError, match="RQ_DASHBOARD_USERNAME is not"):
        auth_from_env({"RQ_DASHBOARD_PASSWORD": "s3cret", "RQ_DASHBOARD_USERNAME": ""})


def test_a_user_without_a_password_is_refused() -> None:
    with pytest.raises(ConfigError, match="RQ_DASHBOARD_PASSWORD is not"):
        auth_from_env({"RQ_DASHBOARD_USERNAME": "ops"})


def test_both_turn_auth_on_and_neither_leaves_it_off() -> None:
    assert auth_from_env({"RQ_DASHBOARD_USERNAME": "ops", "RQ_DASHBOARD_PASSWORD": "pw"}) == AuthConfig(
        "ops", "pw"
    )
    assert auth_from_env({}) is None
    assert auth_from_env({"RQ_DASHBOARD_USERNAME": "", "RQ_DASHBOARD_PASSWORD": ""}) is None


def test_main_refuses_with_one_line_and_exit_2_before_it_imports_or_binds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main("127.0.0.1", 0, environ={"RQ_DASHBOARD_PASSWORD": "s3cret"}) == 2
    out, err = capsys.readouterr()
    assert out == ""
    [line] = err.splitlines()
    assert "RQ_DASHBOARD_PASSWORD is set but RQ_DASHBOARD_USERNAME is not" in line
    assert "s3cret" not in err


def test_the_redis_url_comes_from_the_dashboards_variable_then_redis_url() -> None:
    assert (
        redis_url_from_env({"RQ_DASHBOARD_REDIS_URL": "redis://a/1", "REDIS_URL": "redis://b/2"})
        == "redis://a/1"
    )
    assert redis_url_from_env({"REDIS_URL": "redis://b/2"}) == "redis://b/2"
    assert redis_url_from_env({}) == "redis://127.0.0.1:6379/0"


def request(method: str = "POST", path: str = "/queue/perth/queued/empty", **headers: str) -> dict[str, Any]:
    environ: dict[str, Any] = {"REQUEST_METHOD": method, "PATH_INFO": path, "HTTP_HOST": DASHBOARD}
    environ.update({f"HTTP_{name.upper()}": value for name, value in headers.items()})
    return environ


@pytest.mark.parametrize(
    "headers",
    [
        {"sec_fetch_site": "cross-site"},
        # a site ignores ports: any page on this host (another local web app) is same-site
        {"sec_fetch_site": "same-site"},
        {"sec_fetch_site": "same-site", "origin": "http://127.0.0.1:8000"},
        {"origin": "http://evil.example"},
        {"origin": "http://127.0.0.1:8000"},  # another port of the same host
        {"origin": "http://localhost:9181"},  # the same port, another host name
        {"origin": "null"},  # a sandboxed frame, a file: page
        {"origin": "http://127.0.0.1:9181.evil.example"},
        {"sec_fetch_site": "cross-site", "origin": f"http://{DASHBOARD}"},  # both must pass
        {"sec_fetch_site": "same-origin", "origin": "http://evil.example"},
    ],
)
def test_a_state_change_from_another_origin_is_refused(headers: dict[str, str]) -> None:
    assert cross_site_refusal(request(**headers)) is not None
    # GET /requeue/<queue> requeues the failed jobs: the same rule
    assert cross_site_refusal(request("GET", "/requeue/perth", **headers)) is not None


@pytest.mark.parametrize(
    "headers",
    [
        {"sec_fetch_site": "same-origin", "origin": f"http://{DASHBOARD}"},
        {"sec_fetch_site": "same-origin"},
        {"origin": f"http://{DASHBOARD}"},
        {"sec_fetch_site": "none"},  # typed or bookmarked by the user
        {},  # not a browser (curl, a script): no other site drives it
    ],
)
def test_a_state_change_from_the_dashboards_own_origin_passes(headers: dict[str, str]) -> None:
    assert cross_site_refusal(request(**headers)) is None
    assert cross_site_refusal(request("DELETE", "/job/x/delete", **headers)) is None


def test_reading_is_never_refused() -> None:
    for method in ("GET", "HEAD", "OPTIONS"):
        environ = request(
            method, "/0/data/queues.json", sec_fetch_site="cross-site", origin="http://evil.example"
        )
        assert cross_site_refusal(environ) is None


def test_the_origin_is_compared_with_the_host_the_browser_used() -> None:
    # behind a TLS proxy that passes the Host on: an https origin on its default port
    proxied = {"HTTP_HOST": "dash.example.com", "HTTP_ORIGIN": "https://dash.example.com"}
    assert cross_site_refusal({**request(), **proxied}) is None
    proxied["HTTP_HOST"] = "Dash.Example.com:443"
    assert cross_site_refusal({**request(), **proxied}) is None
    proxied["HTTP_ORIGIN"] = "https://dash.example.com:8443"
    assert cross_site_refusal({**request(), **proxied}) is not None
    missing_host = request(origin=f"http://{DASHBOARD}")
    del missing_host["HTTP_HOST"]
    assert cross_site_refusal(missing_host) is not None
    # under a URL prefix, /requeue/ is the prefix's
    assert (
        cross_site_refusal(request("GET", "/rq/requeue/perth", origin="http://evil.example"), "/rq")
        is not None
    )
    assert (
        cross_site_refusal(request("GET", "/rq/0/view/queues", origin="http://evil.example"), "/rq") is None
    )


class Called:
    def __init__(self) -> None:
        self.status = ""
        self.headers: dict[str, str] = {}
        self.app_called = False

    def start_response(self, status: str, headers: list[tuple[str, str]], *_: Any) -> None:
        self.status, self.headers = status, dict(headers)

    def app(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        self.app_called = True
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"emptied"]


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_the_guard_answers_403_with_a_short_text_and_never_calls_the_app() -> None:
    called = Called()
    body = b"".join(CrossSiteGuard(called.app)(request(sec_fetch_site="cross-site"), called.start_response))
    assert called.status == "403 Forbidden" and not called.app_called
    assert called.headers["Content-Type"].startswith("text/plain")
    assert body.startswith(b"Refused: a cross-site request cannot change the queue")
    assert len(body.splitlines()) == 1


def test_the_guards_basic_auth() -> None:
    guard = CrossSiteGuard(Called().app, auth=AuthConfig("ops", "s3cret"))
    for authorization in ("", basic("ops", "guess"), basic("op", "s3cret"), "Basic !!!", "Bearer x"):
        called = Called()
        guard.app = called.app
        environ = request("GET", "/", authorization=authorization) if authorization else request("GET", "/")
        guard(environ, called.start_response)
        assert called.status == "401 Unauthorized" and not called.app_called, authorization
        assert called.headers["WWW-Authenticate"].startswith("Basic ")
    called = Called()
    guard.app = called.app
    assert b"".join(guard(request("GET", "/", authorization=basic("ops", "s3cret")), called.start_response))
    assert called.status == "200 OK" and called.app_called
    # a cross-site post with the right credentials (a browser sends those it has) is still refused
    called = Called()
    guard.app = called.app
    guard(request(authorization=basic("ops", "s3cret"), sec_fetch_site="cross-site"), called.start_response)
    assert called.status == "403 Forbidden" and not called.app_called


def test_the_command_line_help_does_not_import_rq_dashboard() -> None:
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from perth_pipeline.cli import cli\n"
        "result = CliRunner().invoke(cli, ['--help'])\n"
        "assert result.exit_code == 0, result.output\n"
        "assert 'dashboard' in result.output, result.output\n"
        "assert 'rq_dashboard' not in sys.modules and 'flask' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_up_still_leaves_the_dashboard_out_without_rq_dashboard(monkeypatch: pytest.MonkeyPatch) -> None:
    from honcho.environ import parse_procfile

    from perth_pipeline import stack

    line = str(parse_procfile(stack.find_procfile(ROOT / "Procfile")).processes["dashboard"])
    assert "perth-pipeline dashboard" in line
    assert not stack._dashboard_missing("perth-pipeline worker", "")
    monkeypatch.setattr(stack.importlib.util, "find_spec", lambda name: None)
    assert stack._dashboard_missing(line, "")
    # an older Procfile that runs rq-dashboard itself: looked for on PATH, as before
    assert stack._dashboard_missing("exec rq-dashboard --json", "")
