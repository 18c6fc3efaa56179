"""The layering of docs/design.md and docs/architecture.md, checked on the source.

The library raises errors and never exits: only ``perth_pipeline/cli.py`` and
``perth_pipeline/commands/`` import click. What the terminal imports never imports the
workers. No module reaches into another's private names. No module grows into a god module.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("perth_pipeline", "workers")
MAX_MODULE_LINES = 450
MAX_CLASS_LINES = 300


def modules() -> Iterator[tuple[str, Path]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            yield name, path


def imports(name: str, path: Path) -> Iterator[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import, resolved to absolute names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield base, [alias.name for alias in node.names]


def is_cli(name: str) -> bool:
    return name == "perth_pipeline.cli" or name.startswith("perth_pipeline.commands")


def test_only_the_command_line_imports_click() -> None:
    offenders = [
        f"{name} imports {target}"
        for name, path in modules()
        if not is_cli(name)
        for target, _ in imports(name, path)
        if target.split(".")[0] == "click" or is_cli(target)
    ]
    assert not offenders, offenders


def test_the_terminal_side_never_imports_the_workers() -> None:
    offenders = [
        f"{name} imports {target}"
        for name, path in modules()
        if name.startswith("perth_pipeline") and not is_cli(name)
        for target, _ in imports(name, path)
        if target.split(".")[0] == "workers"
    ]
    assert not offenders, offenders


def test_no_module_imports_another_modules_private_names() -> None:
    offenders = [
        f"{name} takes {', '.join(private)} from {target}"
        for name, path in modules()
        for target, names in imports(name, path)
        if target.split(".")[0] in PACKAGES
        and (private := [n for n in names if n.startswith("_") and not n.startswith("__")])
    ]
    assert not offenders, offenders


@pytest.mark.parametrize(("name", "path"), list(modules()), ids=[name for name, _ in modules()])
def test_modules_and_classes_stay_small(name: str, path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    lines = len(text.splitlines())
    assert lines <= MAX_MODULE_LINES, f"{name} has {lines} lines (at most {MAX_MODULE_LINES}: split it)"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
            size = node.end_lineno - node.lineno + 1
            assert size <= MAX_CLASS_LINES, f"{name}.{node.name} has {size} lines (at most {MAX_CLASS_LINES})"
