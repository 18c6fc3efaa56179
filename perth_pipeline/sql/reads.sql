-- Named queries of the producer side (restores, look-ups). Loaded by perth_pipeline.queries.
-- Each starts with a "-- name: <name>" line; parameters are psycopg placeholders.

-- name: restore_session
SELECT id, name, template_name, created_at, last_active, version
FROM sessions
WHERE id = %(id)s;

-- name: restore_tabs
SELECT id, session_id, position, name, layout_blob, version
FROM tabs
WHERE session_id = %(session_id)s
ORDER BY position, id;

-- name: restore_panes
SELECT id, tab_id, pane_id, pane_type, component_state, title, cwd, command, version
FROM panes
WHERE tab_id = %(tab_id)s
ORDER BY pane_id, id;

-- The whole session at once (Store.session_tree): the same rows as restore_tabs, restore_panes
-- of each tab and pane_history of each of those panes, in one snapshot. A pane is reached through
-- its tab, as restore_panes reaches it: one whose tab is not stored (yet) is not part of the tree.

-- name: restore_panes_of_session
SELECT p.id, p.tab_id, p.pane_id, p.pane_type, p.component_state, p.title, p.cwd, p.command, p.version
FROM tabs t
JOIN panes p ON p.tab_id = t.id
WHERE t.session_id = %(session_id)s
ORDER BY p.tab_id, p.pane_id, p.id;

-- name: history_of_session
SELECT h.pane_id, h.chunk_index, h.encoding, h.raw_size, h.content
FROM tabs t
JOIN panes p ON p.tab_id = t.id
JOIN pane_history h ON h.pane_id = p.id
WHERE t.session_id = %(session_id)s
ORDER BY h.pane_id, h.chunk_index;

-- name: pane_history
SELECT chunk_index, encoding, raw_size, content
FROM pane_history
WHERE pane_id = %(pane_id)s
ORDER BY chunk_index;

-- name: list_sessions
SELECT id, name, template_name, created_at, last_active, version
FROM sessions
ORDER BY last_active DESC, id
LIMIT %(limit)s;

-- name: session_summaries
-- The list of `perth-pipeline sessions`: each session with the tabs and panes a restore shows
-- (a pane is reached through its stored tab, as restore_panes_of_session reaches it).
SELECT s.id, s.name, s.template_name, s.created_at, s.last_active, s.version,
       (SELECT count(*) FROM tabs t WHERE t.session_id = s.id) AS tab_count,
       (SELECT count(*) FROM tabs t JOIN panes p ON p.tab_id = t.id WHERE t.session_id = s.id) AS pane_count
FROM sessions s
ORDER BY s.last_active DESC, s.id
LIMIT %(limit)s;

-- name: find_sessions
-- The sessions a person may mean by a name or an id prefix (%(prefix)s: lower-case hex and
-- dashes followed by %, or NULL when the text cannot begin an id).
SELECT id, name, template_name, created_at, last_active, version
FROM sessions
WHERE name = %(name)s OR (%(prefix)s::text IS NOT NULL AND id::text LIKE %(prefix)s::text)
ORDER BY last_active DESC, id
LIMIT %(limit)s;

-- name: get_template
SELECT id, name, definition, version
FROM templates
WHERE name = %(name)s;

-- name: list_templates
SELECT id, name, definition, version
FROM templates
ORDER BY name;

-- name: session_of_tab
SELECT session_id FROM tabs WHERE id = %(tab_id)s;

-- name: route_of_pane
SELECT tab_id, session_id FROM panes WHERE id = %(pane_id)s;

-- name: tab_routes
-- The session of each tab, from its row or, for a deleted tab, from its tombstone (tombstones
-- written before schema migration 2 carry no ancestors: such a tab stays unknown).
SELECT id, session_id FROM tabs WHERE id = ANY(%(ids)s)
UNION ALL
SELECT d.id, d.session_id FROM tombstones d
WHERE d.kind = 'tab' AND d.id = ANY(%(ids)s) AND d.session_id IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM tabs t WHERE t.id = d.id);

-- name: pane_routes
-- The tab and session of each pane, from its row or from its tombstone.
SELECT id, tab_id, session_id FROM panes WHERE id = ANY(%(ids)s)
UNION ALL
SELECT d.id, d.tab_id, d.session_id FROM tombstones d
WHERE d.kind = 'pane' AND d.id = ANY(%(ids)s) AND d.tab_id IS NOT NULL AND d.session_id IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM panes p WHERE p.id = d.id);

-- name: schema_version
SELECT coalesce(max(version), 0) AS version FROM schema_migrations;

-- name: ping
SELECT 1;
