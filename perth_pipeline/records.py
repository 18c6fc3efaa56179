"""The records: sessions, tabs, panes, scrollback chunks and templates, as pydantic models.

Records are what the terminal hands to :class:`~perth_pipeline.PersistenceManager` and what
the reads give back: frozen, no unknown field, every field within the wire format's limits
(:mod:`perth_pipeline.limits`). Operations wrap a record with its version
(:mod:`perth_pipeline.operations`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated
from uuid import UUID

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)

from .limits import (
    MAX_CHUNK_BYTES,
    MAX_COMMAND_CHARS,
    MAX_PANE_ID_CHARS,
    MAX_PATH_CHARS,
    MAX_TITLE_CHARS,
    PANE_TYPE,
    JsonObject,
    Name,
    Position,
    Timestamp,
    bounded_json,
    no_nul,
)

__all__ = ["PaneHistoryChunk", "PaneRecord", "SessionRecord", "SessionTree", "TabRecord", "TemplateRecord"]


class _Record(BaseModel):
    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        strict=False,
        ser_json_bytes="base64",
        val_json_bytes="base64",
    )


class SessionRecord(_Record):
    """A terminal session: the root of tabs, panes and scrollback."""

    id: UUID
    name: Name
    template_name: Name | None = None
    created_at: Timestamp
    last_active: Timestamp

    _check_text = field_validator("name", "template_name")(no_nul)


class TabRecord(_Record):
    """A tab of a session. ``layout_blob`` is the tab's layout (JSONB)."""

    id: UUID
    session_id: UUID
    position: Position
    name: Name
    layout_blob: JsonObject = Field(default_factory=dict)

    _check_text = field_validator("name")(no_nul)
    _check_json = field_validator("layout_blob")(bounded_json)


class PaneRecord(_Record):
    """A pane of a tab. ``pane_id`` is the terminal's own id (``"terminal_3"``)."""

    id: UUID
    tab_id: UUID
    pane_id: Annotated[str, StringConstraints(min_length=1, max_length=MAX_PANE_ID_CHARS)]
    pane_type: Annotated[str, StringConstraints(pattern=PANE_TYPE.pattern)]
    component_state: JsonObject = Field(default_factory=dict)
    title: Annotated[str, StringConstraints(max_length=MAX_TITLE_CHARS)] = ""
    cwd: Annotated[str, StringConstraints(max_length=MAX_PATH_CHARS)] | None = None
    command: Annotated[str, StringConstraints(max_length=MAX_COMMAND_CHARS)] | None = None

    _check_text = field_validator("pane_id", "title", "cwd", "command")(no_nul)
    _check_json = field_validator("component_state")(bounded_json)


class PaneHistoryChunk(_Record):
    """One chunk of a pane's scrollback. ``pane_id`` is the pane row's id."""

    pane_id: UUID
    chunk_index: Position
    content: Annotated[bytes, Field(max_length=MAX_CHUNK_BYTES)]


class TemplateRecord(_Record):
    """A layout template, keyed by ``name``. ``definition`` is a JSON layout description."""

    id: UUID
    name: Name
    definition: JsonObject = Field(default_factory=dict)

    _check_text = field_validator("name")(no_nul)
    _check_json = field_validator("definition")(bounded_json)


@dataclass(frozen=True, slots=True)
class SessionTree:
    """A stored session read whole, in one snapshot (:meth:`PersistenceManager.restore_session_tree`).

    ``tabs`` in position order; ``panes`` maps each tab's id to its panes in ``pane_id`` order
    (every tab has an entry); ``history`` maps a pane's id to its scrollback, for the panes
    that have any, and is empty unless the history was asked for.
    """

    session: SessionRecord
    tabs: list[TabRecord]
    panes: dict[UUID, list[PaneRecord]]
    history: dict[UUID, bytes] = field(default_factory=dict)
