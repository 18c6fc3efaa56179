"""Zellij layouts of stored sessions: a session document as the JSON layout vocabulary, and as KDL.

The vocabulary (a template's ``definition``, a tab's ``layout_blob``) and its KDL form are
:mod:`perth_pipeline.kdl`'s; this module builds that vocabulary out of a stored session's
tabs and panes (see docs/scrollback-templates.md). ``LayoutError``, ``definition_to_kdl`` and
``kdl_to_definition`` are re-exported here, where callers have always found them.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from typing import Any

from .kdl import DIRECTIONS, MAX_DEPTH, LayoutError, definition_to_kdl, kdl_string, kdl_to_definition

__all__ = [
    "LayoutError",
    "definition_to_kdl",
    "kdl_to_definition",
    "session_definition",
    "to_kdl",
]


# --- a stored session -> the JSON vocabulary ---------------------------------------------------------


def _direction(spec: Mapping[str, Any]) -> str | None:
    value = spec.get("split_direction", spec.get("direction"))
    if isinstance(value, str) and value.lower() in DIRECTIONS:
        return value.lower()
    return None


def _size(value: Any, *, numbers_are_percent: bool) -> int | str | None:
    """A zellij size: ``"N%"`` or a fixed number of lines/columns; None when unusable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        if not 0 < value < 1 << 31:
            return None
        if numbers_are_percent:
            return f"{max(1, min(100, round(value)))}%" if value <= 100 else None
        return int(value) if float(value).is_integer() else f"{max(1, min(100, round(value)))}%"
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\d{1,3}%", text) and 0 < int(text[:-1]) <= 100:
            return text
        if re.fullmatch(r"\d{1,9}", text) and int(text) > 0:
            return int(text)
    return None


def _sizes(value: Any, count: int) -> list[int | str | None] | None:
    """A split's ``sizes`` (numbers are percentages), when there is one per child."""
    if not isinstance(value, list) or len(value) != count:
        return None
    return [_size(v, numbers_are_percent=True) for v in value]


def _command(command: str) -> list[str]:
    try:
        argv = shlex.split(command)
    except ValueError:  # unbalanced quotes: let a shell make sense of it, as the terminal did
        return ["sh", "-c", command]
    return argv


def _pane_node(pane: Mapping[str, Any], size: int | str | None = None) -> dict[str, Any]:
    node: dict[str, Any] = {}
    if size is not None:
        node["size"] = size
    title = pane.get("title")
    if isinstance(title, str) and title:
        node["name"] = title
    state = pane.get("component_state")
    location = None
    if pane.get("pane_type") == "plugin" and isinstance(state, Mapping):
        found = state.get("location", state.get("url"))
        location = found if isinstance(found, str) and found else None
    if location is not None:
        node["plugin"] = {"location": location}
        return node
    cwd = pane.get("cwd")
    if isinstance(cwd, str) and cwd:
        node["cwd"] = cwd
    command = pane.get("command")
    if isinstance(command, str) and command.strip():
        argv = _command(command)
        if argv:
            node["command"] = argv[0]
            if argv[1:]:
                node["args"] = argv[1:]
    return node


class _Pool:
    """The stored panes of a tab, taken by the tree of its ``layout_blob`` by ``pane_id``."""

    def __init__(self, panes: list[Mapping[str, Any]]) -> None:
        self.panes = panes
        self.taken: set[int] = set()

    def take(self, pane_id: Any) -> Mapping[str, Any] | None:
        for index, pane in enumerate(self.panes):
            if index not in self.taken and pane.get("pane_id") == pane_id:
                self.taken.add(index)
                return pane
        return None

    def rest(self) -> list[Mapping[str, Any]]:
        return [p for i, p in enumerate(self.panes) if i not in self.taken]


def _from_tree(
    spec: Any, pool: _Pool, size: int | str | None = None, depth: int = 0
) -> dict[str, Any] | None:
    """A node of a ``layout_blob`` tree, its leaves bound to stored panes (None if nothing is left)."""
    if not isinstance(spec, Mapping) or depth > MAX_DEPTH:
        return None
    own = _size(spec.get("size"), numbers_are_percent=False)
    size = own if own is not None else size
    kids = spec.get("panes")
    if isinstance(kids, list):
        sizes = _sizes(spec.get("sizes"), len(kids)) or [None] * len(kids)
        children = [
            c
            for k, s in zip(kids, sizes, strict=True)
            if (c := _from_tree(k, pool, s, depth + 1)) is not None
        ]
        if not children:
            return None
        node: dict[str, Any] = {} if size is None else {"size": size}
        direction = _direction(spec)
        if direction is not None:
            node["split_direction"] = direction
        node["panes"] = children
        return node
    pane = pool.take(spec.get("pane_id"))
    return None if pane is None else _pane_node(pane, size)


def _tab_node(tab: Mapping[str, Any]) -> dict[str, Any]:
    panes = [p for p in tab.get("panes") or [] if isinstance(p, Mapping)]
    blob = tab.get("layout_blob")
    spec: Mapping[str, Any] = blob if isinstance(blob, Mapping) else {}
    if isinstance(spec.get("split"), Mapping):
        spec = spec["split"]
    node: dict[str, Any] = {"name": str(tab.get("name") or "")}
    if isinstance(spec.get("panes"), list):
        pool = _Pool(panes)
        root = _from_tree(spec, pool)
        top = [] if root is None else [root]
        # panes the tree does not place still exist: they come after it, so that none is lost
        top += [_pane_node(p) for p in pool.rest()]
    else:
        sizes = _sizes(spec.get("sizes"), len(panes)) or [None] * len(panes)
        leaves = [_pane_node(p, s) for p, s in zip(panes, sizes, strict=True)]
        direction = _direction(spec)
        top = [{"split_direction": direction, "panes": leaves}] if direction and len(leaves) > 1 else leaves
    if top:
        node["panes"] = top
    return node


def session_definition(document: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON layout of a session document (:func:`perth_pipeline.snapshot.session_document`)."""
    return {"tabs": [_tab_node(tab) for tab in document.get("tabs") or [] if isinstance(tab, Mapping)]}


def to_kdl(document: Mapping[str, Any]) -> str:
    """A zellij layout of a stored session: one ``tab`` per tab, its panes split as stored."""
    session = document.get("session")
    header = []
    if isinstance(session, Mapping):
        header.append(
            f"// perth session {kdl_string(str(session.get('name', '')))} ({session.get('id', '')})"
        )
    return "\n".join(header) + ("\n" if header else "") + definition_to_kdl(session_definition(document))
