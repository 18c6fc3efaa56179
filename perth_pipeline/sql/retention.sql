-- The statements of `perth-pipeline cleanup` (perth_pipeline.retention) and of the scheduled
-- cleanup job (workers.maintenance). Loaded by perth_pipeline.queries.
--
-- Rows are removed directly, not through the queue, but each transaction first takes the
-- per-session advisory locks that workers take to apply a batch (workers.applier), so a
-- cleanup never interleaves with a batch of the same session. Every row of a session
-- carries its session_id, so one indexed statement per table removes a session's rows.

-- name: cutoff
-- One clock for the whole run: the database's.
SELECT now() - make_interval(secs => %(seconds)s) AS cutoff;

-- name: expired_session_ids
-- Idle: neither the terminal's last_active nor anything written under the session (the apply's
-- activity_at) since the cutoff (schema.sql's session_activity).
SELECT a.id
FROM session_activity a
WHERE a.active_at < %(cutoff)s AND a.id > %(after)s
ORDER BY a.id
LIMIT %(limit)s;

-- name: lock_sessions
-- The applier's locks, taken in the same (ascending) order, so neither side can deadlock.
SELECT count(pg_advisory_xact_lock(k)) FROM unnest(%(keys)s::bigint[]) WITH ORDINALITY AS u(k, n);

-- name: purge_sessions
-- Under the locks, check again (a batch may have written under a session since it was picked),
-- then leave a tombstone above every write stored for the session, so that a late
-- re-delivery of any of them stays dead, while a new write of a terminal that still holds
-- the session (a higher version) brings it back, as it should.
WITH doomed AS (
    SELECT s.id, s.name, s.last_active, a.active_at
    FROM sessions s JOIN session_activity a ON a.id = s.id
    WHERE s.id = ANY(%(ids)s) AND a.active_at < %(cutoff)s
),
marks AS (
    -- %(floor)s: 0 for the cleanup; for `sessions delete`, the deleting host's clock (a write made
    -- before the delete and still queued stays dead too)
    SELECT d.id, greatest(greatest(
        (SELECT max(version) FROM sessions x WHERE x.id = d.id),
        (SELECT max(version) FROM tabs x WHERE x.session_id = d.id),
        (SELECT max(version) FROM panes x WHERE x.session_id = d.id),
        (SELECT max(version) FROM pane_history x WHERE x.session_id = d.id)
    ) + 1, %(floor)s::bigint) AS version
    FROM doomed d
),
tombs AS (
    INSERT INTO tombstones AS t (id, kind, version, origin, session_id)
    SELECT id, 'session', version, '', id FROM marks ORDER BY id
    ON CONFLICT (id) DO UPDATE
    SET kind = EXCLUDED.kind, version = EXCLUDED.version, origin = EXCLUDED.origin, deleted_at = now(),
        session_id = EXCLUDED.session_id
    WHERE (t.version, t.origin) < (EXCLUDED.version, EXCLUDED.origin)
    RETURNING 1
),
h AS (DELETE FROM pane_history x USING doomed d WHERE x.session_id = d.id RETURNING x.raw_size),
p AS (DELETE FROM panes x USING doomed d WHERE x.session_id = d.id RETURNING 1),
t AS (DELETE FROM tabs x USING doomed d WHERE x.session_id = d.id RETURNING 1),
s AS (DELETE FROM sessions x USING doomed d WHERE x.id = d.id RETURNING x.id)
SELECT
    coalesce((SELECT json_agg(json_build_object('id', d.id, 'name', d.name, 'last_active', d.last_active,
                                                'active_at', d.active_at)
                              ORDER BY d.active_at, d.id)
              FROM doomed d JOIN s ON s.id = d.id), '[]'::json) AS sessions,
    (SELECT count(*) FROM t) AS tabs,
    (SELECT count(*) FROM p) AS panes,
    (SELECT count(*) FROM h) AS history_chunks,
    (SELECT coalesce(sum(raw_size), 0) FROM h) AS history_bytes,
    (SELECT count(*) FROM tombs) AS tombstones_written;

