"""Zellij layouts: a stored session out as KDL (parsed back with kdl-py), KDL in as a template definition."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from perth_pipeline import PaneHistoryChunk, PersistenceManager
from perth_pipeline.layout import LayoutError, definition_to_kdl, kdl_to_definition, to_kdl
from perth_pipeline.settings import Settings

from ..helpers import pane, require_module, run_cli, session, settle, tab

kdl = require_module("kdl")


def _parse(text: str) -> Any:
    return kdl.parse(text)


def _props(node: Any) -> dict[str, Any]:
    return dict(node.props)


def _document(tabs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"session": {"id": str(uuid.uuid4()), "name": "work"}, "tabs": tabs}


def test_a_flat_split_becomes_a_container_with_percent_sizes() -> None:
    document = _document(
        [
            {
                "name": "editor",
                "layout_blob": {"direction": "vertical", "sizes": [30, 70]},
                "panes": [
                    {
                        "pane_id": "terminal_1",
                        "pane_type": "terminal",
                        "title": "vim",
                        "cwd": "/src",
                        "command": "vim -O 'a file.txt' b.txt",
                    },
                    {
                        "pane_id": "terminal_2",
                        "pane_type": "terminal",
                        "title": "",
                        "cwd": "/tmp",
                        "command": None,
                    },
                ],
            }
        ]
    )
    layout = _parse(to_kdl(document))
    (root,) = layout.nodes
    assert root.name == "layout"
    (t,) = root.nodes
    assert (t.name, _props(t)) == ("tab", {"name": "editor"})
    (split,) = t.nodes
    assert (split.name, _props(split)) == ("pane", {"split_direction": "vertical"})
    first, second = split.nodes
    assert _props(first) == {"size": "30%", "name": "vim", "cwd": "/src", "command": "vim"}
    assert [(n.name, n.args) for n in first.nodes] == [("args", ["-O", "a file.txt", "b.txt"])]
    assert _props(second) == {"size": "70%", "cwd": "/tmp"}
    assert second.nodes == []


def test_a_tree_in_the_layout_blob_places_panes_by_pane_id_and_keeps_the_rest() -> None:
    tree = {
        "split_direction": "vertical",
        "panes": [
            {"pane_id": "terminal_1", "size": "60%"},
            {
                "split_direction": "horizontal",
                "sizes": [25, 75],
                "panes": [
                    {"pane_id": "terminal_3"},
                    {"pane_id": "terminal_2"},
                ],
            },
            {"pane_id": "terminal_9"},  # no such pane any more: left out
        ],
    }
    panes: list[dict[str, Any]] = [
        {"pane_id": f"terminal_{n}", "pane_type": "terminal", "title": f"t{n}", "cwd": None, "command": None}
        for n in (1, 2, 3, 4)
    ]
    panes.append(
        {
            "pane_id": "plugin_1",
            "pane_type": "plugin",
            "title": "bar",
            "component_state": {"location": "zellij:tab-bar"},
            "cwd": None,
            "command": None,
        }
    )
    (t,) = _parse(to_kdl(_document([{"name": "code", "layout_blob": tree, "panes": panes}]))).nodes[0].nodes
    root, leftover, plugin = t.nodes
    assert _props(root) == {"split_direction": "vertical"}
    left, right = root.nodes
    assert _props(left) == {"size": "60%", "name": "t1"}
    assert _props(right) == {"split_direction": "horizontal"}
    assert [_props(n) for n in right.nodes] == [{"size": "25%", "name": "t3"}, {"size": "75%", "name": "t2"}]
    # panes the tree does not place come after it; none is lost
    assert _props(leftover) == {"name": "t4"}
    assert _props(plugin) == {"name": "bar"}
    (location,) = plugin.nodes
    assert (location.name, _props(location)) == ("plugin", {"location": "zellij:tab-bar"})


def test_names_and_commands_with_any_characters_survive_the_round_trip() -> None:
    nasty = 'he said "hi" \\ \n\ttab\x1b[0m — ünïcode ✓'
    document = _document(
        [
            {
                "name": nasty,
                "layout_blob": {"unknown": {"shape": True}, "sizes": "not a list"},
                "panes": [
                    {
                        "pane_id": "terminal_1",
                        "pane_type": "terminal",
                        "title": nasty,
                        "cwd": '/path with spaces/"q"',
                        "command": "echo 'unbalanced",
                    }
                ],
            },
            {"name": "empty", "layout_blob": {}, "panes": []},
        ]
    )
    first, second = _parse(to_kdl(document)).nodes[0].nodes
    assert _props(first)["name"] == nasty
    (p,) = first.nodes
    assert _props(p) == {"name": nasty, "cwd": '/path with spaces/"q"', "command": "sh"}
    assert p.nodes[0].args == ["-c", "echo 'unbalanced"]  # a shell makes sense of it, as it did
    assert (_props(second), second.nodes) == ({"name": "empty"}, [])


ZELLIJ_LAYOUT = r"""
layout {
    default_tab_template {
        pane size=1 borderless=true {
            plugin location="zellij:tab-bar"
        }
        children
        pane size=2 borderless=true {
            plugin location="zellij:status-bar" {
                classic true
            }
        }
    }
    pane_template name="htop" {
        command "htop"
        close_on_exit true
    }
    tab name="editor" focus=true {
        pane split_direction="vertical" {
            pane size="60%" cwd="/src" command="nvim" {
                args "-O" "main.rs" "lib.rs"
            }
            pane split_direction="horizontal" {
                htop
                pane command="cargo" { args "watch"; start_suspended true; }
            }
        }
        floating_panes {
            pane x="10%" y=2 width="80%" command="lazygit"
        }
    }
    tab name="logs" cwd="/var/log" {
        pane command="tail" {
            args "-f" "syslog"
        }
    }
    swap_tiled_layout name="stacked" {
        tab min_panes=5 {
            pane stacked=true { children; }
        }
    }
}
"""


def test_a_zellij_layout_file_converts_to_a_json_definition_and_back() -> None:
    definition = kdl_to_definition(ZELLIJ_LAYOUT)
    editor, logs = definition["tabs"]
    assert editor["name"] == "editor" and editor["focus"] is True
    (split,) = editor["panes"]
    assert split["split_direction"] == "vertical"
    nvim, right = split["panes"]
    assert nvim == {"size": "60%", "cwd": "/src", "command": "nvim", "args": ["-O", "main.rs", "lib.rs"]}
    assert right["panes"] == [
        {"template": "htop"},
        {"command": "cargo", "args": ["watch"], "start_suspended": True},
    ]
    assert editor["floating_panes"] == [{"x": "10%", "y": 2, "width": "80%", "command": "lazygit"}]
    assert logs == {
        "name": "logs",
        "cwd": "/var/log",
        "panes": [{"command": "tail", "args": ["-f", "syslog"]}],
    }
    bar = definition["default_tab_template"]["panes"]
    assert bar[0] == {"size": 1, "borderless": True, "plugin": {"location": "zellij:tab-bar"}}
    assert bar[1] == {"children": True}
    assert bar[2]["plugin"] == {"location": "zellij:status-bar", "classic": True}
    assert definition["pane_templates"] == [{"name": "htop", "command": "htop", "close_on_exit": True}]
    assert definition["kdl_nodes"][0]["name"] == "swap_tiled_layout"
    # and back: the layout written from the definition reads as the same definition
    text = definition_to_kdl(definition)
    assert kdl_to_definition(text) == definition
    # a plugin's configuration stays in its children, where zellij reads it
    (template,) = [n for n in _parse(text).nodes[0].nodes if n.name == "default_tab_template"]
    status_bar = template.nodes[2].nodes[0]
    assert (status_bar.name, _props(status_bar)) == ("plugin", {"location": "zellij:status-bar"})
    assert [(n.name, n.args) for n in status_bar.nodes] == [("classic", [True])]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("layout { pane size= }", "not a KDL document"),
        ('tab name="x"', "exactly one top-level `layout"),
        ("layout\nlayout", "exactly one top-level `layout"),
    ],
)
def test_what_is_not_a_zellij_layout_is_refused_with_a_reason(text: str, message: str) -> None:
    with pytest.raises(LayoutError, match=message):
        kdl_to_definition(text)


@pytest.fixture
def split_session(settings: Settings) -> dict[str, Any]:
    """A stored session: three tabs, flat and nested splits, a command pane, scrollback."""
    s = session("layout-work")
    editor = tab(s.id, 0, name="editor", layout_blob={"direction": "vertical", "sizes": [40, 60]})
    tree = {
        "split_direction": "horizontal",
        "panes": [
            {"pane_id": "terminal_1", "size": "30%"},
            {"split_direction": "vertical", "panes": [{"pane_id": "terminal_2"}, {"pane_id": "terminal_3"}]},
        ],
    }
    servers = tab(s.id, 1, name="servers", layout_blob=tree)
    scratch = tab(s.id, 2, name="scratch", layout_blob={})
    panes = [
        pane(editor.id, 1, title="vim", cwd="/src", command="vim ."),
        pane(editor.id, 2, title="shell", cwd="/src"),
        pane(servers.id, 1, title="api", cwd="/srv/api", command="make run"),
        pane(servers.id, 2, title="db", cwd="/srv", command="psql"),
        pane(servers.id, 3, title="logs", cwd="/var/log", command="tail -f app.log"),
        pane(scratch.id, 1, title="zsh", cwd=None),
    ]
    history = {panes[0].id: [b"first\n", b"\x00\xff binary \x1b[0m\n"], panes[2].id: [b"serving\n" * 100]}
    with PersistenceManager(settings=settings) as manager:
        manager.create_session(s)
        for t in (scratch, servers, editor):
            manager.create_tab(t)
        for p in panes:
            manager.create_pane(p)
        for pane_id, chunks in history.items():
            for i, content in enumerate(chunks):
                manager.append_pane_history(PaneHistoryChunk(pane_id=pane_id, chunk_index=i, content=content))
        settle(manager, settings)
    return {"session": s, "panes": panes, "history": history}


def test_restore_format_kdl_prints_a_zellij_layout_of_the_session(
    settings: Settings, split_session: dict[str, Any]
) -> None:
    result = run_cli(settings, "restore", str(split_session["session"].id), "--format", "kdl")
    assert result.returncode == 0, result.stderr
    (layout,) = _parse(result.stdout).nodes
    editor, servers, scratch = layout.nodes
    assert [_props(t)["name"] for t in (editor, servers, scratch)] == ["editor", "servers", "scratch"]

    (split,) = editor.nodes
    assert _props(split) == {"split_direction": "vertical"}
    vim, shell = split.nodes
    assert _props(vim) == {"size": "40%", "name": "vim", "cwd": "/src", "command": "vim"}
    assert vim.nodes[0].args == ["."]
    assert _props(shell) == {"size": "60%", "name": "shell", "cwd": "/src"}

    (root,) = servers.nodes
    assert _props(root) == {"split_direction": "horizontal"}
    api, nested = root.nodes
    assert _props(api) == {"size": "30%", "name": "api", "cwd": "/srv/api", "command": "make"}
    assert api.nodes[0].args == ["run"]
    assert _props(nested) == {"split_direction": "vertical"}
    assert [_props(n)["name"] for n in nested.nodes] == ["db", "logs"]
    assert [n.nodes[0].args for n in nested.nodes if n.nodes] == [["-f", "app.log"]]

    (zsh,) = scratch.nodes
    assert _props(zsh) == {"name": "zsh"}


def test_restore_with_history_writes_each_panes_scrollback_to_a_file(
    settings: Settings, split_session: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "history"
    result = run_cli(
        settings, "restore", str(split_session["session"].id), "--format", "kdl", "--with-history", str(out)
    )
    assert result.returncode == 0, result.stderr
    _parse(result.stdout)  # still a layout: the files are on the side
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(files) == len(split_session["panes"])
    positions: dict[Any, int] = {}  # the panes are listed tab by tab: editor (0), servers (1), scratch (2)
    for p in split_session["panes"]:
        position = positions.setdefault(p.tab_id, len(positions))
        # named by the tab's position and the pane's own pane_id, not by the row's UUID
        assert files[f"tab-{position}-{p.pane_id}.log"] == b"".join(split_session["history"].get(p.id, []))


def test_an_absurdly_deep_layout_blob_is_cut_not_a_crash() -> None:
    tree: dict[str, Any] = {"pane_id": "terminal_1"}
    for _ in range(5000):
        tree = {"split_direction": "vertical", "panes": [tree]}
    panes = [
        {"pane_id": "terminal_1", "pane_type": "terminal", "title": "deep", "cwd": None, "command": None}
    ]
    (t,) = _parse(to_kdl(_document([{"name": "deep", "layout_blob": tree, "panes": panes}]))).nodes[0].nodes
    assert [_props(p) for p in t.nodes] == [{"name": "deep"}]  # the pane is kept, the nesting is not
