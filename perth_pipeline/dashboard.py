"""rq-dashboard, served behind a guard of ours: ``perth-pipeline dashboard`` (the Procfile's line).

rq-dashboard 0.9 is a Flask app that is safe only on a trusted loopback. This module builds
it and wraps it (WSGI) so that:

* basic auth is on when ``RQ_DASHBOARD_USERNAME`` and ``RQ_DASHBOARD_PASSWORD`` are both
  set, off when neither is, and the dashboard refuses to start with one of the two only
  (rq-dashboard itself silently turns auth off for a password without a user);
* a state-changing request (anything but GET, HEAD, OPTIONS, and rq-dashboard's GET
  ``/requeue/<queue>``) that a browser marks as coming from another origin is answered 403:
  ``Sec-Fetch-Site`` must be ``same-origin`` (or ``none``: typed by the user) when sent, and
  ``Origin`` must name the host the request was sent to when sent. ``same-site`` is refused
  too: a site ignores ports, so any page served from the same host (another local web
  app) is ``same-site``. Clients that send neither header (curl, scripts) are not browsers
  and cannot be driven by another site's page: they pass;
* the Redis URL it shows carries no password: rq-dashboard renders its
  ``RQ_DASHBOARD_REDIS_URL`` setting on every page (hiding only a ``user:pw@`` part, not
  ``?password=``), and connects with it again on every request. The setting holds
  :func:`mask_url`'s display string here, and the requests use one client made from the
  real URL instead.

rq_dashboard and Flask are imported only when the app is built (``perth-pipeline --help``
does not need the ``dashboard`` extra).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .settings import mask_url

__all__ = [
    "DEFAULT_REDIS_URL",
    "AuthConfig",
    "ConfigError",
    "CrossSiteGuard",
    "auth_from_env",
    "build_app",
    "cross_site_refusal",
    "main",
    "redis_url_from_env",
]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_ALLOWED_FETCH_SITES = frozenset({"same-origin", "none"})
_DEFAULT_PORTS = {"http": 80, "https": 443}

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]


class ConfigError(ValueError):
    """A configuration the dashboard refuses to start with."""


@dataclass(frozen=True)
class AuthConfig:
    username: str
    password: str


def auth_from_env(environ: Mapping[str, str]) -> AuthConfig | None:
    """Basic auth's credentials, or None for no auth; :class:`ConfigError` for one of the two only.

    An empty variable counts as unset.
    """
    username = environ.get("RQ_DASHBOARD_USERNAME") or ""
    password = environ.get("RQ_DASHBOARD_PASSWORD") or ""
    if password and not username:
        raise ConfigError(
            "RQ_DASHBOARD_PASSWORD is set but RQ_DASHBOARD_USERNAME is not: "
            "set both to turn on basic auth (or neither to run without)"
        )
    if username and not password:
        raise ConfigError(
            "RQ_DASHBOARD_USERNAME is set but RQ_DASHBOARD_PASSWORD is not: "
            "set both to turn on basic auth (or neither to run without)"
        )
    return AuthConfig(username, password) if username else None


def redis_url_from_env(environ: Mapping[str, str]) -> str:
    """``RQ_DASHBOARD_REDIS_URL`` (the Procfile's), else ``REDIS_URL``, else the local default."""
    return environ.get("RQ_DASHBOARD_REDIS_URL") or environ.get("REDIS_URL") or DEFAULT_REDIS_URL


def _host_port(netloc: str, scheme: str) -> tuple[str, int | None] | None:
    try:
        parts = urlsplit(f"//{netloc}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.hostname.lower(), port if port is not None else _DEFAULT_PORTS.get(scheme)


def _origin_matches_host(origin: str, host: str) -> bool:
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    if parts.scheme not in _DEFAULT_PORTS or not parts.netloc:
        return False  # "null" (a sandboxed frame, a file: page), or not an origin
    theirs = _host_port(parts.netloc, parts.scheme)
    # a Host without a port names the default port of the scheme the browser used: the Origin's
    # (which need not be ours: a TLS proxy in front serves https for our http)
    ours = _host_port(host, parts.scheme)
    return theirs is not None and theirs == ours


def _changes_state(method: str, path: str, prefix: str) -> bool:
    if method.upper() not in _SAFE_METHODS:
        return True
    # rq-dashboard also requeues a queue's failed jobs on a GET of /requeue/<queue>
    return path[len(prefix) :].startswith("/requeue/") if path.startswith(prefix) else False


def cross_site_refusal(environ: Mapping[str, Any], prefix: str = "") -> str | None:
    """Why this request is refused as a cross-site state change, or None to let it through."""
    if not _changes_state(environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", ""), prefix):
        return None
    site = environ.get("HTTP_SEC_FETCH_SITE")
    if site is not None and site.strip().lower() not in _ALLOWED_FETCH_SITES:
        return f"Sec-Fetch-Site is {site.strip()!r}"
    origin = environ.get("HTTP_ORIGIN")
    if origin is not None and not _origin_matches_host(origin.strip(), environ.get("HTTP_HOST") or ""):
        return "its Origin is not this dashboard's"
    return None


class CrossSiteGuard:
    """WSGI middleware: cross-site state changes get 403, then basic auth (when configured)."""

    def __init__(self, app: WSGIApp, auth: AuthConfig | None = None, prefix: str = "") -> None:
        self.app = app
        self.auth = auth
        self.prefix = prefix.rstrip("/")

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        why = cross_site_refusal(environ, self.prefix)
        if why is not None:
            return _plain(
                start_response,
                "403 Forbidden",
                f"Refused: a cross-site request cannot change the queue ({why}).\n",
            )
        if self.auth is not None and not self._authorized(environ.get("HTTP_AUTHORIZATION", "")):
            return _plain(
                start_response,
                "401 Unauthorized",
                "Please log in.\n",
                [("WWW-Authenticate", 'Basic realm="RQ Dashboard", charset="UTF-8"')],
            )
        return self.app(environ, start_response)

    def _authorized(self, header: str) -> bool:
        assert self.auth is not None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            username, sep, password = base64.b64decode(token.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        # both compared, always: the time taken does not tell which was wrong
        user_ok = hmac.compare_digest(username.encode(), self.auth.username.encode())
        password_ok = hmac.compare_digest(password.encode(), self.auth.password.encode())
        return bool(sep) and user_ok and password_ok


def _plain(
    start_response: StartResponse, status: str, text: str, extra: list[tuple[str, str]] | None = None
) -> list[bytes]:
    body = text.encode()
    headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),
        *(extra or []),
    ]
    start_response(status, headers)
    return [body]


def build_app(
    redis_url: str,
    *,
    auth: AuthConfig | None = None,
    json_jobs: bool = False,
    disable_delete: bool = False,
    poll_interval: int | None = None,
    url_prefix: str = "",
) -> CrossSiteGuard:
    """rq-dashboard's Flask app on ``redis_url``, showing it masked, inside :class:`CrossSiteGuard`."""
    from flask import abort, current_app, request
    from rq.serializers import JSONSerializer
    from rq_dashboard import web
    from rq_dashboard.cli import make_flask_app

    # auth is ours (the guard's): make_flask_app's would be added to rq-dashboard's module-level blueprint
    app = make_flask_app(None, None, None, url_prefix)
    # what the pages show; never used to connect (see _connection below)
    app.config["RQ_DASHBOARD_REDIS_URL"] = (mask_url(redis_url),)
    app.config["RQ_DASHBOARD_DISABLE_DELETE"] = disable_delete
    app.config["DEPRECATED_OPTIONS"] = []
    if poll_interval:
        app.config["RQ_DASHBOARD_POLL_INTERVAL"] = poll_interval
    if json_jobs:
        web.config.serializer = JSONSerializer
    _, client = web.from_url(redis_url)
    app.redis_conn = client

    def _connection() -> None:
        # instead of rq-dashboard's push_rq_connection, which connects anew from the setting
        instance = (request.view_args or {}).get("instance_number")
        if instance not in (None, 0):
            abort(404)
        current_app.redis_conn = client  # type: ignore[attr-defined]

    hooks = app.before_request_funcs.get(web.blueprint.name, [])
    if web.push_rq_connection not in hooks:
        raise RuntimeError(
            "this rq-dashboard does not connect as 0.9 does: update perth_pipeline/dashboard.py"
        )
    hooks[hooks.index(web.push_rq_connection)] = _connection
    return CrossSiteGuard(app.wsgi_app, auth=auth, prefix=url_prefix)


def main(
    host: str = "127.0.0.1",
    port: int = 9181,
    *,
    environ: Mapping[str, str] | None = None,
    json_jobs: bool = False,
    disable_delete: bool = False,
    poll_interval: int | None = None,
    url_prefix: str = "",
) -> int:
    """Serve the guarded dashboard until killed; 2 (one line on stderr) for a configuration it refuses.

    The Redis URL and basic auth's credentials come from the environment (never the command
    line, which ``ps`` shows): see :func:`redis_url_from_env` and :func:`auth_from_env`.
    """
    env = os.environ if environ is None else environ
    try:
        auth = auth_from_env(env)
    except ConfigError as exc:
        print(f"perth-pipeline dashboard: refusing to start: {exc}", file=sys.stderr, flush=True)
        return 2
    redis_url = redis_url_from_env(env)
    try:
        app = build_app(
            redis_url,
            auth=auth,
            json_jobs=json_jobs,
            disable_delete=disable_delete,
            poll_interval=poll_interval,
            url_prefix=url_prefix,
        )
    except ImportError as exc:
        print(
            f"perth-pipeline dashboard: rq-dashboard is not installed "
            f"(pip install 'perth-pipeline[dashboard]'): {exc}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    import logging

    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    server = make_server(host, port, app, threaded=True)
    print(
        f"perth-pipeline dashboard: http://{host}:{server.server_port}{url_prefix} on {mask_url(redis_url)}"
        f" ({'basic auth' if auth else 'no auth'})",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