-- name: plan_sessions
WITH idle AS (
    SELECT s.id, s.name, s.last_active, a.active_at
    FROM sessions s JOIN session_activity a ON a.id = s.id
    WHERE a.active_at < %(cutoff)s
)
SELECT
    coalesce((SELECT json_agg(json_build_object('id', id, 'name', name, 'last_active', last_active,
                                                'active_at', active_at)
                              ORDER BY active_at, id)
              FROM idle), '[]'::json) AS sessions,
    (SELECT count(*) FROM tabs x JOIN idle s ON s.id = x.session_id) AS tabs,
    (SELECT count(*) FROM panes x JOIN idle s ON s.id = x.session_id) AS panes,
    (SELECT count(*) FROM pane_history x JOIN idle s ON s.id = x.session_id) AS history_chunks,
    (SELECT coalesce(sum(x.raw_size), 0) FROM pane_history x JOIN idle s ON s.id = x.session_id)
        AS history_bytes;

-- Orphans: rows whose parent is not stored (a tab without its session, a pane without its tab or
-- session, scrollback without its pane, tab or session). Out-of-order apply makes such rows for a
-- moment (a child applied before its parent), and the parent may take long to arrive while the
-- rest of the family keeps arriving: a session row that a producer will resend, say, while its
-- panes are written all along. So an orphan goes only when its missing ancestor's whole family
-- has been quiet since the cutoff: nothing stored under that session (when the session is the
-- one missing), tab or pane was written since. Only a parent that was lost leaves that.

-- name: orphan_session_ids
-- Sessions with an orphan row written before the cutoff (purge_orphans decides, family by family).
SELECT DISTINCT session_id FROM (
    SELECT x.session_id FROM tabs x
    WHERE x.updated_at < %(cutoff)s
      AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.id = x.session_id)
    UNION ALL
    SELECT x.session_id FROM panes x
    WHERE x.updated_at < %(cutoff)s
      AND (NOT EXISTS (SELECT 1 FROM sessions s WHERE s.id = x.session_id)
           OR NOT EXISTS (SELECT 1 FROM tabs t WHERE t.id = x.tab_id))
    UNION ALL
    SELECT x.session_id FROM pane_history x
    WHERE x.created_at < %(cutoff)s
      AND (NOT EXISTS (SELECT 1 FROM sessions s WHERE s.id = x.session_id)
           OR NOT EXISTS (SELECT 1 FROM tabs t WHERE t.id = x.tab_id)
           OR NOT EXISTS (SELECT 1 FROM panes p WHERE p.id = x.pane_id))
) o
WHERE session_id > %(after)s
ORDER BY session_id
LIMIT %(limit)s;

-- name: lost_families
-- (Not a statement: the common part of purge_orphans and plan_orphans, put in place of {lost}.)
-- The families, among the sessions %(ids)s, whose missing ancestor is lost: a session, tab or pane
-- that is not stored and under which nothing was written since the cutoff. A row is judged by
-- its topmost missing ancestor: under a missing session, only the session's whole family
-- counts (its tab may arrive with it); a missing tab or pane is judged only where the session
-- (and, for a pane, the tab) is stored.
lost_sessions AS (
    SELECT i.id FROM unnest(%(ids)s::uuid[]) AS i(id)
    WHERE NOT EXISTS (SELECT 1 FROM sessions s WHERE s.id = i.id)
      AND NOT EXISTS (SELECT 1 FROM tabs y WHERE y.session_id = i.id AND y.updated_at >= %(cutoff)s)
      AND NOT EXISTS (SELECT 1 FROM panes y WHERE y.session_id = i.id AND y.updated_at >= %(cutoff)s)
      AND NOT EXISTS (
          SELECT 1 FROM pane_history y WHERE y.session_id = i.id AND y.created_at >= %(cutoff)s
      )
),
lost_tabs AS (
    SELECT o.id FROM (
        SELECT x.tab_id AS id, x.session_id FROM panes x WHERE x.session_id = ANY(%(ids)s)
        UNION
        SELECT x.tab_id, x.session_id FROM pane_history x WHERE x.session_id = ANY(%(ids)s)
    ) o
    WHERE EXISTS (SELECT 1 FROM sessions s WHERE s.id = o.session_id)
      AND NOT EXISTS (SELECT 1 FROM tabs t WHERE t.id = o.id)
      AND NOT EXISTS (SELECT 1 FROM panes y WHERE y.tab_id = o.id AND y.updated_at >= %(cutoff)s)
      AND NOT EXISTS (SELECT 1 FROM pane_history y WHERE y.tab_id = o.id AND y.created_at >= %(cutoff)s)
),
lost_panes AS (
    SELECT o.id FROM (
        SELECT DISTINCT x.pane_id AS id, x.tab_id, x.session_id
        FROM pane_history x WHERE x.session_id = ANY(%(ids)s)
    ) o
    WHERE EXISTS (SELECT 1 FROM sessions s WHERE s.id = o.session_id)
      AND EXISTS (SELECT 1 FROM tabs t WHERE t.id = o.tab_id)
      AND NOT EXISTS (SELECT 1 FROM panes p WHERE p.id = o.id)
      AND NOT EXISTS (SELECT 1 FROM pane_history y WHERE y.pane_id = o.id AND y.created_at >= %(cutoff)s)
),

