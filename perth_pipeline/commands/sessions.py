"""``perth-pipeline restore`` and ``perth-pipeline sessions``: stored sessions, by id, name or id prefix.

A session is named on the command line by its id, its name, or the start of its id
(``restore work``, ``restore 7f0c2d``). Several matches (two sessions named alike, a short
prefix): exit 2 and the candidates listed; none: exit 1, one line.

``sessions delete`` removes a session at once, by direct SQL under the workers' advisory
locks, as ``cleanup`` does (:func:`perth_pipeline.retention.delete_sessions`): an operator
deleting a session expects it gone when the command returns, with or without a worker
running, and told what went with it.
"""

from __future__ import annotations

import json
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import click

from ..errors import Ambiguous, DatabaseError, NotFound, PersistenceError
from ..reader import Reader
from ..records import SessionRecord
from ..settings import Settings
from ..units import format_bytes, plural
from .common import CliState, fail

__all__ = ["restore_command", "run_restore", "sessions_command"]

_REF = "SESSION"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def local_time(value: datetime) -> str:
    """``2026-12-04 07:31 CET``: the local time, with its zone."""
    return value.astimezone().strftime("%Y-%m-%d %H:%M %Z")


def _printable(text: str) -> str:
    """User data on one line of a table: control characters shown as U+FFFD."""
    return "".join(c if c.isprintable() else "\ufffd" for c in text)


def _resolve(reader: Reader, ref: str) -> SessionRecord:
    """The one session ``ref`` names; otherwise exit 1 (none) or 2 (several, listed)."""
    try:
        return reader.find_session(ref)
    except Ambiguous as exc:
        click.echo(f"error: {exc}; name one by (more of) its id:", err=True)
        for record in exc.candidates:
            click.echo(
                f"  {record.id}  {_printable(record.name)}  last active {local_time(record.last_active)}",
                err=True,
            )
        sys.exit(2)
    except NotFound as exc:
        fail(str(exc))
    except PersistenceError as exc:
        fail(str(exc))


def _is_uuid(text: str) -> bool:
    try:
        UUID(text.strip())
    except ValueError:
        return False
    return True


def _document(ctx: click.Context, ref: str, *, wait: float, with_history: bool) -> dict[str, Any]:
    """The session ``ref`` names, read whole (after its queued batches, bounded by ``wait``)."""
    from ..snapshot import session_document

    settings: Settings = ctx.obj.backends(ctx)
    reader = Reader(settings)  # no producer: nothing to write, no flusher thread
    try:
        # a whole id is read as it is (its queued batches first: it may not be stored yet)
        sid = UUID(ref.strip()) if _is_uuid(ref) else _resolve(reader, ref).id
        return session_document(reader, sid, wait=wait, with_history=with_history)
    except NotFound:
        fail(f"session {ref} is not stored (or was deleted)")
    except PersistenceError as exc:
        fail(str(exc))
    finally:
        reader.close()


