"""The scrollback waiting to be sent: chunks in write order, bounded by what they cost in memory.

A part of the buffer (:mod:`perth_pipeline.buffer`), kept apart because its rules are its own:

* Chunks are appended, never coalesced, and sent in write order (``seq``).
* **No head-of-line blocking.** A chunk can only be sent once its pane's tab and session are
  known. One that is not routable yet is *parked* with the other chunks of its pane, and the
  chunks of every other pane go on; parked chunks go back in line, in write order, when the
  route is learnt (from the terminal's own writes, a restore, or the database). Nothing is
  dropped because time passed.
* **Bounded by memory, not content.** A chunk costs its content plus a fixed overhead (the
  record, its bookkeeping and the queue's slot: about 640 bytes here, measured with
  ``tracemalloc``; a test keeps the figure honest). Past the bound the oldest chunks go first,
  parked or not, counted: gaps on restore.

No lock of its own: every method runs under the buffer's lock.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from uuid import UUID

from .records import PaneHistoryChunk

__all__ = ["CHUNK_OVERHEAD", "Chunk", "Route", "Scrollback"]

#: Bytes a pending chunk costs besides its content: the ``PaneHistoryChunk`` (object, field dict,
#: fields-set), the :class:`Chunk` around it, its integers and the queue's slot. 636 bytes measured
#: on CPython 3.11 (tests/unit/test_scrollback.py checks the figure against ``tracemalloc``).
CHUNK_OVERHEAD = 640

#: A pane's ancestors ``(tab_id, session_id)``; ``None`` in either place while unknown.
Route = tuple[UUID | None, UUID | None]


@dataclass(slots=True)
class Chunk:
    chunk: PaneHistoryChunk
    pane: int  # the pane's id as the buffer keys it (``UUID.int``)
    version: int
    seq: int
    tab_id: UUID | None
    session_id: UUID | None

    @property
    def size(self) -> int:
        return len(self.chunk.content)

    @property
    def cost(self) -> int:
        return len(self.chunk.content) + CHUNK_OVERHEAD


def _seq_of(chunk: Chunk) -> int:
    return chunk.seq


class Scrollback:
    """Pending chunks: a line of routable ones in seq order, and the parked ones by pane."""

    def __init__(self, max_bytes: int, counters: dict[str, int]) -> None:
        self.max_bytes = max_bytes
        self.counters = counters  # the buffer's: dropped_chunks, dropped_chunk_bytes, superseded
        self._line: deque[Chunk] = deque()
        # pane (int) -> its chunks that wait for a route, in seq order; panes in the order they
        # were parked, so the first one holds (about) the oldest parked chunk
        self._parked: dict[int, deque[Chunk]] = {}
        self._parked_count = 0
        self._per_pane: dict[int, int] = {}  # pane (int) -> its chunks, in line or parked
        self.cost = 0  # what the pending chunks cost in memory: the bound counts this
        self.content_bytes = 0

    def __len__(self) -> int:
        return len(self._line) + self._parked_count

    @property
    def parked(self) -> int:
        return self._parked_count

    def has_ready(self) -> bool:
        return bool(self._line)

    def append(self, chunk: Chunk) -> None:
        parked = self._parked.get(chunk.pane)
        if parked is not None and chunk.session_id is None:
            parked.append(chunk)  # behind its pane's parked chunks, not in line
            self._parked_count += 1
        else:
            self._line.append(chunk)
        self._added(chunk)
        self.evict()

    def take(self, budget: int, route_of: Callable[[int], Route], gone: Callable[[int], bool]) -> list[Chunk]:
        """Up to ``budget`` routable chunks in seq order; unroutable ones are parked on the way."""
        out: list[Chunk] = []
        line = self._line
        looked = 0
        while line and len(out) < budget and looked < 4 * budget:
            looked += 1
            chunk = line.popleft()
            if chunk.session_id is None:
                if gone(chunk.pane):
                    self._superseded(chunk)
                    continue
                chunk.tab_id, chunk.session_id = route_of(chunk.pane)
                if chunk.session_id is None:
                    self._park(chunk)
                    continue
            self._gone(chunk)
            out.append(chunk)
        return out

    def parked_panes(self) -> list[UUID]:
        return [chunks[0].chunk.pane_id for chunks in self._parked.values()]

    def release(self, route_of: Callable[[int], Route], gone: Callable[[int], bool]) -> int:
        """Put back in line the parked chunks whose pane is routable now; drop a gone pane's."""
        if not self._parked:
            return 0
        released: list[Chunk] = []
        for pane in list(self._parked):
            if gone(pane):
                self.drop_panes({pane})
                continue
            tab_id, session_id = route_of(pane)
            if session_id is None:
                continue
            chunks = self._parked.pop(pane)
            self._parked_count -= len(chunks)
            for chunk in chunks:
                chunk.tab_id, chunk.session_id = tab_id, session_id
            released.extend(chunks)
        if released:
            self._merge(released)
        return len(released)

    def restore(self, chunks: Iterable[Chunk]) -> int:
        """Give back chunks that were taken and not delivered (they keep their seq: in order)."""
        restored = sorted(chunks, key=_seq_of)
        if not restored:
            return 0
        self._merge(restored)
        for chunk in restored:
            self._added(chunk)
        self.evict()
        return len(restored)

    def drop_panes(self, panes: set[int]) -> None:
        """Everything pending of these panes is moot (deleted): gone, counted as superseded."""
        if panes.isdisjoint(self._per_pane):
            return
        for pane in panes:
            parked = self._parked.pop(pane, None)
            if parked is not None:
                self._parked_count -= len(parked)
                for chunk in parked:
                    self._superseded(chunk)
        if not panes.isdisjoint(self._per_pane):
            kept: deque[Chunk] = deque()
            for chunk in self._line:
                if chunk.pane in panes:
                    self._superseded(chunk)
                else:
                    kept.append(chunk)
            self._line = kept

    def evict(self) -> None:
        """Past the bound, the oldest pending chunks go first (counted: gaps on restore)."""
        while self.cost > self.max_bytes and (self._line or self._parked):
            parked_head = next(iter(self._parked.values()))[0] if self._parked else None
            if parked_head is None or (self._line and self._line[0].seq < parked_head.seq):
                old = self._line.popleft()
            else:
                old = self._unpark_head(parked_head.pane)
            self._gone(old)
            self.counters["dropped_chunks"] += 1
            self.counters["dropped_chunk_bytes"] += old.size

    def min_seq(self) -> int | None:
        seqs = [chunks[0].seq for chunks in self._parked.values()]
        if self._line:
            seqs.append(self._line[0].seq)
        return min(seqs) if seqs else None

    # --- bookkeeping ------------------------------------------------------------------------

    def _park(self, chunk: Chunk) -> None:
        parked = self._parked.get(chunk.pane)
        if parked is None:
            self._parked[chunk.pane] = deque((chunk,))
        else:
            parked.append(chunk)
        self._parked_count += 1

    def _unpark_head(self, pane: int) -> Chunk:
        parked = self._parked[pane]
        chunk = parked.popleft()
        if not parked:
            del self._parked[pane]
        self._parked_count -= 1
        return chunk

    def _merge(self, chunks: list[Chunk]) -> None:
        # the line is in seq order: merge the returning chunks in (usually all older than it)
        chunks.sort(key=_seq_of)
        newest = chunks[-1].seq
        younger: list[Chunk] = []
        while self._line and self._line[0].seq < newest:
            younger.append(self._line.popleft())
        for chunk in reversed(list(heapq.merge(younger, chunks, key=_seq_of))):
            self._line.appendleft(chunk)

    def _added(self, chunk: Chunk) -> None:
        self.cost += chunk.cost
        self.content_bytes += chunk.size
        self._per_pane[chunk.pane] = self._per_pane.get(chunk.pane, 0) + 1

    def _gone(self, chunk: Chunk) -> None:
        self.cost -= chunk.cost
        self.content_bytes -= chunk.size
        left = self._per_pane.get(chunk.pane, 0) - 1
        if left > 0:
            self._per_pane[chunk.pane] = left
        else:
            self._per_pane.pop(chunk.pane, None)

    def _superseded(self, chunk: Chunk) -> None:
        self._gone(chunk)
        self.counters["superseded"] += 1
