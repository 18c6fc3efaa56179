"""A stored session as one document: the session, its tabs in order, each with its panes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from uuid import UUID

if TYPE_CHECKING:
    from .producer import PersistenceManager
    from .reader import Reader

__all__ = ["session_document"]


def session_document(
    manager: PersistenceManager | Reader,
    session_id: UUID,
    *,
    wait: float | None = None,
    with_history: bool = False,
) -> dict[str, Any]:
    """``{"session": {...}, "tabs": [{...tab fields..., "panes": [{...}]}]}`` (JSON-ready).

    One read of the whole session (``restore_session_tree`` of a manager, or of a
    :class:`~perth_pipeline.reader.Reader` where no producer runs): it waits
    (bounded) for the session's queued batches once, then reads one snapshot. With
    ``with_history`` each pane also carries ``history`` (bytes, not JSON-ready).
    """
    tree = manager.restore_session_tree(session_id, wait=wait, with_history=with_history)
    document: dict[str, Any] = {"session": tree.session.model_dump(mode="json"), "tabs": []}
    for tab in tree.tabs:
        entry = tab.model_dump(mode="json")
        panes = []
        for pane in tree.panes[tab.id]:
            pane_doc = pane.model_dump(mode="json")
            if with_history:
                pane_doc["history"] = tree.history.get(pane.id, b"")
            panes.append(pane_doc)
        entry["panes"] = panes
        document["tabs"].append(entry)
    return document
