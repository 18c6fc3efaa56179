"""perth-pipeline from a script: write a session, tab, panes and scrollback, then restore them.

Runs as is (python examples/quickstart.py): PersistenceManager.embedded() starts the embedded
Redis and PostgreSQL in PERTH_DATA_DIR (or reuses the ones `perth-pipeline up` runs there),
and a worker in this process. Against your own servers, with `perth-pipeline worker` running:
PersistenceManager(redis_url="redis://...", database_url="postgresql://...").
"""

import uuid
from datetime import UTC, datetime

from perth_pipeline import PaneHistoryChunk, PaneRecord, PersistenceManager, SessionRecord, TabRecord

now = datetime.now(UTC)
session = SessionRecord(id=uuid.uuid4(), name="work", created_at=now, last_active=now)
tab = TabRecord(id=uuid.uuid4(), session_id=session.id, position=0, name="editor")
shell = PaneRecord(
    id=uuid.uuid4(), tab_id=tab.id, pane_id="terminal_1", pane_type="terminal", title="zsh", cwd="/home/me"
)
editor = PaneRecord(
    id=uuid.uuid4(), tab_id=tab.id, pane_id="terminal_2", pane_type="terminal", title="vim", cwd="/src"
)

with PersistenceManager.embedded() as manager:
    # write calls return at once; a background thread sends them, a worker commits them
    manager.create_session(session)
    manager.create_tab(tab)
    manager.create_pane(shell)
    manager.create_pane(editor)
    manager.update_pane(editor.model_copy(update={"title": "vim notes.md"}))  # the latest state wins
    manager.append_pane_history(PaneHistoryChunk(pane_id=shell.id, chunk_index=0, content=b"$ make test\n"))
    manager.append_pane_history(PaneHistoryChunk(pane_id=shell.id, chunk_index=1, content=b"12 passed\n"))
    # optional: wait until a worker has committed every write (False if none did in time)
    print("committed:", manager.flush(timeout=10.0))

    tree = manager.restore_session_tree(session.id)  # .session, .tabs, .panes[tab_id], .history[pane_id]
    print(f"session {tree.session.name!r} ({tree.session.id})")
    for restored_tab in tree.tabs:
        print(f"  tab {restored_tab.position} {restored_tab.name!r}")
        for pane in tree.panes[restored_tab.id]:
            print(f"    pane {pane.pane_id} {pane.title!r} in {pane.cwd}")
            for line in tree.history.get(pane.id, b"").decode().splitlines():
                print(f"      | {line}")