def history_file_names(document: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """Each pane of ``document`` with its history file's name: ``tab-<position>-<pane_id>.log``.

    The pane's own ``pane_id`` (``terminal_3``) is user data: anything but letters, digits,
    ``.``, ``_`` and ``-`` becomes ``_`` (no path separator, no ``..``), and a name taken
    already (two panes alike, or names differing only in case) gets ``-2``, ``-3``...
    """
    taken: set[str] = set()
    out = []
    for tab in document["tabs"]:
        for pane in tab["panes"]:
            stem = _UNSAFE.sub("_", str(pane["pane_id"])).strip("._")[:80] or "pane"
            base = f"tab-{tab['position']}-{stem}"
            name, n = f"{base}.log", 1
            while name.lower() in taken:
                n += 1
                name = f"{base}-{n}.log"
            taken.add(name.lower())
            out.append((pane, name))
    return out


def run_restore(ctx: click.Context, ref: str, fmt: str, with_history: Path | None, wait: float) -> None:
    """Print the session ``ref`` names (``restore`` and ``--restore-from-db``)."""
    document = _document(ctx, ref, wait=wait, with_history=with_history is not None)
    if with_history is not None:
        try:
            with_history.mkdir(parents=True, exist_ok=True)
            for pane, name in history_file_names(document):
                path = with_history / name
                path.write_bytes(pane.pop("history"))
                pane["history_file"] = str(path)
        except OSError as exc:
            fail(f"cannot write the scrollback to {with_history}: {exc}")
    if fmt == "kdl":
        from ..layout import to_kdl

        click.echo(to_kdl(document))
    else:
        click.echo(json.dumps(document, indent=2))


@click.command("restore")
@click.argument("session", metavar=_REF)
@click.option("--format", "fmt", type=click.Choice(["json", "kdl"]), default="json", show_default=True)
@click.option(
    "--with-history",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also write each pane's scrollback to DIR/tab-<position>-<pane_id>.log.",
)
@click.option("--wait", type=float, default=None, help="Seconds to wait for the session's queued batches.")
@click.pass_context
def restore_command(
    ctx: click.Context, session: str, fmt: str, with_history: Path | None, wait: float | None
) -> None:
    """Print a stored session with its tabs and panes.

    SESSION is the session's id, its name, or the start of its id, when only one session matches.
    """
    state: CliState = ctx.obj
    run_restore(ctx, session, fmt, with_history, state.settings.read_wait if wait is None else wait)


def _list(ctx: click.Context, as_json: bool) -> None:
    settings: Settings = ctx.obj.backends(ctx)
    reader = Reader(settings.with_urls(None, settings.database_url))  # a list waits for no queue
    try:
        summaries = reader.session_summaries()
    except PersistenceError as exc:
        fail(str(exc))
    finally:
        reader.close()
    if as_json:
        rows = []
        for s in summaries:
            utc = s.session.model_copy(
                update={
                    "created_at": s.session.created_at.astimezone(UTC),
                    "last_active": s.session.last_active.astimezone(UTC),
                }
            )
            rows.append({**utc.model_dump(mode="json"), "tabs": s.tabs, "panes": s.panes})
        click.echo(json.dumps(rows, indent=2))
        return
    if not summaries:
        click.echo("no stored sessions")
        return
    times = [local_time(s.session.last_active) for s in summaries]
    width = max(len("LAST ACTIVE"), *(len(t) for t in times))
    click.echo(f"{'ID':<36}  {'LAST ACTIVE':<{width}}  {'TABS':>4}  {'PANES':>5}  NAME")
    for s, when in zip(summaries, times, strict=True):
        click.echo(
            f"{s.session.id!s:<36}  {when:<{width}}  {s.tabs:>4}  {s.panes:>5}  {_printable(s.session.name)}"
        )


_JSON_HELP = "Print JSON instead: one object per session, times in ISO-8601 UTC, with tab and pane counts."


@click.group("sessions", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help=_JSON_HELP)
@click.pass_context
def sessions_command(ctx: click.Context, as_json: bool) -> None:
    """List stored sessions (most recently active first); show or delete one.

    Times are local, with their zone. A session is named by its id, its name, or the start
    of its id.
    """
    if ctx.invoked_subcommand is None:
        _list(ctx, as_json)


@sessions_command.command("list")
@click.option("--json", "as_json", is_flag=True, help=_JSON_HELP)
@click.pass_context
def list_sessions(ctx: click.Context, as_json: bool) -> None:
    """List stored sessions (as `sessions` does)."""
    _list(ctx, as_json)


@sessions_command.command("show")
@click.argument("session", metavar=_REF)
@click.option("--json", "as_json", is_flag=True, help="Print the session as `restore` does (JSON).")
@click.option("--wait", type=float, default=None, help="Seconds to wait for the session's queued batches.")
@click.pass_context
def show_session(ctx: click.Context, session: str, as_json: bool, wait: float | None) -> None:
    """Describe one session: its tabs and their panes."""
    state: CliState = ctx.obj
    document = _document(
        ctx, session, wait=state.settings.read_wait if wait is None else wait, with_history=False
    )
    if as_json:
        click.echo(json.dumps(document, indent=2))
        return
    s = document["session"]
    panes = sum(len(t["panes"]) for t in document["tabs"])
    click.echo(f"session {_printable(s['name'])}  {s['id']}")
    click.echo(f"  created      {local_time(datetime.fromisoformat(s['created_at']))}")
    click.echo(f"  last active  {local_time(datetime.fromisoformat(s['last_active']))}")
    if s.get("template_name"):
        click.echo(f"  template     {_printable(s['template_name'])}")
    click.echo(f"  {plural(len(document['tabs']), 'tab')}, {plural(panes, 'pane')}")
    for tab in document["tabs"]:
        click.echo(f"  tab {tab['position']}  {_printable(tab['name'])}")
        for pane in tab["panes"]:
            extra = [f"cwd {pane['cwd']}" if pane.get("cwd") else "", pane.get("command") or ""]
            details = "  ".join(_printable(x) for x in extra if x)
            click.echo(f"    {_printable(pane['pane_id'])}  {pane['pane_type']}  {details}".rstrip())


@sessions_command.command("delete")
@click.argument("session", metavar=_REF)
@click.option("--yes", "-y", is_flag=True, help="Do not ask (needed when stdin is not a terminal).")
@click.pass_context
def delete_session(ctx: click.Context, session: str, yes: bool) -> None:
    """Delete one session now, with its tabs, panes and scrollback.

    Works with no worker running, as `cleanup` does. A terminal still running the session
    stores it again with its next write; writes made before the delete stay deleted.
    """
    from ..retention import delete_sessions
    from ..store import admin_connection

    settings: Settings = ctx.obj.backends(ctx)
    reader = Reader(settings.with_urls(None, settings.database_url))
    try:
        record = _resolve(reader, session)
    finally:
        reader.close()
    what = f"session {_printable(record.name)} ({record.id}, last active {local_time(record.last_active)})"
    if not yes:
        if not sys.stdin.isatty():
            fail(f"not deleting {what}: add --yes to delete without a prompt", code=2)
        if not click.confirm(f"Delete {what}?", default=False):
            fail("nothing deleted")
    try:
        with admin_connection(settings) as conn:
            done = delete_sessions(conn, [record.id])
    except DatabaseError as exc:
        fail(f"delete stopped: {exc} (nothing was deleted)")
    except PersistenceError as exc:
        fail(str(exc))
    if not done["sessions"]:
        fail(f"session {record.id} is not stored any more (deleted meanwhile)")
    click.echo(
        f"deleted {what}: {plural(done['tabs'], 'tab')}, {plural(done['panes'], 'pane')}, "
        f"{plural(done['history_chunks'], 'scrollback chunk')} ({format_bytes(done['history_bytes'])})"
    )
