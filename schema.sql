-- perth-pipeline: the one source of the database schema.
--
-- Applied by `perth-pipeline init-db` (idempotent: every statement may run again).
-- Later changes arrive as numbered migrations recorded in schema_migrations.
--
-- Compatibility: upstream (Rust) Perth reads these tables with plain queries such as
--   SELECT id, session_id, position, name, layout_blob, created_at, updated_at
--   FROM tabs WHERE session_id = $1 ORDER BY position
-- so the main tables hold exactly the live rows: deleted rows leave them, and the
-- tombstones that keep a late, older write from bringing a row back live in tables
-- of their own.
--
-- Out-of-order apply. Workers scale horizontally, so a tab may be applied before its
-- session and a pane before its tab. Such a child is real state of the terminal, and it
-- is stored when it arrives: it is reachable only through its parent, so neither our
-- reads nor upstream's top-down queries see it until the parent is there. A foreign key
-- could not be satisfied at that moment, so the entity tables have none; deletes cascade
-- in the apply instead, by version (a delete at version v removes the descendants written
-- below v), under a per-session advisory lock. Each row also records its session (and
-- scrollback its tab) so that those cascades are one indexed statement. Upstream's
-- UNIQUE(session_id, position) and UNIQUE(tab_id, pane_id) are left out for the same
-- reason (two tabs swapping positions in batches applied by different workers would
-- violate them in between); restores order by (position, id) and (pane_id, id).
--
-- Versions: `version` is the hybrid-logical-clock value of the write that made the row,
-- `origin` the id of the producer that made it (it breaks ties). A row changes only
-- when (version, origin) of the incoming write is higher.

CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    description text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS sessions (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name          text NOT NULL,
    template_name text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_active   timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    version       bigint NOT NULL DEFAULT 0,
    origin        text NOT NULL DEFAULT '',
    activity_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS sessions_last_active_idx ON sessions (last_active DESC, id);

CREATE TABLE IF NOT EXISTS tabs (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    session_id  uuid NOT NULL,
    position    integer NOT NULL CHECK (position >= 0),
    name        text NOT NULL,
    layout_blob jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    version     bigint NOT NULL DEFAULT 0,
    origin      text NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS tabs_session_idx ON tabs (session_id, position, id);

CREATE TABLE IF NOT EXISTS panes (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tab_id          uuid NOT NULL,
    pane_id         text NOT NULL,
    pane_type       text NOT NULL,
    component_state jsonb NOT NULL DEFAULT '{}'::jsonb,
    title           text NOT NULL DEFAULT '',
    cwd             text,
    command         text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    session_id      uuid NOT NULL,
    version         bigint NOT NULL DEFAULT 0,
    origin          text NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS panes_tab_idx ON panes (tab_id, pane_id, id);
CREATE INDEX IF NOT EXISTS panes_session_idx ON panes (session_id);

CREATE TABLE IF NOT EXISTS pane_history (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    pane_id     uuid NOT NULL,
    chunk_index integer NOT NULL CHECK (chunk_index >= 0),
    content     bytea NOT NULL,
    -- 'identity' or 'zstd': content is stored as the producer compressed it.
    encoding    text NOT NULL DEFAULT 'identity' CHECK (encoding IN ('identity', 'zstd')),
    raw_size    integer NOT NULL DEFAULT 0 CHECK (raw_size >= 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    tab_id      uuid NOT NULL,
    session_id  uuid NOT NULL,
    version     bigint NOT NULL DEFAULT 0,
    origin      text NOT NULL DEFAULT '',
    UNIQUE (pane_id, chunk_index)
);
CREATE INDEX IF NOT EXISTS pane_history_tab_idx ON pane_history (tab_id);
CREATE INDEX IF NOT EXISTS pane_history_session_idx ON pane_history (session_id);

-- Templates are keyed by name everywhere (saving an existing name replaces it).
CREATE TABLE IF NOT EXISTS templates (
    name        text PRIMARY KEY,
    id          uuid NOT NULL DEFAULT gen_random_uuid(),
    definition  jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    version     bigint NOT NULL DEFAULT 0,
    origin      text NOT NULL DEFAULT ''
);

-- A delete at (version, origin) of a session, tab or pane. Ids are UUIDs chosen by the
-- terminal, unique across kinds. A write below its own tombstone or any ancestor's is dead.
CREATE TABLE IF NOT EXISTS tombstones (
    id         uuid PRIMARY KEY,
    kind       text NOT NULL CHECK (kind IN ('session', 'tab', 'pane')),
    version    bigint NOT NULL,
    origin     text NOT NULL,
    deleted_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS tombstones_deleted_at_idx ON tombstones (deleted_at);

CREATE TABLE IF NOT EXISTS template_tombstones (
    name       text PRIMARY KEY,
    version    bigint NOT NULL,
    origin     text NOT NULL,
    deleted_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS template_tombstones_deleted_at_idx ON template_tombstones (deleted_at);

-- Migration 2: a tombstone remembers the deleted entity's ancestors (a tab's session, a pane's tab
-- and session; a session's own id), so that a producer that never held a deleted tab or pane
-- learns from the database where its writes belong. Tombstones written before keep NULLs.
-- (Checked in the catalog first, as activity_at below: a migrated database is not locked.)
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_attribute
        WHERE attrelid = 'tombstones'::regclass AND attname = 'tab_id' AND NOT attisdropped
    ) THEN
        ALTER TABLE tombstones ADD COLUMN IF NOT EXISTS session_id uuid,
                               ADD COLUMN IF NOT EXISTS tab_id uuid;
    END IF;
END
$$;

-- Migration 2 (also): sessions.activity_at, when the apply last wrote anything under the session
-- (the session itself, a touch, its tabs, panes, scrollback, a delete among them), to the minute:
-- the apply raises it for every session a batch touches (apply.sql, raise_activity).
-- last_active stays the terminal's own value. The cleanup reads both: a terminal that writes
-- panes for a month without calling touch_session is active. No index on activity_at: an
-- indexed column would make every raise a non-HOT update (new index entries in every index).
-- A database of the first schema gets the column filled once from what its rows say.
-- (Checked in the catalog first: once migrated, init-db takes no lock on sessions, which a live
-- system's batches and reads would queue behind: ALTER TABLE takes its lock before it looks.)
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_attribute
        WHERE attrelid = 'sessions'::regclass AND attname = 'activity_at' AND NOT attisdropped
    ) THEN
        ALTER TABLE sessions ADD COLUMN IF NOT EXISTS activity_at timestamptz;
        UPDATE sessions s SET activity_at = greatest(
            s.updated_at,
            (SELECT max(x.updated_at) FROM tabs x WHERE x.session_id = s.id),
            (SELECT max(x.updated_at) FROM panes x WHERE x.session_id = s.id),
            (SELECT max(x.created_at) FROM pane_history x WHERE x.session_id = s.id)
        );
        ALTER TABLE sessions ALTER COLUMN activity_at SET DEFAULT now(),
                             ALTER COLUMN activity_at SET NOT NULL;
    END IF;
END
$$;

-- When a session was last active, as the cleanup judges it (idle: before its cutoff): the later
-- of what the terminal said (last_active) and what was last written under it (activity_at).
CREATE OR REPLACE VIEW session_activity AS
SELECT s.id, greatest(s.last_active, s.activity_at) AS active_at
FROM sessions s;

-- JSONB compresses better with lz4 where the server has it (PostgreSQL 14+ built
-- --with-lz4); elsewhere this changes nothing.
DO $$
BEGIN
    IF current_setting('server_version_num')::int >= 140000 THEN
        BEGIN
            ALTER TABLE tabs ALTER COLUMN layout_blob SET COMPRESSION lz4;
            ALTER TABLE panes ALTER COLUMN component_state SET COMPRESSION lz4;
            ALTER TABLE templates ALTER COLUMN definition SET COMPRESSION lz4;
        EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
            NULL;
        END;
    END IF;
END
$$;

INSERT INTO schema_migrations (version, description)
VALUES (1, 'initial schema'), (2, 'tombstones keep their ancestors; sessions.activity_at')
ON CONFLICT (version) DO NOTHING;
