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
-- Idle: nothing written under the session since the cutoff (schema.sql's session_activity),
-- not only its last_active (pane and scrollback writes do not raise that).
SELECT s.id
FROM sessions s JOIN session_activity a ON a.id = s.id
WHERE s.last_active < %(cutoff)s AND s.updated_at < %(cutoff)s AND a.active_at < %(cutoff)s
  AND s.id > %(after)s
ORDER BY s.id
LIMIT %(limit)s;

-- name: lock_sessions
-- The applier's locks, taken in the same (ascending) order, so neither side can deadlock.
SELECT count(pg_advisory_xact_lock(k)) FROM unnest(%(keys)s::bigint[]) WITH ORDINALITY AS u(k, n);

-- name: purge_sessions
-- Under the locks, check again (a batch may have touched a session since it was picked),
-- then leave a tombstone above every write stored for the session, so that a late
-- re-delivery of any of them stays dead, while a new write of a terminal that still holds
-- the session (a higher version) brings it back, as it should.
WITH doomed AS (
    SELECT s.id, s.name, s.last_active
    FROM sessions s JOIN session_activity a ON a.id = s.id
    WHERE s.id = ANY(%(ids)s) AND s.last_active < %(cutoff)s AND a.active_at < %(cutoff)s
),
marks AS (
    SELECT d.id, greatest(
        (SELECT max(version) FROM sessions x WHERE x.id = d.id),
        (SELECT max(version) FROM tabs x WHERE x.session_id = d.id),
        (SELECT max(version) FROM panes x WHERE x.session_id = d.id),
        (SELECT max(version) FROM pane_history x WHERE x.session_id = d.id)
    ) + 1 AS version
    FROM doomed d
),
tombs AS (
    INSERT INTO tombstones AS t (id, kind, version, origin)
    SELECT id, 'session', version, '' FROM marks ORDER BY id
    ON CONFLICT (id) DO UPDATE
    SET kind = EXCLUDED.kind, version = EXCLUDED.version, origin = EXCLUDED.origin, deleted_at = now()
    WHERE (t.version, t.origin) < (EXCLUDED.version, EXCLUDED.origin)
    RETURNING 1
),
h AS (DELETE FROM pane_history x USING doomed d WHERE x.session_id = d.id RETURNING x.raw_size),
p AS (DELETE FROM panes x USING doomed d WHERE x.session_id = d.id RETURNING 1),
t AS (DELETE FROM tabs x USING doomed d WHERE x.session_id = d.id RETURNING 1),
s AS (DELETE FROM sessions x USING doomed d WHERE x.id = d.id RETURNING x.id, x.name, x.last_active)
SELECT
    coalesce((SELECT json_agg(json_build_object('id', id, 'name', name, 'last_active', last_active)
                              ORDER BY last_active, id) FROM s), '[]'::json) AS sessions,
    (SELECT count(*) FROM t) AS tabs,
    (SELECT count(*) FROM p) AS panes,
    (SELECT count(*) FROM h) AS history_chunks,
    (SELECT coalesce(sum(raw_size), 0) FROM h) AS history_bytes,
    (SELECT count(*) FROM tombs) AS tombstones_written;

-- name: plan_sessions
WITH idle AS (
    SELECT s.id, s.name, s.last_active
    FROM sessions s JOIN session_activity a ON a.id = s.id
    WHERE s.last_active < %(cutoff)s AND s.updated_at < %(cutoff)s AND a.active_at < %(cutoff)s
)
SELECT
    coalesce((SELECT json_agg(json_build_object('id', id, 'name', name, 'last_active', last_active)
                              ORDER BY last_active, id)
              FROM idle), '[]'::json) AS sessions,
    (SELECT count(*) FROM tabs x JOIN idle s ON s.id = x.session_id) AS tabs,
    (SELECT count(*) FROM panes x JOIN idle s ON s.id = x.session_id) AS panes,
    (SELECT count(*) FROM pane_history x JOIN idle s ON s.id = x.session_id) AS history_chunks,
    (SELECT coalesce(sum(x.raw_size), 0) FROM pane_history x JOIN idle s ON s.id = x.session_id)
        AS history_bytes;

-- name: orphan_session_ids
-- Rows whose parent never arrived (a tab without its session, a pane without its tab or
-- session, scrollback without its pane or session), last written before the cutoff: out-of-order
-- apply makes such rows for a moment, and only a parent that was lost leaves them for long.
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
           OR NOT EXISTS (SELECT 1 FROM panes p WHERE p.id = x.pane_id))
) o
WHERE session_id > %(after)s
ORDER BY session_id
LIMIT %(limit)s;

