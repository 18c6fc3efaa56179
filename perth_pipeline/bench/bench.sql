-- The benchmark's own statements (the pipeline's are in perth_pipeline/sql and schema.sql).
-- Loaded by perth_pipeline.bench.backends.queries(); each starts with a "-- name: <name>" line.

-- name: truncate
TRUNCATE sessions, tabs, panes, pane_history, templates, tombstones, template_tombstones;

-- name: count_rows
SELECT (SELECT count(*) FROM sessions) AS sessions,
       (SELECT count(*) FROM tabs) AS tabs,
       (SELECT count(*) FROM panes) AS panes;

-- name: count_panes
SELECT count(*) AS n FROM panes;

-- name: ceiling_stage
-- The ceiling: what PostgreSQL takes fastest from one Python connection.
CREATE TEMP TABLE IF NOT EXISTS ceiling_panes (
    id uuid, tab_id uuid, pane_id text, pane_type text, component_state jsonb, title text, cwd text,
    command text, session_id uuid, version bigint, origin text
) ON COMMIT DELETE ROWS;

-- name: ceiling_copy
COPY ceiling_panes (id, tab_id, pane_id, pane_type, component_state, title, cwd, command, session_id,
                    version, origin) FROM STDIN

-- name: ceiling_merge
INSERT INTO panes AS x (id, tab_id, pane_id, pane_type, component_state, title, cwd, command,
                        session_id, version, origin)
SELECT id, tab_id, pane_id, pane_type, component_state, title, cwd, command, session_id, version, origin
FROM ceiling_panes
ON CONFLICT (id) DO UPDATE SET
    tab_id = EXCLUDED.tab_id, pane_id = EXCLUDED.pane_id, pane_type = EXCLUDED.pane_type,
    component_state = EXCLUDED.component_state, title = EXCLUDED.title, cwd = EXCLUDED.cwd,
    command = EXCLUDED.command, session_id = EXCLUDED.session_id, version = EXCLUDED.version,
    origin = EXCLUDED.origin, updated_at = now()
WHERE x.version < EXCLUDED.version;

-- name: naive_upsert_pane
-- The naive design: one statement per row, one job per operation.
INSERT INTO panes AS x (id, tab_id, pane_id, pane_type, component_state, title, cwd, command,
                        session_id, version, origin)
VALUES (%(id)s, %(tab_id)s, %(pane_id)s, %(pane_type)s, %(component_state)s, %(title)s, %(cwd)s,
        %(command)s, %(session_id)s, %(version)s, 'naive')
ON CONFLICT (id) DO UPDATE SET
    tab_id = EXCLUDED.tab_id, pane_id = EXCLUDED.pane_id, pane_type = EXCLUDED.pane_type,
    component_state = EXCLUDED.component_state, title = EXCLUDED.title, cwd = EXCLUDED.cwd,
    command = EXCLUDED.command, session_id = EXCLUDED.session_id, version = EXCLUDED.version,
    updated_at = now()
WHERE x.version < EXCLUDED.version;

-- name: visible_titles
-- Freshness: what a reader sees of the watched panes right now.
SELECT id, title FROM panes WHERE session_id = %(session_id)s;
