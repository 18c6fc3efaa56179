"""Zellij layouts (KDL v1) out of a stored session."""

from __future__ import annotations

from typing import Any

__all__ = ["to_kdl"]


def _quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def to_kdl(document: dict[str, Any]) -> str:
    """A zellij layout: one ``tab`` per stored tab, one ``pane`` per stored pane."""
    lines = ["layout {"]
    for tab in document["tabs"]:
        lines.append(f"    tab name={_quote(tab['name'])} {{")
        for pane in tab["panes"]:
            attrs = []
            if pane.get("cwd"):
                attrs.append(f"cwd={_quote(pane['cwd'])}")
            if pane.get("command"):
                attrs.append(f"command={_quote(pane['command'])}")
            lines.append("        pane" + ("" if not attrs else " " + " ".join(attrs)))
        lines.append("    }")
    lines.append("}")
    return "\n".join(lines)
