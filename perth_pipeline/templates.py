"""Template definitions as people write them: a JSON object or a zellij KDL layout.

A template's ``definition`` is a JSON layout description (see :mod:`perth_pipeline.layout`);
``perth-pipeline templates save`` (perth_pipeline/commands/templates.py) reads it through
:func:`load_definition`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .layout import kdl_to_definition

__all__ = ["load_definition"]


def load_definition(text: str, fmt: str = "auto", *, source: str = "") -> dict[str, Any]:
    """A template definition from JSON (an object) or a zellij KDL layout.

    ``fmt`` "auto": by ``source``'s extension, else JSON if the text is a JSON object.
    Raises ``ValueError`` with a message for the user.
    """
    if fmt == "auto":
        suffix = Path(source).suffix.lower()
        if suffix in (".kdl", ".json"):
            fmt = suffix[1:]
        else:
            fmt = "json" if text.lstrip().startswith("{") else "kdl"
    if fmt == "kdl":
        return kdl_to_definition(text)
    try:
        definition = json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply (a template is at most 128 levels deep)") from None
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(definition, dict):
        raise ValueError(f"a template definition is a JSON object, not a {type(definition).__name__}")
    return definition
