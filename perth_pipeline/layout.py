"""Zellij layouts (KDL v1): out of a stored session or a template, and in from a layout file.

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

Rendering needs nothing but the standard library; parsing KDL needs ``kdl-py``
(the ``layouts`` extra).
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "LayoutError",
    "definition_to_kdl",
    "kdl_to_definition",
    "session_definition",
    "to_kdl",
]

_DIRECTIONS = frozenset({"vertical", "horizontal"})
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
_MAX_DEPTH = 64


class LayoutError(ValueError):
    """A layout file that cannot be read as a zellij layout."""


# --- rendering: JSON vocabulary -> KDL v1 --------------------------------------------------------

_BARE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_KEYWORDS = frozenset({"true", "false", "null"})
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}


def _string(value: str) -> str:
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
    return name if _BARE.match(name) and name not in _KEYWORDS else _string(name)


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else "null"
    return _string(str(value))


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
        if depth > _MAX_DEPTH:
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
        if not isinstance(name, str) or not name or depth > _MAX_DEPTH:
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


# --- a stored session -> the JSON vocabulary ---------------------------------------------------------


def _direction(spec: Mapping[str, Any]) -> str | None:
    value = spec.get("split_direction", spec.get("direction"))
    if isinstance(value, str) and value.lower() in _DIRECTIONS:
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
    if not isinstance(spec, Mapping) or depth > _MAX_DEPTH:
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
        header.append(f"// perth session {_string(str(session.get('name', '')))} ({session.get('id', '')})")
    return "\n".join(header) + ("\n" if header else "") + definition_to_kdl(session_definition(document))


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