-- name: purge_orphans
WITH h AS (
    DELETE FROM pane_history x
    WHERE x.session_id = ANY(%(ids)s) AND x.created_at < %(cutoff)s
      AND (NOT EXISTS (SELECT 1 FROM sessions s WHERE s.id = x.session_id)
           OR NOT EXISTS (SELECT 1 FROM panes p WHERE p.id = x.pane_id))
    RETURNING 1
),
p AS (
    DELETE FROM panes x
    WHERE x.session_id = ANY(%(ids)s) AND x.updated_at < %(cutoff)s
      AND (NOT EXISTS (SELECT 1 FROM sessions s WHERE s.id = x.session_id)
           OR NOT EXISTS (SELECT 1 FROM tabs t WHERE t.id = x.tab_id))
    RETURNING 1
),
t AS (
    DELETE FROM tabs x
    WHERE x.session_id = ANY(%(ids)s) AND x.updated_at < %(cutoff)s
      AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.id = x.session_id)
    RETURNING 1
)
SELECT (SELECT count(*) FROM t) AS tabs, (SELECT count(*) FROM p) AS panes,
       (SELECT count(*) FROM h) AS history_chunks;

-- name: plan_orphans
-- As purge_orphans, without the rows that the sessions to be removed take with them.
SELECT
    (SELECT count(*) FROM tabs x
     WHERE x.updated_at < %(cutoff)s
       AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.id = x.session_id)) AS tabs,
    (SELECT count(*) FROM panes x
     WHERE x.updated_at < %(cutoff)s
       AND (NOT EXISTS (SELECT 1 FROM sessions s WHERE s.id = x.session_id)
            OR NOT EXISTS (SELECT 1 FROM tabs t WHERE t.id = x.tab_id))
       AND NOT EXISTS (SELECT 1 FROM session_activity s
                       WHERE s.id = x.session_id AND s.active_at < %(cutoff)s)) AS panes,
    (SELECT count(*) FROM pane_history x
     WHERE x.created_at < %(cutoff)s
       AND (NOT EXISTS (SELECT 1 FROM sessions s WHERE s.id = x.session_id)
            OR NOT EXISTS (SELECT 1 FROM panes p WHERE p.id = x.pane_id))
       AND NOT EXISTS (SELECT 1 FROM session_activity s
                       WHERE s.id = x.session_id AND s.active_at < %(cutoff)s)) AS history_chunks;

-- name: purge_tombstones
-- Past this age a tombstone no longer guards against anything still in flight (keep the
-- retention above the failed-job TTL: a requeued batch older than its tombstone would come back).
WITH t AS (DELETE FROM tombstones WHERE deleted_at < %(cutoff)s RETURNING 1),
     tt AS (DELETE FROM template_tombstones WHERE deleted_at < %(cutoff)s RETURNING 1)
SELECT (SELECT count(*) FROM t) AS tombstones, (SELECT count(*) FROM tt) AS template_tombstones;

-- name: plan_tombstones
SELECT (SELECT count(*) FROM tombstones WHERE deleted_at < %(cutoff)s) AS tombstones,
       (SELECT count(*) FROM template_tombstones WHERE deleted_at < %(cutoff)s) AS template_tombstones;
