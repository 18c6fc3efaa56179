"""Where each buffered tab and pane goes: the parent index, learnt routes and held writes.

A part of the buffer (:mod:`perth_pipeline.buffer`), kept apart because its rules are its own:

* **A delete reaches everything under it.** Every entity is linked under its parent (a tab under
  its session, a pane under its tab; a pane under a tab this buffer does not hold also links that
  tab under its session), so that a delete supersedes what is buffered below it in time
  proportional to that, never to the buffer.
* **Nothing goes out without its route.** A tab is sent with its session, a pane with its tab and
  session. Routes come from the terminal's own writes, and otherwise from restores and database
  look-ups (:meth:`RouteIndex.learn`, bounded, oldest forgotten first).
* **A delay is never a loss.** A dirty tab or pane whose route is unknown is *held*, out of the
  drains' way (so a drain's work stays proportional to what was written since the last), until
  its route is learnt; nothing decides a loss by time.
* **Only this terminal's own delete makes scrollback moot.** Panes it deleted (or whose tab or
  session it deleted) are remembered as gone, with their routes, bounded: a chunk appended to one
  afterwards is superseded at once, and a later delete of one knows where to go. A pane known
  only by a tombstone read from the database is routed like any other (another terminal may have
  created it again; the workers judge by version).

No lock of its own: every method runs under the buffer's lock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any
from uuid import UUID

from .entries import PANE, SESSION, TAB, Entry, Key, parent_of
from .scrollback import Route

__all__ = ["GONE_MEMORY", "RouteIndex"]

#: Panes remembered as gone (deleted by this terminal), oldest forgotten first.
GONE_MEMORY = 65_536


class RouteIndex:
    """The parent index, the routes learnt for entities the buffer does not hold, and held keys.

    Runs under the buffer's lock (it has none of its own). ``live`` is the buffer's own table of
    entries, read here, never changed.
    """

    def __init__(self, live: dict[Key, Entry], max_routes: int) -> None:
        self._live = live
        self._max_routes = max_routes
        # parent id (int) -> keys of the children written under it (a tab's session, a pane's tab;
        # a pane under a tab this buffer does not hold also links that tab under its session)
        self.children: dict[int, set[Key]] = {}
        # ancestors learnt from restores or database look-ups, for entities this buffer does not
        # hold, by id (int)
        self._tab_routes: OrderedDict[int, UUID] = OrderedDict()
        self._pane_routes: OrderedDict[int, tuple[UUID, UUID]] = OrderedDict()
        # panes this terminal deleted (or whose tab or session it deleted), with their route:
        # a chunk appended to one afterwards is moot (superseded at once, not held)
        self._gone_panes: OrderedDict[int, Route] = OrderedDict()
        self.unrouted: set[Key] = set()  # dirty tabs and panes whose session is not known yet
        # Dirty tabs and panes found unroutable by a drain wait here (key -> seq, as in the dirty
        # map), out of the drains' way, until their route is learnt.
        self.held: dict[Key, int] = {}
        self.held_min: int | None = None  # a lower bound of the seqs in held
        self.changed = False  # a route was learnt since held keys were last looked at

    # --- the parent index ---------------------------------------------------------------------

    def link(self, parent_id: int, key: Key) -> None:
        children = self.children.get(parent_id)
        if children is None:
            self.children[parent_id] = {key}
        else:
            children.add(key)

    def unlink(self, parent_id: int, key: Key) -> None:
        children = self.children.get(parent_id)
        if children is not None:
            children.discard(key)
            if not children:
                del self.children[parent_id]

    def link_foreign_tab(self, tab_id: int, session_id: int) -> None:
        # a pane under a tab this buffer does not hold: a delete of the session must still find it
        key = (TAB, tab_id)
        if key not in self._live:
            self.link(session_id, key)

    def placed(self, key: Key, entry: Entry, old_parent: int | None) -> None:
        """An entry (re)written with its ancestors: linked under its parent, which may be new."""
        parent = parent_of(key, entry)
        if old_parent != parent and old_parent is not None:
            self.unlink(old_parent, key)
        if parent is not None:
            self.link(parent, key)
        if key[0] == PANE:
            self._gone_panes.pop(key[1], None)  # created again: its scrollback counts again
            self.changed = True  # its parked chunks may be routable now
        elif key[0] == TAB:
            self.changed = True  # held panes under it may be routable now

    def removed(self, key: Key, entry: Entry) -> None:
        """An entry forgotten for good: unlinked from its parent."""
        parent = parent_of(key, entry)
        if parent is not None:
            self.unlink(parent, key)

    def cascade(
        self, parent_id: int, kind: str, route: Route, drop: Callable[[Key, Entry], None]
    ) -> set[int]:
        """Call ``drop`` on every entry buffered under a deleted entity; return the panes it takes.

        ``route`` is the deleted entity's ``(tab_id, session_id)``. The panes it takes with it are
        remembered as gone, with their routes: a later chunk of one is moot, and a later delete
        of one knows where to go.
        """
        stack = [parent_id]
        doomed: dict[int, Route] = {parent_id: route} if kind == PANE else {}
        while stack:
            current = stack.pop()
            for child_key in self.children.pop(current, ()):
                child = self._live.get(child_key)
                if child is not None:
                    if parent_of(child_key, child) != current:
                        continue  # re-created under another parent since: not under this one
                    drop(child_key, child)
                stack.append(child_key[1])
                if child_key[0] == PANE:
                    doomed[child_key[1]] = (None, None) if child is None else (child.tab_id, child.session_id)
        for pane, pane_route in doomed.items():
            self._remember_gone(pane, pane_route)
        return set(doomed)

    # --- routes -------------------------------------------------------------------------------

    def session_of_tab(self, tab_id: int) -> UUID | None:
        tab = self._live.get((TAB, tab_id))
        if tab is not None and tab.session_id is not None:
            return tab.session_id
        return self._tab_routes.get(tab_id)

    def route_of_pane(self, pane_id: int) -> Route:
        pane = self._live.get((PANE, pane_id))
        if pane is not None and pane.tab_id is not None:
            return pane.tab_id, pane.session_id or self.session_of_tab(pane.tab_id.int)
        route = self._pane_routes.get(pane_id) or self._gone_panes.get(pane_id)
        return route if route is not None else (None, None)

    def route_unknown(self, kind: str, entity_id: Any) -> Route:
        """The route of an entity the buffer does not hold, from what it learnt."""
        if kind == SESSION:
            return None, entity_id
        if kind == TAB:
            return None, self._tab_routes.get(entity_id.int)
        if kind == PANE:
            return self.route_of_pane(entity_id.int)
        return None, None

    def created(self, kind: str, ident: int) -> None:
        """A tab or pane the buffer holds now: its own entry routes it, not what was learnt."""
        if kind == TAB:
            self._tab_routes.pop(ident, None)
        elif kind == PANE:
            self._pane_routes.pop(ident, None)

    def learn(self, tabs: dict[UUID, UUID], panes: dict[UUID, tuple[UUID, UUID]]) -> None:
        for tab_id, session_id in tabs.items():
            ident = tab_id.int
            self._tab_routes[ident] = session_id
            self._tab_routes.move_to_end(ident)
        for pane_id, route in panes.items():
            ident = pane_id.int
            self._pane_routes[ident] = route
            self._pane_routes.move_to_end(ident)
        for routes in (self._tab_routes, self._pane_routes):
            while len(routes) > self._max_routes:
                routes.popitem(last=False)
        self.changed = True

    def is_gone(self, pane_id: int) -> bool:
        return pane_id in self._gone_panes

    def _remember_gone(self, pane: int, route: Route) -> None:
        self._gone_panes[pane] = route
        self._gone_panes.move_to_end(pane)
        if len(self._gone_panes) > GONE_MEMORY:
            self._gone_panes.popitem(last=False)

    # --- unrouted and held keys ---------------------------------------------------------------

    def track(self, key: Key, entry: Entry) -> None:
        """A key made dirty: noted as unrouted while its session is unknown."""
        if entry.session_id is None and key[0] in (TAB, PANE):
            self.unrouted.add(key)
        elif self.unrouted:
            self.unrouted.discard(key)

    def routed(self, key: Key, entry: Entry) -> bool:
        """Find the session of a tab or pane from what is known now (and link it if found)."""
        kind = key[0]
        if entry.session_id is not None:
            pass  # known since (a tab created again names its session in its record)
        elif kind == TAB:
            entry.session_id = self._tab_routes.get(key[1])
        elif kind == PANE:
            if entry.tab_id is None:
                entry.tab_id, entry.session_id = self.route_of_pane(key[1])
            else:
                entry.session_id = self.session_of_tab(entry.tab_id.int)
        if entry.session_id is None:
            return False
        self.unrouted.discard(key)
        if kind == TAB:
            self.link(entry.session_id.int, key)
        elif entry.tab_id is not None:
            self.link(entry.tab_id.int, key)
            self.link_foreign_tab(entry.tab_id.int, entry.session_id.int)
        return True

    def hold(self, key: Key, seq: int) -> None:
        self.held[key] = seq
        self.held_min = seq if self.held_min is None else min(self.held_min, seq)

    def rehold(self, key: Key, seq: int) -> bool:
        """A lost write of a held key: it waits under the older of the two seqs. False: not held."""
        current = self.held.get(key)
        if current is None:
            return False
        if seq < current:
            self.hold(key, seq)
        return True

    def unhold(self, key: Key) -> bool:
        """Forget a held key (superseded). False: it was not held."""
        if self.held.pop(key, None) is None:
            return False
        if not self.held:
            self.held_min = None
        return True

    def release(self, keys: Iterable[Key]) -> list[tuple[Key, Entry, int]]:
        """Which of these held keys are routable now: taken out of the held ones, with their seqs."""
        out: list[tuple[Key, Entry, int]] = []
        for key in keys:
            seq = self.held.get(key)
            if seq is None:
                continue  # superseded meanwhile
            entry = self._live.get(key)
            if entry is None:
                del self.held[key]
            elif self.routed(key, entry):
                del self.held[key]
                out.append((key, entry, seq))
        if not self.held:
            self.held_min = None
        return out

    def missing(self, parked_panes: Iterable[UUID]) -> tuple[list[UUID], list[UUID]]:
        """Tab ids whose session, and pane ids whose tab and session, are not known.

        ``parked_panes``: the panes whose chunks wait for a route.
        """
        tabs: set[UUID] = set()
        panes: set[UUID] = set()
        for key in [*self.held, *self.unrouted]:
            entry = self._live.get(key)
            if entry is None:
                self.unrouted.discard(key)
            elif key in self.unrouted and self.routed(key, entry):
                continue
            elif key[0] == PANE and entry.tab_id is not None:
                tabs.add(entry.tab_id)
            elif key[0] == PANE:
                panes.add(entry.ident)
            else:
                tabs.add(entry.ident)
        for pane_id in parked_panes:
            pane = self._live.get((PANE, pane_id.int))
            if pane is not None and pane.tab_id is not None:
                tabs.add(pane.tab_id)
            else:
                panes.add(pane_id)
        return sorted(tabs), sorted(panes)