-- name: purge_orphans
WITH
{lost}
h AS (
    DELETE FROM pane_history x
    WHERE x.session_id = ANY(%(ids)s)
      AND (x.session_id IN (SELECT id FROM lost_sessions) OR x.tab_id IN (SELECT id FROM lost_tabs)
           OR x.pane_id IN (SELECT id FROM lost_panes))
    RETURNING 1
),
p AS (
    DELETE FROM panes x
    WHERE x.session_id = ANY(%(ids)s)
      AND (x.session_id IN (SELECT id FROM lost_sessions) OR x.tab_id IN (SELECT id FROM lost_tabs))
    RETURNING 1
),
t AS (DELETE FROM tabs x WHERE x.session_id IN (SELECT id FROM lost_sessions) RETURNING 1)
SELECT (SELECT count(*) FROM t) AS tabs, (SELECT count(*) FROM p) AS panes,
       (SELECT count(*) FROM h) AS history_chunks;

-- name: plan_orphans
-- As purge_orphans, without the rows of a stored session that is idle: they go with it
-- (purge_sessions runs first).
WITH
{lost}
live AS (SELECT id FROM session_activity WHERE id = ANY(%(ids)s) AND active_at >= %(cutoff)s)
SELECT
    (SELECT count(*) FROM tabs x WHERE x.session_id IN (SELECT id FROM lost_sessions)) AS tabs,
    (SELECT count(*) FROM panes x
     WHERE x.session_id = ANY(%(ids)s)
       AND (x.session_id IN (SELECT id FROM lost_sessions)
            OR (x.tab_id IN (SELECT id FROM lost_tabs) AND x.session_id IN (SELECT id FROM live)))) AS panes,
    (SELECT count(*) FROM pane_history x
     WHERE x.session_id = ANY(%(ids)s)
       AND (x.session_id IN (SELECT id FROM lost_sessions)
            OR ((x.tab_id IN (SELECT id FROM lost_tabs) OR x.pane_id IN (SELECT id FROM lost_panes))
                AND x.session_id IN (SELECT id FROM live)))) AS history_chunks;

-- name: purge_tombstones
-- Past this age a tombstone no longer guards against anything still in flight (keep the
-- retention above the failed-job TTL: a requeued batch older than its tombstone would come back).
WITH t AS (DELETE FROM tombstones WHERE deleted_at < %(cutoff)s RETURNING 1),
     tt AS (DELETE FROM template_tombstones WHERE deleted_at < %(cutoff)s RETURNING 1)
SELECT (SELECT count(*) FROM t) AS tombstones, (SELECT count(*) FROM tt) AS template_tombstones;

-- name: plan_tombstones
SELECT (SELECT count(*) FROM tombstones WHERE deleted_at < %(cutoff)s) AS tombstones,
       (SELECT count(*) FROM template_tombstones WHERE deleted_at < %(cutoff)s) AS template_tombstones;
