"""The JSON layout vocabulary and zellij's KDL v1, both ways: rendering and parsing.

One JSON vocabulary serves three purposes: a template's ``definition``, the tree
a tab's ``layout_blob`` may hold, and the intermediate form of a session being
exported. It mirrors zellij's layout nodes (see docs/scrollback-templates.md):

* a container (the layout, a tab, a pane) is an object whose scalar members are
  the node's properties (``name``, ``cwd``, ``command``, ``size``,
  ``split_direction``...), with ``panes`` (its children, in order), ``tabs``,
  ``floating_panes``, ``args`` (a list of strings) and ``plugin`` (an object with
  ``location`` and the plugin's configuration);
* ``{"children": true}`` in ``panes`` is zellij's ``children`` placeholder, and
  ``{"template": "NAME", ...}`` an instance of a ``pane_template``/``tab_template``
  (both live in ``pane_templates``/``tab_templates``, lists of containers);
* anything else zellij has (swap layouts...) is kept verbatim in ``kdl_nodes``
  (``{"name", "args", "props", "children"}``), so nothing of a layout is lost.

:mod:`perth_pipeline.layout` builds this vocabulary out of a stored session.

Rendering needs nothing but the standard library; parsing KDL needs ``kdl-py``
(the ``layouts`` extra).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["DIRECTIONS", "MAX_DEPTH", "LayoutError", "definition_to_kdl", "kdl_string", "kdl_to_definition"]

DIRECTIONS = frozenset({"vertical", "horizontal"})
# members of a container that are rendered as child nodes, in this order (everything else scalar
# is a property; everything else structured becomes a generic child node)
_CHILD_ORDER = (
    "args",
    "plugin",
    "pane_templates",
    "tab_templates",
    "default_tab_template",
    "new_tab_template",
    "panes",
    "tabs",
    "floating_panes",
)
_STRUCTURAL = frozenset({*_CHILD_ORDER, "kdl_nodes", "template", "children"})
_TEMPLATE_LISTS = {"pane_template": "pane_templates", "tab_template": "tab_templates"}
_TAB_TEMPLATES = frozenset({"default_tab_template", "new_tab_template"})
_VERBATIM = frozenset({"swap_tiled_layout", "swap_floating_layout"})
_INDENT = "    "
#: deeper nesting than this is not a layout anyone drew: it is cut (and cannot exhaust the stack)
MAX_DEPTH = 64


class LayoutError(ValueError):
    """A layout file that cannot be read as a zellij layout."""


# --- rendering: JSON vocabulary -> KDL v1 --------------------------------------------------------

_BARE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_KEYWORDS = frozenset({"true", "false", "null"})
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}


def kdl_string(value: str) -> str:
    out = []
    for ch in value:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F or 0x80 <= ord(ch) < 0xA0 or ch in "\u2028\u2029\ufeff":
            # control characters (and KDL's newlines) are never written raw
            out.append(f"\\u{{{ord(ch):x}}}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _ident(name: str) -> str:
    return name if _BARE.match(name) and name not in _KEYWORDS else kdl_string(name)


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else "null"
    return kdl_string(str(value))


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def line(self, depth: int, text: str) -> None:
        self.lines.append(_INDENT * depth + text)

    def node(self, name: str, body: Mapping[str, Any], depth: int, *, leaf_props: bool = False) -> None:
        """``name`` with ``body``'s scalars as properties and its structure as children.

        ``leaf_props``: scalars other than ``location`` become child nodes (a plugin's
        configuration is read from its children).
        """
        if depth > MAX_DEPTH:
            return
        props = []
        leaves = []
        for key, value in body.items():
            if key in _STRUCTURAL or not _is_scalar(value):
                continue
            if leaf_props and key != "location":
                leaves.append(f"{_ident(key)} {_scalar(value)}")
            else:
                props.append(f"{_ident(key)}={_scalar(value)}")
        head = " ".join([_ident(name), *props])
        start = len(self.lines)
        for leaf in leaves:
            self.line(depth + 1, leaf)
        self._children(body, depth + 1)
        if len(self.lines) == start:
            self.line(depth, head)
            return
        self.lines.insert(start, _INDENT * depth + head + " {")
        self.line(depth, "}")

    def _children(self, body: Mapping[str, Any], depth: int) -> None:
        args = body.get("args")
        if isinstance(args, list) and args:
            self.line(depth, "args " + " ".join(_scalar(a) for a in args if _is_scalar(a)))
        plugin = body.get("plugin")
        if isinstance(plugin, Mapping):
            self.node("plugin", plugin, depth, leaf_props=True)
        elif isinstance(plugin, str):
            self.node("plugin", {"location": plugin}, depth)
        self._panes(body, depth)
        for key, value in body.items():
            if key not in _STRUCTURAL and not _is_scalar(value):
                self._generic(key, value, depth)
        for raw in _mappings(body.get("kdl_nodes")):
            self.raw(raw, depth)

    def _panes(self, body: Mapping[str, Any], depth: int) -> None:
        """Templates, then panes, tabs and floating panes, in that order."""
        for key, node_name in (("pane_templates", "pane_template"), ("tab_templates", "tab_template")):
            for template in _mappings(body.get(key)):
                self.node(node_name, template, depth)
        for key in _TAB_TEMPLATES:
            if isinstance(body.get(key), Mapping):
                self.node(key, body[key], depth)
        for pane in _mappings(body.get("panes")):
            self.pane(pane, depth)
        for tab in _mappings(body.get("tabs")):
            self.node("tab", tab, depth)
        floating = list(_mappings(body.get("floating_panes")))
        if floating:
            self.line(depth, "floating_panes {")
            for pane in floating:
                self.pane(pane, depth + 1)
            self.line(depth, "}")

    def pane(self, pane: Mapping[str, Any], depth: int) -> None:
        if pane.get("children") is True:
            self.line(depth, "children")
            return
        template = pane.get("template")
        self.node(template if isinstance(template, str) and template else "pane", pane, depth)

    def _generic(self, key: str, value: Any, depth: int) -> None:
        if isinstance(value, Mapping):
            self.node(key, value, depth)
        elif isinstance(value, list) and all(_is_scalar(v) for v in value):
            self.line(depth, " ".join([_ident(key), *(_scalar(v) for v in value)]))
        elif isinstance(value, list):
            for item in value:
                self._generic(key, item, depth)

    def raw(self, raw: Mapping[str, Any], depth: int) -> None:
        name = raw.get("name")
        if not isinstance(name, str) or not name or depth > MAX_DEPTH:
            return
        parts = [_ident(name)]
        parts += [_scalar(a) for a in raw.get("args") or [] if _is_scalar(a)]
        props = raw.get("props")
        if isinstance(props, Mapping):
            parts += [f"{_ident(str(k))}={_scalar(v)}" for k, v in props.items() if _is_scalar(v)]
        children = list(_mappings(raw.get("children")))
        if not children:
            self.line(depth, " ".join(parts))
            return
        self.line(depth, " ".join(parts) + " {")
        for child in children:
            self.raw(child, depth + 1)
        self.line(depth, "}")


def _mappings(value: Any) -> Iterable[Mapping[str, Any]]:
    if isinstance(value, list):
        return [v for v in value if isinstance(v, Mapping)]
    return []


def definition_to_kdl(definition: Mapping[str, Any]) -> str:
    """A zellij layout file from a template definition (the JSON vocabulary above)."""
    writer = _Writer()
    body = {k: v for k, v in definition.items() if k != "kdl_top_level"}
    writer.node("layout", body, 0)
    if writer.lines == ["layout"]:
        writer.lines = ["layout {", "}"]
    for raw in _mappings(definition.get("kdl_top_level")):
        writer.raw(raw, 0)
    return "\n".join(writer.lines) + "\n"


# --- parsing: KDL v1 -> the JSON vocabulary --------------------------------------------------------


def _value(value: Any) -> Any:
    """A KDL value (kdl-py, non-native) as JSON: integers stay integers, tags are dropped."""
    from kdl.types import Binary, Bool, Decimal, Hex, Null, Octal, RawString, String

    if isinstance(value, Decimal):
        if isinstance(value.mantissa, int) and value.exponent >= 0:
            return value.mantissa * 10**value.exponent
        return float(value.value)
    if isinstance(value, Bool | Null | String | RawString | Hex | Octal | Binary):
        return value.value
    return value if _is_scalar(value) else str(value)


def _raw(node: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"name": node.name}
    if node.args:
        raw["args"] = [_value(a) for a in node.args]
    if node.props:
        raw["props"] = {k: _value(v) for k, v in node.props.items()}
    if node.nodes:
        raw["children"] = [_raw(c) for c in node.nodes]
    return raw


def _container(node: Any) -> dict[str, Any]:  # noqa: C901  (one branch per kind of zellij node)
    body: dict[str, Any] = {k: _value(v) for k, v in node.props.items()}
    panes: list[dict[str, Any]] = []
    for child in node.nodes:
        name = child.name
        if name == "args":
            body["args"] = [_value(a) for a in child.args]
        elif len(child.args) == 1 and not child.props and not child.nodes and name not in _STRUCTURAL:
            body[name] = _value(child.args[0])  # a property written as a child: `cwd "/"`
        elif child.args or name in _VERBATIM:
            body.setdefault("kdl_nodes", []).append(_raw(child))
        elif name == "plugin":
            body["plugin"] = _container(child)
        elif name == "tab":
            body.setdefault("tabs", []).append(_container(child))
        elif name == "floating_panes" and not child.props:
            body.setdefault("floating_panes", []).extend(_container(child).get("panes", []))
        elif name in _TEMPLATE_LISTS:
            body.setdefault(_TEMPLATE_LISTS[name], []).append(_container(child))
        elif name in _TAB_TEMPLATES:
            body[name] = _container(child)
        elif name == "children" and not child.props and not child.nodes:
            panes.append({"children": True})
        elif name == "pane":
            panes.append(_container(child))
        elif name in _STRUCTURAL:
            body.setdefault("kdl_nodes", []).append(_raw(child))
        else:  # an instance of a pane_template or tab_template defined in the layout
            panes.append({"template": name, **_container(child)})
    if panes:
        body["panes"] = panes
    return body


def kdl_to_definition(text: str) -> dict[str, Any]:
    """A template definition from a zellij layout file (KDL v1). Raises :class:`LayoutError`."""
    try:
        from kdl.errors import ParseError
        from kdl.parsefuncs import parse
        from kdl.parsing import ParseConfig
    except ImportError:  # pragma: no cover - the extra is part of every dev install
        raise LayoutError("reading KDL layouts needs kdl-py: pip install 'perth-pipeline[layouts]'") from None
    try:
        document = parse(text, ParseConfig(nativeUntaggedValues=False, nativeTaggedValues=False))
    except ParseError as exc:
        raise LayoutError(f"not a KDL document: {exc}") from None
    layouts = [n for n in document.nodes if n.name == "layout"]
    if len(layouts) != 1 or layouts[0].args:
        raise LayoutError("a zellij layout file has exactly one top-level `layout { ... }` node")
    definition = _container(layouts[0])
    others = [_raw(n) for n in document.nodes if n.name != "layout"]
    if others:
        definition["kdl_top_level"] = others
    return definition
