-- perth-pipeline: enqueue one batch as an RQ job, exactly as the Python producer does.
--
-- Run it with EVALSHA (SCRIPT LOAD it once per server; on NOSCRIPT load it again). It does, in one
-- atomic step, what perth_pipeline/flusher.py does in a MULTI/EXEC with RQ 2.12's
-- Queue.enqueue_job: write the job hash, push the job id on the queue, register the queue, and
-- record the batch in the "outstanding" sorted set of every session it touches (restores of a
-- session wait until the workers remove it from there). The job hash has the fields, types and
-- encodings that RQ 2.0 to 2.12 write for such a job (docs/protocol.md, "Enqueueing a batch").
--
-- KEYS[1]     rq:queue:<queue>                          the queue (a list of job ids)
-- KEYS[2]     rq:job:<job id>                           the job hash
-- KEYS[3]     rq:queues                                 the set of queue keys RQ's workers list
-- KEYS[4..n]  perth:<queue>:outstanding:<session id>    one per session the batch touches (none for a
--                                                       batch of templates only)
--
-- ARGV[1]  job id: the batch's "id" (a lowercase UUID, as the batch JSON has it)
-- ARGV[2]  queue name (the job's origin)
-- ARGV[3]  job data: ["workers.jobs.apply_batch",null,[<batch JSON>],{}] in UTF-8, zlib-compressed
--          (RFC 1950, as RQ stores it) or as it is; the workers read both
-- ARGV[4]  description (what the dashboard shows; never the user's data)
-- ARGV[5]  timeout, seconds (PERTH_JOB_TIMEOUT, 120)
-- ARGV[6]  result_ttl, seconds (PERTH_RESULT_TTL, 900)
-- ARGV[7]  failure_ttl, seconds (PERTH_FAILED_TTL, 604800): also the outstanding sets' TTL
-- ARGV[8]  retry intervals, a JSON array of seconds (its length is the number of retries)
--
-- Returns 1 when the job was enqueued, 0 when a job with this id exists already (an EVALSHA
-- sent again after a lost reply: nothing is changed). Arguments that break these rules are an
-- error reply starting "ERR perth enqueue:" and nothing is written.

local function fail(what)
    return redis.error_reply('ERR perth enqueue: ' .. what)
end

local function is_uuid(s)
    return type(s) == 'string' and #s == 36
        and s:match('^%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$') ~= nil
        and s == s:lower()
end

local function whole(s)
    if type(s) == 'string' and not s:match('^%d+$') then
        return nil
    end
    local n = tonumber(s)
    if n == nil or n ~= math.floor(n) or n < 0 or n > 2147483647 then
        return nil
    end
    return n
end

local job_id, queue, data, description = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local timeout, result_ttl, failure_ttl = whole(ARGV[5]), whole(ARGV[6]), whole(ARGV[7])
if #ARGV ~= 8 then return fail('expects 8 arguments, not ' .. #ARGV) end
if not is_uuid(job_id) then return fail('ARGV[1] (job id) must be a lowercase UUID') end
if #queue < 1 or #queue > 64 or queue:find('[^%w_.%-]') then
    return fail('ARGV[2] (queue) must match ^[A-Za-z0-9_.-]{1,64}$ (PERTH_QUEUE)')
end
if data == '' then return fail('ARGV[3] (job data) is empty') end
if timeout == nil or timeout == 0 then return fail('ARGV[5] (timeout) must be a whole number of seconds > 0') end
if result_ttl == nil then return fail('ARGV[6] (result_ttl) must be a whole number of seconds') end
if failure_ttl == nil or failure_ttl == 0 then return fail('ARGV[7] (failure_ttl) must be a whole number of seconds > 0') end
local ok, intervals = pcall(cjson.decode, ARGV[8])
if not ok or type(intervals) ~= 'table' or ARGV[8]:sub(1, 1) ~= '[' then
    return fail('ARGV[8] (retry intervals) must be a JSON array')
end
local interval_text = {}
for i = 1, #intervals do
    local n = whole(intervals[i])
    if n == nil then return fail('ARGV[8] (retry intervals) must hold whole seconds') end
    interval_text[i] = string.format('%d', n)
end
if KEYS[1] ~= 'rq:queue:' .. queue then return fail('KEYS[1] must be rq:queue:<ARGV[2]>') end
if KEYS[2] ~= 'rq:job:' .. job_id then return fail('KEYS[2] must be rq:job:<ARGV[1]>') end
if KEYS[3] ~= 'rq:queues' then return fail('KEYS[3] must be rq:queues') end
local prefix = 'perth:' .. queue .. ':outstanding:'
for i = 4, #KEYS do
    local key = KEYS[i]
    if key:sub(1, #prefix) ~= prefix or not is_uuid(key:sub(#prefix + 1)) then
        return fail('KEYS[' .. i .. '] must be ' .. prefix .. '<session id>')
    end
end

if redis.call('EXISTS', KEYS[2]) == 1 then
    return 0
end

-- RQ's timestamps: UTC, '%Y-%m-%dT%H:%M:%S.%fZ' (rq.utils.utcformat), from the server's clock
local now = redis.call('TIME')
local seconds, micros = tonumber(now[1]), tonumber(now[2])
local function utcformat(s, us)
    local days = math.floor(s / 86400)
    local rest = s - days * 86400
    -- days since 1970-01-01 to a civil date (H. Hinnant's algorithm)
    local z = days + 719468
    local era = math.floor(z / 146097)
    local doe = z - era * 146097
    local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
    local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
    local mp = math.floor((5 * doy + 2) / 153)
    local day = doy - math.floor((153 * mp + 2) / 5) + 1
    local month = mp < 10 and mp + 3 or mp - 9
    local year = yoe + era * 400 + (month <= 2 and 1 or 0)
    return string.format('%04d-%02d-%02dT%02d:%02d:%02d.%06dZ', year, month, day,
        math.floor(rest / 3600), math.floor(rest % 3600 / 60), rest % 60, us)
end
local stamp = utcformat(seconds, micros)

-- The job hash: the fields RQ's Job.to_dict writes for a job with retries and no callbacks,
-- dependencies, meta, result or TTL of its own. Numbers as decimal text, as redis-py sends them.
redis.call('HSET', KEYS[2],
    'created_at', stamp,
    'data', data,
    'success_callback_name', '',
    'failure_callback_name', '',
    'stopped_callback_name', '',
    'started_at', '',
    'ended_at', '',
    'last_heartbeat', '',
    'worker_name', '',
    'group_id', '',
    'retries_left', tostring(#intervals),
    'retry_intervals', '[' .. table.concat(interval_text, ', ') .. ']',  -- as Python's json.dumps
    'origin', queue,
    'description', description,
    'enqueued_at', stamp,
    'timeout', tostring(timeout),
    'result_ttl', tostring(result_ttl),
    'failure_ttl', tostring(failure_ttl),
    'status', 'queued')
redis.call('SADD', KEYS[3], KEYS[1])
redis.call('RPUSH', KEYS[1], job_id)

-- what restores of each session wait for; the workers remove the id once the batch is committed
local score = string.format('%d.%06d', seconds, micros)
for i = 4, #KEYS do
    redis.call('ZADD', KEYS[i], score, job_id)
    redis.call('EXPIRE', KEYS[i], failure_ttl)
end
return 1
