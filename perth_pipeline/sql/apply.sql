-- The statements of workers.applier: one batch, one transaction, one statement per kind.
--
-- A batch is first copied (COPY) into temporary staging tables, then merged with one
-- set-based statement per entity kind. Rows are merged in key order, so that two
-- batches merging overlapping rows lock them in the same order. Every merge is
-- idempotent and commutative: a row changes only when the incoming (version, origin) is
-- higher, and a write below its own tombstone or an ancestor's is dead.

-- name: create_stage
-- The applier copies rows in COPY's binary format (no text to escape on the client, no text to
-- parse on the server); the types the applier sends are the columns' (workers.applier._COPY_TYPES).
-- JSON is staged as the text the worker encoded and becomes jsonb in the merge, as it is stored.
-- No ON COMMIT DELETE ROWS: PostgreSQL would truncate every such table, with its TOAST table and
-- index, at each commit (a file truncation each: 20 to 80 ms a batch on a disk mounted with
-- discard). The applier empties the tables it filled at the end of the same transaction
-- (clear_stage) and truncates one only once its dead rows have piled up (truncate_stage).
CREATE TEMP TABLE IF NOT EXISTS stage_sessions (
    id uuid, name text, template_name text, created_at timestamptz, last_active timestamptz,
    version bigint, origin text
);
CREATE TEMP TABLE IF NOT EXISTS stage_touches (id uuid, last_active timestamptz);
CREATE TEMP TABLE IF NOT EXISTS stage_tabs (
    id uuid, session_id uuid, position integer, name text, layout_blob text, version bigint, origin text
);
CREATE TEMP TABLE IF NOT EXISTS stage_panes (
    id uuid, tab_id uuid, pane_id text, pane_type text, component_state text, title text, cwd text,
    command text, session_id uuid, version bigint, origin text
);
CREATE TEMP TABLE IF NOT EXISTS stage_history (
    pane_id uuid, chunk_index integer, content bytea, encoding text, raw_size integer, tab_id uuid,
    session_id uuid, version bigint, origin text
);
CREATE TEMP TABLE IF NOT EXISTS stage_deletes (
    kind text, id uuid, version bigint, origin text, tab_id uuid, session_id uuid
);
-- (a connection that staged deletes before schema migration 2 has the table without these)
ALTER TABLE stage_deletes ADD COLUMN IF NOT EXISTS tab_id uuid, ADD COLUMN IF NOT EXISTS session_id uuid;
CREATE TEMP TABLE IF NOT EXISTS stage_templates (
    name text, id uuid, definition text, version bigint, origin text
);
CREATE TEMP TABLE IF NOT EXISTS stage_template_deletes (
    name text, version bigint, origin text
);
-- Staged values are read once: compressing them (pglz, the server's default) is wasted work.
-- (Scrollback arrives zstd-compressed from the producer: compressing it again is wasted twice.)
ALTER TABLE stage_tabs ALTER COLUMN layout_blob SET STORAGE EXTERNAL;
ALTER TABLE stage_panes ALTER COLUMN component_state SET STORAGE EXTERNAL;
ALTER TABLE stage_templates ALTER COLUMN definition SET STORAGE EXTERNAL;
ALTER TABLE stage_history ALTER COLUMN content SET STORAGE EXTERNAL;

-- name: clear_stage
DELETE FROM {table}

-- name: truncate_stage
TRUNCATE {table}

-- name: lock_keys
-- One advisory lock per session (and per template name) the batch touches, taken in the
-- ascending order of the array, so that two batches never wait for each other's keys in a
-- cycle. A batch that deletes anything in a session (or deletes a template) takes the key
-- exclusively; one that only upserts takes it shared. perth_pipeline/sql/retention.sql takes
-- the same keys exclusively.
--
-- Why upserts can share: the exclusive lock is there for deletes. A cascade (delete the tab's
-- panes written below the delete) cannot see a pane that a concurrent transaction is inserting,
-- and that transaction's tombstone check cannot see the delete's uncommitted tombstone: run
-- together, both would commit and leave a pane below its tab's tombstone. Exclusive against
-- shared, one of them waits for the other to commit, and its next statement (a new snapshot,
-- READ COMMITTED) sees what the other wrote. Two batches that only upsert need no such
-- ordering: no tombstone changes under them, each merge is "write if (version, origin) is
-- higher" and ON CONFLICT DO UPDATE re-checks that against the latest committed row after
-- waiting for its row lock (last_active and touches are max registers, likewise re-checked),
-- so any interleaving gives the rows of either order. Rows are merged in key order, kind by
-- kind, so that they take their row locks in one order; a deadlock left (an index page, a
-- retention delete) is retried by the applier. Scrollback retention (retain_history) of two
-- concurrent batches of one pane sees less than one after the other would: it may keep an old
-- chunk until the pane's next append, never delete one that the serial order would keep.
SELECT count(CASE WHEN u.exclusive THEN pg_advisory_xact_lock(u.k) ELSE pg_advisory_xact_lock_shared(u.k) END)
FROM unnest(%(keys)s::bigint[], %(exclusive)s::boolean[]) WITH ORDINALITY AS u(k, exclusive, n);

-- name: copy_sessions
COPY stage_sessions (id, name, template_name, created_at, last_active, version, origin) FROM STDIN (FORMAT BINARY)

-- name: copy_touches
COPY stage_touches (id, last_active) FROM STDIN (FORMAT BINARY)

-- name: copy_tabs
COPY stage_tabs (id, session_id, position, name, layout_blob, version, origin) FROM STDIN (FORMAT BINARY)

-- name: copy_panes
COPY stage_panes (id, tab_id, pane_id, pane_type, component_state, title, cwd, command, session_id, version, origin)
FROM STDIN (FORMAT BINARY)

-- name: copy_history
COPY stage_history (pane_id, chunk_index, content, encoding, raw_size, tab_id, session_id, version, origin)
FROM STDIN (FORMAT BINARY)

-- name: copy_deletes
COPY stage_deletes (kind, id, version, origin, tab_id, session_id) FROM STDIN (FORMAT BINARY)

-- name: copy_templates
COPY stage_templates (name, id, definition, version, origin) FROM STDIN (FORMAT BINARY)

-- name: copy_template_deletes
COPY stage_template_deletes (name, version, origin) FROM STDIN (FORMAT BINARY)

-- name: upsert_tombstones
-- A tombstone keeps the deleted entity's ancestors (a tab's session, a pane's tab and session, a
-- session's own id): a producer that does not hold a deleted tab or pane learns from it where its
-- writes belong. A newer delete replaces the tombstone with its ancestors; an older one (arriving
-- late, or again) only fills ancestors the tombstone lacks (one written by the cleanup, or
-- before schema migration 2). An entity's ancestors never change, so either is right.
INSERT INTO tombstones AS t (id, kind, version, origin, tab_id, session_id)
SELECT DISTINCT ON (id) id, kind, version, origin, tab_id, session_id
FROM stage_deletes
ORDER BY id, version DESC, origin DESC
ON CONFLICT (id) DO UPDATE SET
    kind = CASE WHEN (t.version, t.origin) < (EXCLUDED.version, EXCLUDED.origin) THEN EXCLUDED.kind ELSE t.kind END,
    deleted_at = CASE WHEN (t.version, t.origin) < (EXCLUDED.version, EXCLUDED.origin)
                      THEN now() ELSE t.deleted_at END,
    tab_id = coalesce(EXCLUDED.tab_id, t.tab_id),
    session_id = coalesce(EXCLUDED.session_id, t.session_id),
    origin = CASE WHEN (t.version, t.origin) < (EXCLUDED.version, EXCLUDED.origin)
                  THEN EXCLUDED.origin ELSE t.origin END,
    version = GREATEST(t.version, EXCLUDED.version)
WHERE (t.version, t.origin) < (EXCLUDED.version, EXCLUDED.origin)
   OR (t.session_id IS NULL AND EXCLUDED.session_id IS NOT NULL)
   OR (t.tab_id IS NULL AND EXCLUDED.tab_id IS NOT NULL);

-- name: delete_sessions
DELETE FROM sessions x USING stage_deletes d
WHERE d.kind = 'session' AND x.id = d.id AND (x.version, x.origin) < (d.version, d.origin);

-- name: delete_tabs
DELETE FROM tabs x USING stage_deletes d
WHERE d.kind = 'tab' AND x.id = d.id AND (x.version, x.origin) < (d.version, d.origin);

-- name: delete_tabs_of_sessions
DELETE FROM tabs x USING stage_deletes d
WHERE d.kind = 'session' AND x.session_id = d.id AND (x.version, x.origin) < (d.version, d.origin);

-- name: delete_panes
DELETE FROM panes x USING stage_deletes d
WHERE d.kind = 'pane' AND x.id = d.id AND (x.version, x.origin) < (d.version, d.origin);

-- name: delete_panes_of_tabs
DELETE FROM panes x USING stage_deletes d
WHERE d.kind = 'tab' AND x.tab_id = d.id AND (x.version, x.origin) < (d.version, d.origin);

-- name: delete_panes_of_sessions
DELETE FROM panes x USING stage_deletes d
WHERE d.kind = 'session' AND x.session_id = d.id AND (x.version, x.origin) < (d.version, d.origin);

-- name: delete_history_of_panes
DELETE FROM pane_history x USING stage_deletes d
WHERE d.kind = 'pane' AND x.pane_id = d.id AND (x.version, x.origin) < (d.version, d.origin);

-- name: delete_history_of_tabs
DELETE FROM pane_history x USING stage_deletes d
WHERE d.kind = 'tab' AND x.tab_id = d.id AND (x.version, x.origin) < (d.version, d.origin);

-- name: delete_history_of_sessions
DELETE FROM pane_history x USING stage_deletes d
WHERE d.kind = 'session' AND x.session_id = d.id AND (x.version, x.origin) < (d.version, d.origin);

-- name: upsert_sessions
-- last_active only grows (a max register, so the order of apply does not matter);
-- every other field is last-writer-wins by (version, origin).
INSERT INTO sessions AS x (id, name, template_name, created_at, last_active, version, origin)
SELECT s.id, s.name, s.template_name, s.created_at, s.last_active, s.version, s.origin
FROM stage_sessions s
WHERE NOT EXISTS (
    SELECT 1 FROM tombstones t WHERE t.id = s.id AND (t.version, t.origin) > (s.version, s.origin)
)
ORDER BY s.id
ON CONFLICT (id) DO UPDATE SET
    name = CASE WHEN (x.version, x.origin) < (EXCLUDED.version, EXCLUDED.origin)
                THEN EXCLUDED.name ELSE x.name END,
    template_name = CASE WHEN (x.version, x.origin) < (EXCLUDED.version, EXCLUDED.origin)
                         THEN EXCLUDED.template_name ELSE x.template_name END,
    created_at = CASE WHEN (x.version, x.origin) < (EXCLUDED.version, EXCLUDED.origin)
                      THEN EXCLUDED.created_at ELSE x.created_at END,
    last_active = GREATEST(x.last_active, EXCLUDED.last_active),
    origin = CASE WHEN (x.version, x.origin) < (EXCLUDED.version, EXCLUDED.origin)
                  THEN EXCLUDED.origin ELSE x.origin END,
    version = GREATEST(x.version, EXCLUDED.version),
    updated_at = now()
WHERE (x.version, x.origin) < (EXCLUDED.version, EXCLUDED.origin) OR x.last_active < EXCLUDED.last_active;

-- name: apply_touches
UPDATE sessions x
SET last_active = s.last_active, updated_at = now()
FROM (SELECT id, max(last_active) AS last_active FROM stage_touches GROUP BY id ORDER BY id) s
WHERE x.id = s.id AND x.last_active < s.last_active;

-- name: raise_activity
-- Every session the batch wrote anything under (upserts, touches, deletes, scrollback) was
-- active now: the cleanup reads this besides the terminal's last_active. Sessions whose row
-- is not there yet get now() when it arrives (the column's default). Only a value older than
-- a minute is raised: the cleanup counts in days, and rewriting the session row on every batch
-- would add a row version (and its WAL) per batch, and make concurrent batches of one session,
-- which otherwise share its lock, queue on that row until each commits; this way it happens
-- once a minute per session at most. Runs with the sessions' own statements, before tabs and
-- panes, and locks its rows in id order whatever join the planner picks (the inner ORDER BY ...
-- FOR NO KEY UPDATE), so that every batch takes its row locks kind by kind in one order. A batch
-- that waits for another's raise sees it once that one commits, and skips the row.
UPDATE sessions x SET activity_at = now()
FROM (
    SELECT s.id FROM sessions s
    WHERE s.id = ANY(%(ids)s::uuid[]) AND s.activity_at < now() - interval '1 minute'
    ORDER BY s.id
    FOR NO KEY UPDATE
) u
WHERE x.id = u.id;

-- name: upsert_tabs
INSERT INTO tabs AS x (id, session_id, position, name, layout_blob, version, origin)
SELECT s.id, s.session_id, s.position, s.name, s.layout_blob::jsonb, s.version, s.origin
FROM stage_tabs s
WHERE NOT EXISTS (
    SELECT 1 FROM tombstones t
    WHERE t.id IN (s.id, s.session_id) AND (t.version, t.origin) > (s.version, s.origin)
)
ORDER BY s.id
ON CONFLICT (id) DO UPDATE SET
    session_id = EXCLUDED.session_id,
    position = EXCLUDED.position,
    name = EXCLUDED.name,
    layout_blob = EXCLUDED.layout_blob,
    version = EXCLUDED.version,
    origin = EXCLUDED.origin,
    updated_at = now()
WHERE (x.version, x.origin) < (EXCLUDED.version, EXCLUDED.origin);

-- name: upsert_panes
INSERT INTO panes AS x (id, tab_id, pane_id, pane_type, component_state, title, cwd, command,
                        session_id, version, origin)
SELECT s.id, s.tab_id, s.pane_id, s.pane_type, s.component_state::jsonb, s.title, s.cwd, s.command,
       s.session_id, s.version, s.origin
FROM stage_panes s
WHERE NOT EXISTS (
    SELECT 1 FROM tombstones t
    WHERE t.id IN (s.id, s.tab_id, s.session_id) AND (t.version, t.origin) > (s.version, s.origin)
)
ORDER BY s.id
ON CONFLICT (id) DO UPDATE SET
    tab_id = EXCLUDED.tab_id,
    pane_id = EXCLUDED.pane_id,
    pane_type = EXCLUDED.pane_type,
    component_state = EXCLUDED.component_state,
    title = EXCLUDED.title,
    cwd = EXCLUDED.cwd,
    command = EXCLUDED.command,
    session_id = EXCLUDED.session_id,
    version = EXCLUDED.version,
    origin = EXCLUDED.origin,
    updated_at = now()
WHERE (x.version, x.origin) < (EXCLUDED.version, EXCLUDED.origin);

-- name: upsert_history
INSERT INTO pane_history AS x (pane_id, chunk_index, content, encoding, raw_size, tab_id, session_id,
                               version, origin)
SELECT s.pane_id, s.chunk_index, s.content, s.encoding, s.raw_size, s.tab_id, s.session_id,
       s.version, s.origin
FROM stage_history s
WHERE NOT EXISTS (
    SELECT 1 FROM tombstones t
    WHERE t.id IN (s.pane_id, s.tab_id, s.session_id) AND (t.version, t.origin) > (s.version, s.origin)
)
ORDER BY s.pane_id, s.chunk_index
ON CONFLICT (pane_id, chunk_index) DO UPDATE SET
    content = EXCLUDED.content,
    encoding = EXCLUDED.encoding,
    raw_size = EXCLUDED.raw_size,
    tab_id = EXCLUDED.tab_id,
    session_id = EXCLUDED.session_id,
    version = EXCLUDED.version,
    origin = EXCLUDED.origin,
    created_at = now()
WHERE (x.version, x.origin) < (EXCLUDED.version, EXCLUDED.origin);

-- name: retain_history
-- Keep the newest %(keep)s bytes of scrollback of each pane this batch appended to: a chunk
-- goes once the chunks newer than it hold that much (so the newest chunk always stays).
DELETE FROM pane_history h
USING (
    SELECT id FROM (
        SELECT id, sum(raw_size) OVER (PARTITION BY pane_id ORDER BY chunk_index DESC) - raw_size AS newer_bytes
        FROM pane_history
        WHERE pane_id IN (SELECT DISTINCT pane_id FROM stage_history)
    ) w
    WHERE w.newer_bytes >= %(keep)s
) old
WHERE h.id = old.id;

-- name: upsert_template_tombstones
INSERT INTO template_tombstones AS t (name, version, origin)
SELECT DISTINCT ON (name) name, version, origin
FROM stage_template_deletes
ORDER BY name, version DESC, origin DESC
ON CONFLICT (name) DO UPDATE
SET version = EXCLUDED.version, origin = EXCLUDED.origin, deleted_at = now()
WHERE (t.version, t.origin) < (EXCLUDED.version, EXCLUDED.origin);

-- name: delete_templates
DELETE FROM templates x USING stage_template_deletes d
WHERE x.name = d.name AND (x.version, x.origin) < (d.version, d.origin);

-- name: upsert_templates
INSERT INTO templates AS x (name, id, definition, version, origin)
SELECT s.name, s.id, s.definition::jsonb, s.version, s.origin
FROM stage_templates s
WHERE NOT EXISTS (
    SELECT 1 FROM template_tombstones t
    WHERE t.name = s.name AND (t.version, t.origin) > (s.version, s.origin)
)
ORDER BY s.name
ON CONFLICT (name) DO UPDATE SET
    id = EXCLUDED.id,
    definition = EXCLUDED.definition,
    version = EXCLUDED.version,
    origin = EXCLUDED.origin,
    updated_at = now()
WHERE (x.version, x.origin) < (EXCLUDED.version, EXCLUDED.origin);
