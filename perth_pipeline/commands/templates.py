"""``perth-pipeline templates``: list, show, save and delete layout templates.

Writes are versioned operations like every other write: they go through a
:class:`~perth_pipeline.PersistenceManager` and the queue, and the command waits
(``--wait``) until a worker has committed them.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import click
from pydantic import ValidationError

from ..errors import InvalidRecord, NotFound, PersistenceError
from ..layout import LayoutError, definition_to_kdl
from ..masking import mask_url
from ..producer import PersistenceManager
from ..reader import Reader
from ..records import TemplateRecord
from ..settings import Settings
from ..templates import load_definition
from .common import fail

__all__ = ["templates_command"]

_WAIT_HELP = "Seconds to wait until a worker has applied the change."


def _reader(ctx: click.Context) -> Reader:
    """Reads only: no producer, no flusher thread (templates wait for no queue)."""
    settings: Settings = ctx.obj.backends(ctx)
    reader = Reader(settings.with_urls(None, settings.database_url))
    ctx.call_on_close(reader.close)
    return reader


def _commit(manager: PersistenceManager, what: str, wait: float) -> None:
    """Wait until the change is committed; otherwise say why it is not (yet)."""
    committed = manager.flush(timeout=wait)
    stats = manager.stats()
    manager.close(timeout=2.0)
    if committed:
        return
    if not stats.get("enqueued_jobs"):
        fail(
            f"{what} was not saved: Redis at {mask_url(manager.settings.redis_url)} did not take it "
            f"within {wait:g} s"
        )
    fail(
        f"{what} is queued but was not applied within {wait:g} s: is a worker running "
        "(`perth-pipeline worker`)? It is applied when one runs."
    )


@click.group("templates")
def templates_command() -> None:
    """List, show, save and delete layout templates."""


@templates_command.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the templates (with definitions) as JSON.")
@click.pass_context
def list_templates(ctx: click.Context, as_json: bool) -> None:
    """List stored templates by name."""
    reader = _reader(ctx)
    try:
        templates = reader.list_templates()
    except PersistenceError as exc:
        fail(str(exc))
    if as_json:
        click.echo(json.dumps([t.model_dump(mode="json") for t in templates], indent=2))
        return
    if not templates:
        click.echo("no stored templates")
    for template in templates:
        tabs = template.definition.get("tabs")
        n = len(tabs) if isinstance(tabs, list) else 0
        count = "1 tab" if n == 1 else f"{n} tabs"
        click.echo(f"{template.name}  ({count})")


@templates_command.command("show")
@click.argument("name")
@click.option("--format", "fmt", type=click.Choice(["json", "kdl"]), default="json", show_default=True)
@click.pass_context
def show_template(ctx: click.Context, name: str, fmt: str) -> None:
    """Print a template: its JSON record, or its definition as a zellij layout."""
    reader = _reader(ctx)
    try:
        template = reader.get_template(name)
    except NotFound:
        fail(f"template {name!r} is not stored (or was deleted)")
    except PersistenceError as exc:
        fail(str(exc))
    if fmt == "kdl":
        click.echo(definition_to_kdl(template.definition), nl=False)
    else:
        click.echo(json.dumps(template.model_dump(mode="json"), indent=2))


@templates_command.command("save")
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["auto", "json", "kdl"]),
    default="auto",
    show_default=True,
    help="FILE's format; auto: by extension, else JSON if it is a JSON object, else KDL.",
)
@click.option("--wait", type=float, default=10.0, show_default=True, help=_WAIT_HELP)
@click.pass_context
def save_template(ctx: click.Context, name: str, file: str, fmt: str, wait: float) -> None:
    """Save FILE (JSON, or a zellij KDL layout; - for stdin) as template NAME (replacing it)."""
    try:
        text = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {file}: {exc}", code=2)
    try:
        definition = load_definition(text, fmt, source=file)
    except (LayoutError, ValueError) as exc:
        fail(f"{file}: {exc}", code=2)
    settings: Settings = ctx.obj.backends(ctx)
    manager = PersistenceManager(settings=settings, start=False)  # its flusher starts once there is a write
    try:
        # keep the id of the template being replaced; reading it also moves this writer's clock past it
        template_id = manager.get_template(name).id
    except NotFound:
        template_id = uuid.uuid4()
    except PersistenceError as exc:
        manager.close(timeout=0)
        fail(str(exc))
    try:
        manager.start()
        manager.save_template(TemplateRecord(id=template_id, name=name, definition=definition))
    except (ValidationError, InvalidRecord) as exc:
        manager.close(timeout=0)
        fail(f"template {name!r} refused: {_reason(exc)}", code=2)
    _commit(manager, f"template {name!r}", wait)
    click.echo(f"saved template {name}")


@templates_command.command("delete")
@click.argument("name")
@click.option("--wait", type=float, default=10.0, show_default=True, help=_WAIT_HELP)
@click.pass_context
def delete_template(ctx: click.Context, name: str, wait: float) -> None:
    """Delete template NAME."""
    settings: Settings = ctx.obj.backends(ctx)
    manager = PersistenceManager(settings=settings, start=False)  # its flusher starts once there is a write
    try:
        manager.get_template(name)  # also moves this writer's clock past the stored version
        manager.start()
        manager.delete_template(name)
    except NotFound:
        manager.close(timeout=0)
        fail(f"template {name!r} is not stored (or was deleted)")
    except (PersistenceError, ValueError) as exc:
        manager.close(timeout=0)
        fail(str(exc))
    _commit(manager, f"deleting template {name!r}", wait)
    click.echo(f"deleted template {name}")


def _reason(exc: ValidationError | InvalidRecord) -> str:
    if isinstance(exc, InvalidRecord):
        return str(exc)
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
        for e in exc.errors(include_input=False, include_url=False)
    )
