"""The records the benchmark writes: a tree of sessions, tabs and panes, and terminal-like scrollback.

Everything is built before any timing starts (pydantic validation of a record is
the caller's cost, not the producer's), and the harness then freezes it with
``gc.freeze()``, as a long-running host does with its start-up state.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from perth_pipeline import PaneHistoryChunk, PaneRecord, SessionRecord, TabRecord

if TYPE_CHECKING:
    from perth_pipeline import PersistenceManager

__all__ = ["Tree", "build_tree", "scrollback", "title_updates", "write_tree"]

_COMMANDS = ("make test", "git status", "cargo build --release", "ls -la", "pytest -q", "tail -f app.log")
_WORDS = ("ok", "passed", "compiling", "warning:", "error:", "src/main.rs", "done", "in", "0.42s", "FAILED")


@dataclass(slots=True)
class Tree:
    """``sessions`` x ``tabs`` x ``panes``: the records of one workload, in creation order."""

    sessions: list[SessionRecord] = field(default_factory=list)
    tabs: list[TabRecord] = field(default_factory=list)
    panes: list[PaneRecord] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.sessions) + len(self.tabs) + len(self.panes)

    def session_of_pane(self) -> dict[uuid.UUID, uuid.UUID]:
        tab_session = {t.id: t.session_id for t in self.tabs}
        return {p.id: tab_session[p.tab_id] for p in self.panes}


def build_tree(sessions: int, tabs: int, panes: int, *, seed: int = 1, name: str = "bench") -> Tree:
    """``sessions`` sessions holding ``tabs`` tabs in all, holding ``panes`` panes in all (spread evenly)."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    tree = Tree()
    for s in range(sessions):
        tree.sessions.append(
            SessionRecord(id=uuid.uuid4(), name=f"{name}-{s}", created_at=now, last_active=now)
        )
    for t in range(tabs):
        per_session = max(1, tabs // sessions)
        session = tree.sessions[min(t // per_session, sessions - 1)]
        tree.tabs.append(
            TabRecord(
                id=uuid.uuid4(),
                session_id=session.id,
                position=t % per_session,
                name=f"tab {t % per_session}",
                layout_blob={"direction": "vertical", "sizes": [50, 50], "focus": t % 2},
            )
        )
    # panes grouped by tab, tabs by session: the order in which a terminal opens them
    for n in range(panes):
        tab = tree.tabs[n * tabs // panes]
        tree.panes.append(
            PaneRecord(
                id=uuid.uuid4(),
                tab_id=tab.id,
                pane_id=f"terminal_{n}",
                pane_type="terminal",
                component_state={"scroll": rng.randint(0, 5000), "cols": 120, "rows": 40},
                title=f"zsh {n}",
                cwd=f"/home/perth/src/project-{n % 37}",
                command=None,
            )
        )
    return tree


def write_tree(manager: PersistenceManager, tree: Tree) -> None:
    """Every record of ``tree`` through ``manager``'s write calls, parents first."""
    for s in tree.sessions:
        manager.create_session(s)
    for t in tree.tabs:
        manager.create_tab(t)
    for p in tree.panes:
        manager.create_pane(p)


def title_updates(panes: list[PaneRecord], count: int, *, seed: int = 2) -> list[PaneRecord]:
    """``count`` updates of ``panes`` (a new title and scroll position each), round robin."""
    rng = random.Random(seed)
    out = []
    for n in range(count):
        pane = panes[n % len(panes)]
        out.append(
            pane.model_copy(
                update={
                    "title": f"vim notes-{n}.md",
                    "component_state": {"scroll": rng.randint(0, 5000), "cols": 120, "rows": 40},
                }
            )
        )
    return out


def scrollback(pane_id: uuid.UUID, total: int, chunk: int, *, seed: int = 3) -> list[PaneHistoryChunk]:
    """``total`` bytes of shell-like output for one pane, in chunks of about ``chunk`` bytes."""
    rng = random.Random(seed)
    chunks: list[PaneHistoryChunk] = []
    written = 0
    while written < total:
        size = min(chunk, total - written)
        lines: list[str] = []
        length = 0
        while length < size:
            if rng.random() < 0.1:
                line = f"$ {rng.choice(_COMMANDS)}"
            else:
                line = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 12)))
                line += f" {rng.randint(0, 99999)}"
            lines.append(line)
            length += len(line) + 1
        content = ("\n".join(lines) + "\n").encode()[:size]
        chunks.append(PaneHistoryChunk(pane_id=pane_id, chunk_index=len(chunks), content=content))
        written += len(content)
    return chunks
