"""A stored session as one document: the session, its tabs in order, each with its panes."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from .producer import PersistenceManager

__all__ = ["session_document"]


def session_document(
    manager: PersistenceManager, session_id: UUID, *, wait: float | None = None, with_history: bool = False
) -> dict[str, Any]:
    """``{"session": {...}, "tabs": [{...tab fields..., "panes": [{...}]}]}`` (JSON-ready).

    Waits (bounded) for the session's queued batches once, then reads. With
    ``with_history`` each pane also carries ``history`` (bytes, not JSON-ready).
    """
    session = manager.restore_session(session_id, wait=wait)
    document: dict[str, Any] = {"session": session.model_dump(mode="json"), "tabs": []}
    for tab in manager.restore_tabs(session_id, wait=0):
        entry = tab.model_dump(mode="json")
        panes = []
        for pane in manager.restore_panes(tab.id, wait=0):
            pane_doc = pane.model_dump(mode="json")
            if with_history:
                pane_doc["history"] = manager.restore_pane_history(pane.id, wait=0)
            panes.append(pane_doc)
        entry["panes"] = panes
        document["tabs"].append(entry)
    return document
