"""Reads and administration against PostgreSQL, for the producer side and the command line.

Every statement lives in ``schema.sql`` or ``perth_pipeline/sql/*.sql``. Driver
errors are translated here, in one place (:func:`wrap_errors`), into the
project's own hierarchy. The connection is opened lazily with explicit
connect and statement timeouts, and reopened after it breaks.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple
from uuid import UUID

import psycopg
from psycopg.rows import dict_row

from .errors import DatabaseError, DatabaseUnavailable, PersistenceError
from .masking import carries_secret, first_line, mask_url, masked_logger
from .operations import inflate_chunk
from .queries import load_queries, schema_sql
from .records import PaneRecord, SessionRecord, SessionTree, TabRecord, TemplateRecord

if TYPE_CHECKING:
    from .settings import Settings

__all__ = ["Routes", "SessionSummary", "Store", "connect", "wrap_errors"]

logger = masked_logger("perth_pipeline.store")

_SCHEMA_LOCK = 0x7065727468  # "perth": serializes concurrent init-db runs


@contextmanager
def wrap_errors(url: str | None = None) -> Iterator[None]:
    """Translate psycopg's errors into the project's, with a masked message.

    A connection that fails, or a ``DATABASE_URL`` libpq cannot parse, is
    :class:`DatabaseUnavailable`; a statement PostgreSQL refuses is :class:`DatabaseError`. The
    driver's error stays the ``__cause__`` unless its text carries a password (libpq quotes a
    URL it cannot parse, password and all).
    """
    try:
        yield
    except psycopg.errors.UndefinedTable as exc:
        raise PersistenceError(
            f"the database at {mask_url(url)} has no perth-pipeline schema: run `perth-pipeline init-db`"
        ) from exc
    except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
        raise DatabaseUnavailable(f"PostgreSQL unavailable at {mask_url(url)}: {first_line(exc)}") from _safe(
            exc
        )
    except psycopg.ProgrammingError as exc:
        if getattr(exc, "sqlstate", None):
            raise DatabaseError(f"PostgreSQL refused a statement: {_describe(exc)}") from _safe(exc)
        # no SQLSTATE: raised by libpq's parsing of the connection string, before any server
        raise DatabaseUnavailable(f"invalid DATABASE_URL {mask_url(url)}: {first_line(exc)}") from _safe(exc)
    except psycopg.Error as exc:
        raise DatabaseError(f"PostgreSQL refused a statement: {_describe(exc)}") from _safe(exc)


def _describe(exc: psycopg.Error) -> str:
    return f"{type(exc).__name__}: {first_line(exc)}"


def _safe(exc: BaseException) -> BaseException | None:
    """``exc`` when it may be chained (printed in a traceback), None when its text holds a secret."""
    return None if carries_secret(exc) else exc


def connect(
    url: str, *, connect_timeout: int = 3, statement_timeout: float = 30.0, autocommit: bool = True
) -> psycopg.Connection[Any]:
    """A connection with explicit timeouts (a dead server fails fast, a stuck statement is cancelled)."""
    with wrap_errors(url):
        return psycopg.connect(
            url,
            autocommit=autocommit,
            connect_timeout=connect_timeout,
            options=f"-c statement_timeout={int(statement_timeout * 1000)}",
            application_name="perth-pipeline",
        )


@contextmanager
def admin_connection(settings: Settings) -> Iterator[psycopg.Connection[Any]]:
    """One connection for a command's administration (cleanup, a delete), with the settings' timeouts.

    Driver errors come out as the project's (:func:`wrap_errors`); the connection is closed on exit.
    """
    url = settings.database_url or ""
    with (
        wrap_errors(url),
        connect(
            url, connect_timeout=settings.db_connect_timeout, statement_timeout=settings.statement_timeout
        ) as conn,
    ):
        yield conn


class Store:
    """One lazily-opened connection, used under a lock (reads are short)."""

    def __init__(self, url: str, *, connect_timeout: int = 3, statement_timeout: float = 30.0) -> None:
        self.url = url
        self.connect_timeout = connect_timeout
        self.statement_timeout = statement_timeout
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()
        self._q = load_queries("reads.sql")

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        with self._lock:
            try:
                with wrap_errors(self.url):
                    if self._conn is None or self._conn.closed:
                        self._conn = connect(
                            self.url,
                            connect_timeout=self.connect_timeout,
                            statement_timeout=self.statement_timeout,
                        )
                    yield self._conn
            except DatabaseUnavailable:
                self._discard()
                raise

    def _discard(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # closing a broken connection may fail; it is gone
                self._conn.close()
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self._discard()

    def _all(self, query: str, **params: Any) -> list[dict[str, Any]]:
        with self.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(self._q[query], params)
            return cur.fetchall()

    def _one(self, query: str, **params: Any) -> dict[str, Any] | None:
        rows = self._all(query, **params)
        return rows[0] if rows else None

    # --- administration -------------------------------------------------------------------

    def init_db(self) -> int:
        """Apply schema.sql (idempotent, serialized across hosts). Returns the schema version."""
        with self.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            conn.execute(schema_sql().encode())
        return self.schema_version()

    def schema_version(self) -> int:
        row = self._one("schema_version")
        return int(row["version"]) if row else 0

    def ping(self) -> bool:
        self._one("ping")
        return True

    def server_version(self) -> str:
        with self.connection() as conn:
            return str(conn.info.parameter_status("server_version") or "unknown")

    # --- reads (each returns the row versions, so the producer's clock can observe them) -------

    def session(self, session_id: UUID) -> tuple[SessionRecord, int] | None:
        row = self._one("restore_session", id=session_id)
        if row is None:
            return None
        version = row.pop("version")
        return SessionRecord.model_validate(row), version

    def tabs(self, session_id: UUID) -> list[tuple[TabRecord, int]]:
        out = []
        for row in self._all("restore_tabs", session_id=session_id):
            version = row.pop("version")
            out.append((TabRecord.model_validate(row), version))
        return out

    def panes(self, tab_id: UUID) -> list[tuple[PaneRecord, int]]:
        out = []
        for row in self._all("restore_panes", tab_id=tab_id):
            version = row.pop("version")
            out.append((PaneRecord.model_validate(row), version))
        return out

    def history(self, pane_id: UUID) -> bytes:
        return b"".join(self._content(row) for row in self._all("pane_history", pane_id=pane_id))

    def _content(self, row: dict[str, Any]) -> bytes:
        try:
            return inflate_chunk(bytes(row["content"]), row["encoding"], row["raw_size"])
        except ValueError as exc:
            # one corrupt chunk (stored before the workers checked, or altered since) is a gap,
            # not a session that can never be restored again
            logger.warning(
                "scrollback chunk %s of pane %s is unreadable (%s); restored without it",
                row.get("chunk_index"),
                row.get("pane_id"),
                exc,
                extra={"pane_id": str(row.get("pane_id")), "chunk_index": row.get("chunk_index")},
            )
            return b""

    def session_tree(self, session_id: UUID, *, with_history: bool) -> tuple[SessionTree, int] | None:
        """The session, its tabs, their panes (and scrollback) in one snapshot; with the highest version.

        One read-only REPEATABLE READ transaction, its statements pipelined: the rows are those
        of the per-entity reads, as of one moment (a batch committed in between cannot show a
        tab of the new state beside panes of the old one), in a few round trips instead of one
        per tab and per pane.
        """
        queries = ["restore_session", "restore_tabs", "restore_panes_of_session"]
        if with_history:
            queries.append("history_of_session")
        with self.connection() as conn, conn.transaction():
            with conn.pipeline():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                cursors = [conn.cursor(row_factory=dict_row) for _ in queries]
                for cur, query in zip(cursors, queries, strict=True):
                    cur.execute(self._q[query], {"id": session_id, "session_id": session_id})
            session_rows, tab_rows, pane_rows, *history_rows = [cur.fetchall() for cur in cursors]
        if not session_rows:
            return None
        version = session_rows[0].pop("version")
        session = SessionRecord.model_validate(session_rows[0])
        tabs: list[TabRecord] = []
        panes: dict[UUID, list[PaneRecord]] = {}
        for row in tab_rows:
            version = max(version, row.pop("version"))
            tabs.append(TabRecord.model_validate(row))
            panes[tabs[-1].id] = []
        for row in pane_rows:
            version = max(version, row.pop("version"))
            panes[row["tab_id"]].append(PaneRecord.model_validate(row))
        parts: dict[UUID, list[bytes]] = {}
        for row in history_rows[0] if history_rows else []:
            parts.setdefault(row["pane_id"], []).append(self._content(row))
        history = {pane_id: b"".join(chunks) for pane_id, chunks in parts.items()}
        return SessionTree(session, tabs, panes, history), version

    def sessions(self, limit: int = 10_000) -> list[tuple[SessionRecord, int]]:
        out = []
        for row in self._all("list_sessions", limit=limit):
            version = row.pop("version")
            out.append((SessionRecord.model_validate(row), version))
        return out

    def session_summaries(self, limit: int = 10_000) -> list[tuple[SessionSummary, int]]:
        """Every session (most recently active first) with the number of its tabs and panes."""
        out = []
        for row in self._all("session_summaries", limit=limit):
            version, tabs, panes = row.pop("version"), row.pop("tab_count"), row.pop("pane_count")
            out.append((SessionSummary(SessionRecord.model_validate(row), tabs, panes), version))
        return out

    def find_sessions(
        self, name: str, id_prefix: str | None, limit: int = 20
    ) -> list[tuple[SessionRecord, int]]:
        """Sessions named ``name`` or whose id starts with ``id_prefix`` (lower-case hex and dashes)."""
        prefix = None if id_prefix is None else id_prefix + "%"
        out = []
        for row in self._all("find_sessions", name=name, prefix=prefix, limit=limit):
            version = row.pop("version")
            out.append((SessionRecord.model_validate(row), version))
        return out

    def template(self, name: str) -> tuple[TemplateRecord, int] | None:
        row = self._one("get_template", name=name)
        if row is None:
            return None
        version = row.pop("version")
        return TemplateRecord.model_validate(row), version

    def templates(self) -> list[tuple[TemplateRecord, int]]:
        out = []
        for row in self._all("list_templates"):
            version = row.pop("version")
            out.append((TemplateRecord.model_validate(row), version))
        return out

    def session_of_tab(self, tab_id: UUID) -> UUID | None:
        row = self._one("session_of_tab", tab_id=tab_id)
        return row["session_id"] if row else None

    def route_of_pane(self, pane_id: UUID) -> tuple[UUID, UUID] | None:
        row = self._one("route_of_pane", pane_id=pane_id)
        return (row["tab_id"], row["session_id"]) if row else None

    def routes(self, tab_ids: list[UUID], pane_ids: list[UUID]) -> Routes:
        """The ancestors of these tabs and panes, from their rows or their tombstones."""
        tabs = {r["id"]: r["session_id"] for r in self._all("tab_routes", ids=tab_ids)} if tab_ids else {}
        rows = self._all("pane_routes", ids=pane_ids) if pane_ids else []
        panes = {row["id"]: (row["tab_id"], row["session_id"]) for row in rows}
        return Routes(tabs, panes)


class SessionSummary(NamedTuple):
    """A session as ``perth-pipeline sessions`` lists it: the record, its tabs and panes counted."""

    session: SessionRecord
    tabs: int
    panes: int


class Routes(NamedTuple):
    """What :meth:`Store.routes` found: tab -> session, pane -> (tab, session).

    A deleted tab or pane is routed by its tombstone, like a live one: what is written under it is
    sent, and the workers judge it by version (another terminal may have created it again).
    """

    tabs: dict[UUID, UUID]
    panes: dict[UUID, tuple[UUID, UUID]]
