-- Shared by every writing operation. As a library of Redis functions (Redis 7 and later) it is
-- loaded once, and each function starts with `init(KEYS, ARGV)`; as scripts (EVALSHA, for a
-- server without functions) it is prepended to each body, followed by that call. Its locals
-- are the running operation's state: Redis runs one at a time, and `init` sets them all.
--
-- KEYS[1] is the namespace's prefix, "{koubou:<namespace>}:", and every key is built from it:
-- one hash tag, one cluster slot. ARGV[1] is the calling queue's origin id, ARGV[2] and
-- ARGV[3] how many finished tasks to keep and for how many milliseconds, ARGV[4] about how many
-- entries the event stream keeps; each operation's own arguments start at ARGV[5].
local P, ORIGIN, KEEP, KEEP_MS, KEEP_EVENTS
local PENDING, DELAYED, LEASES, FINISHED, IDEM
-- The claimable tasks no confirmed delivery of an outside dispatcher covers (RabbitMQ), in
-- claim order; see outbox.lua.
local OUTBOX
-- Redis's clock, never the client's: every node of a distributed queue agrees on it (`NOW_S`
-- printed: a number given to redis.call is printed with %.17g, which costs more than the
-- command itself; hence strings as arguments throughout).
local NOW, NOW_S
-- What this operation did, for the reply and the namespace's stream: events (`notes`), claims
-- whose holders must stop (`stops`, as {id, attempt}), tasks made claimable (`wake`), and
-- whether what waits changed (`touched`: only then does the message count it).
local notes, stops, wake, touched
-- Housekeeping's gate as this operation read or set it (nil: not read yet).
local due_v
-- In a batch (`batch`), the stream messages of its operations, appended together at its end.
local batched, outgoing
-- The fields a task is returned by, in this order (`record::TASK_FIELDS`): `read` gets their
-- values (false where absent) and any extra fields after them, `patch` writes into what was
-- read what a script then set, and `record` is the part returned. A script that returns a task
-- thus reads it once, and returns values without their names: each string a script reads or
-- returns costs about as much as a small command.
local TASK_FIELDS = { 'spec', 'status', 'attempts', 'max', 'created', 'available', 'started', 'finished', 'lease',
  'worker', 'result', 'error', 'partial', 'backend', 'model', 'usage', 'warnings', 'remote', 'cost' }
local EXTRA = #TASK_FIELDS + 1
-- Each field's place in TASK_FIELDS, made by the first `init` (a library cannot call ipairs
-- while it loads).
local FIELD_AT

-- Integers are doubles in Lua: printed with %d they stay exact (everything here is < 2^53).
local function int(x)
  return string.format('%d', x)
end

local function init(keys, argv)
  P = keys[1]
  ORIGIN, KEEP, KEEP_MS, KEEP_EVENTS = argv[1], tonumber(argv[2]), tonumber(argv[3]), argv[4]
  PENDING, DELAYED, LEASES = P .. 'pending', P .. 'delayed', P .. 'leases'
  FINISHED, IDEM, OUTBOX = P .. 'finished', P .. 'idem', P .. 'outbox'
  local time = redis.call('TIME')
  NOW = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  NOW_S = int(NOW)
  notes, stops, wake, touched, due_v = {}, {}, 0, false, nil
  batched = false
  if not FIELD_AT then
    FIELD_AT = {}
    for i, f in ipairs(TASK_FIELDS) do
      FIELD_AT[f] = i
    end
  end
end

local function task_key(id)
  return P .. 'task:' .. id
end


local function read(key, ...)
  local args = { 'HMGET', key, unpack(TASK_FIELDS) }
  for _, f in ipairs({ ... }) do
    args[#args + 1] = f
  end
  return redis.call(unpack(args))
end

local function patch(t, set, unset)
  for i = 1, #set, 2 do
    local at = FIELD_AT[set[i]]
    if at then
      t[at] = set[i + 1]
    end
  end
  for _, f in ipairs(unset or {}) do
    local at = FIELD_AT[f]
    if at then
      t[at] = false
    end
  end
end

local function record(t)
  return { unpack(t, 1, #TASK_FIELDS) }
end

-- An optional argument: '' is none, '=' .. value is the value.
local function opt(s)
  if s == '' then
    return nil
  end
  return string.sub(s, 2)
end

local function note(...)
  notes[#notes + 1] = { ... }
end
local function stop(id, attempt)
  stops[#stops + 1] = { id, attempt }
end

-- The task's tags as a JSON array (the field submit writes, or, for a task stored before it
-- did, its spec's).
local function tags_json(key)
  local tags = redis.call('HGET', key, 'tags')
  if tags then
    return tags
  end
  local spec = redis.call('HGET', key, 'spec')
  local list = spec and cjson.decode(spec).tags
  if type(list) ~= 'table' or #list == 0 then
    return '[]'
  end
  return cjson.encode(list)
end

-- The per-status sets (by submission order) follow every change of status; the caller writes
-- the `status` field itself, with its other fields (one HSET). `seq` is the task's, if known.
local function move(id, key, from, to, seq)
  redis.call('ZREM', P .. 's:' .. from, id)
  redis.call('ZADD', P .. 's:' .. to, seq or redis.call('HGET', key, 'seq'), id)
end

local function set_status(id, key, from, to)
  move(id, key, from, to)
  redis.call('HSET', key, 'status', to)
end

-- Into the claim order, at the task's own score: priority, then submission order. A task
-- that comes back (released, requeued, retried) keeps its place. `score` and `kind` are the
-- task's, if known.
local function enqueue(id, key, score, kind)
  if not score then
    local h = redis.call('HMGET', key, 'score', 'kind')
    score, kind = h[1], h[2]
  end
  redis.call('ZADD', PENDING, score, id)
  redis.call('ZADD', P .. 'pending:' .. kind, score, id)
  redis.call('ZADD', OUTBOX, score, id)
  wake = wake + 1
  touched = true
end

local function dequeue(id, key, kind)
  redis.call('ZREM', PENDING, id)
  redis.call('ZREM', P .. 'pending:' .. (kind or redis.call('HGET', key, 'kind')), id)
  redis.call('ZREM', OUTBOX, id)
  touched = true
end

-- Housekeeping's gate (see `housekeeping`): lowered to `at` (a string) if it is later.
local function lower_due(at)
  if not due_v then
    due_v = tonumber(redis.call('GET', P .. 'due') or '0')
  end
  if tonumber(at) < due_v then
    due_v = tonumber(at)
    redis.call('SET', P .. 'due', at)
  end
end

-- Into (or out of) the retries waiting for their backoff.
local function delay(id, at)
  redis.call('ZADD', DELAYED, at, id)
  lower_due(at)
  touched = true
end

local function undelay(id)
  redis.call('ZREM', DELAYED, id)
  touched = true
end

local function queued()
  return redis.call('ZCARD', PENDING) + redis.call('ZCARD', DELAYED)
end

-- The lease check every worker write starts with, on a task's status, holder and attempts:
-- 'held', 'notfound', or 'lost'; then the status.
local function check(status, holder, attempts, worker, attempt)
  if not status then
    return 'notfound', nil
  end
  if status == 'running' and holder == worker and attempts == attempt then
    return 'held', status
  end
  return 'lost', status
end

local function fence(key, worker, attempt)
  local h = redis.call('HMGET', key, 'status', 'worker', 'attempts')
  return check(h[1], h[2], h[3], worker, attempt)
end

-- The same check on a task `read`.
local function fence_read(t, worker, attempt)
  return check(t[FIELD_AT.status], t[FIELD_AT.worker], t[FIELD_AT.attempts], worker, attempt)
end

-- Ends a task: `fields` (a list of field, value…) are written with its new status and end time.
local function finish(id, key, from, to, seq, fields)
  local set = fields or {}
  set[#set + 1], set[#set + 2], set[#set + 3], set[#set + 4] = 'status', to, 'finished', NOW_S
  redis.call('HSET', key, unpack(set))
  move(id, key, from, to, seq)
  redis.call('ZADD', FINISHED, NOW_S, id)
end

-- A running task whose worker is gone: back to the queue, or failed if its attempts are used up.
local function requeue_lost(id, reason)
  local key = task_key(id)
  local h = redis.call('HMGET', key, 'attempts', 'max')
  redis.call('ZREM', LEASES, id)
  stop(id, h[1])
  if tonumber(h[1]) >= tonumber(h[2]) then
    local err = reason .. '; gave up after ' .. h[1] .. ' attempts'
    redis.call('HDEL', key, 'lease')
    finish(id, key, 'running', 'failed', nil, { 'error', err })
    note('failed', id, err, '', 'failed')
  else
    redis.call('HSET', key, 'available', NOW_S, 'status', 'pending')
    redis.call('HDEL', key, 'worker', 'lease')
    move(id, key, 'running', 'pending')
    enqueue(id, key)
    note('requeued', id, reason)
  end
end

-- Forgets a finished task: its record, its indexes and its idempotency key.
local function forget(id)
  local key = task_key(id)
  local h = redis.call('HMGET', key, 'status', 'idem')
  if h[1] then
    redis.call('ZREM', P .. 's:' .. h[1], id)
  end
  if h[2] and redis.call('HGET', IDEM, h[2]) == id then
    redis.call('HDEL', IDEM, h[2])
  end
  redis.call('DEL', key)
  redis.call('ZREM', OUTBOX, id)
  redis.call('ZREM', FINISHED, id)
end

-- Keeps the newest KEEP finished tasks, none older than KEEP_MS; at most 100 forgotten per
-- script, so no script runs long (the next ones go on). The count is checked only by scripts
-- that finish a task (`by_count`): nothing else adds to it.
local function trim(by_count)
  local old = redis.call('ZRANGEBYSCORE', FINISHED, '-inf', '(' .. int(NOW - KEEP_MS), 'LIMIT', '0', '100')
  for _, id in ipairs(old) do
    forget(id)
  end
  if not by_count then
    return
  end
  local excess = math.min(redis.call('ZCARD', FINISHED) - KEEP, 100 - #old)
  if excess > 0 then
    for _, id in ipairs(redis.call('ZRANGE', FINISHED, '0', int(excess - 1))) do
      forget(id)
    end
  end
end

-- Promotes retries whose backoff is over and requeues (or fails) tasks whose lease ran out.
--
-- Gated by `due`: a moment before which it has nothing to do (at most a second ahead, so that
-- a writer that did not keep it, an older version, delays nothing for longer). It is set after
-- each run from the heads of the retries, the leases and the finished tasks, and lowered by
-- any script that adds an earlier retry or lease (`lower_due`); so a claim with nothing due
-- reads one key instead of running three range queries. `always` skips the gate.
local function housekeeping(always)
  local due = redis.call('GET', P .. 'due')
  due_v = tonumber(due or '0')
  if due_v > NOW and not always then
    return
  end
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', DELAYED, '-inf', NOW_S, 'LIMIT', '0', '100')) do
    local key = task_key(id)
    undelay(id)
    local h = redis.call('HMGET', key, 'seq', 'score', 'kind')
    if h[1] then
      redis.call('HSET', key, 'status', 'pending')
      move(id, key, 'retrying', 'pending', h[1])
      enqueue(id, key, h[2], h[3])
    end
  end
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', LEASES, '-inf', NOW_S, 'LIMIT', '0', '100')) do
    local worker = redis.call('HGET', task_key(id), 'worker')
    if worker then
      requeue_lost(id, 'lease expired (worker ' .. worker .. ' stopped answering)')
    else
      redis.call('ZREM', LEASES, id)
    end
  end
  trim(false)
  local next = NOW + 1000
  for _, head in ipairs({ { DELAYED, 0 }, { LEASES, 0 }, { FINISHED, KEEP_MS } }) do
    local first = redis.call('ZRANGE', head[1], '0', '0', 'WITHSCORES')[2]
    if first then
      next = math.min(next, tonumber(first) + head[2])
    end
  end
  due_v = next
  redis.call('SET', P .. 'due', int(next))
end

-- Claims a pending task for `worker` until NOW + `lease` ms; `claims` counts every claim, for
-- the outbox. Returns the task's `record`, or nil if it is gone (deleted behind the queue's
-- back: its entries are dropped on the way).
local function take(id, key, worker, lease)
  local t = read(key, 'kind', 'seq', 'claims')
  local kind, seq, claims = t[EXTRA], t[EXTRA + 1], t[EXTRA + 2]
  if not kind then
    redis.call('ZREM', PENDING, id)
    redis.call('ZREM', OUTBOX, id)
    return nil
  end
  dequeue(id, key, kind)
  local attempt = int(tonumber(t[FIELD_AT.attempts]) + 1)
  local lease_until = int(NOW + lease)
  local set = { 'status', 'running', 'attempts', attempt, 'worker', worker, 'started', NOW_S, 'lease', lease_until }
  redis.call('HSET', key, 'claims', int(tonumber(claims or '0') + 1), unpack(set))
  move(id, key, 'pending', 'running', seq)
  redis.call('ZADD', LEASES, lease_until, id)
  lower_due(lease_until)
  note('claimed', id, worker, attempt)
  patch(t, set)
  return record(t)
end

-- Every script ends here: {code, message, extra...}. The message (JSON) carries the events,
-- stops and wake-ups and, when the script changed what waits, how many tasks wait under the
-- namespace's new write version; when there is news it is appended (field `m`) to the
-- namespace's event stream, capped at about KEEP_EVENTS entries, which the other queues sharing
-- the namespace read from the last entry they saw. Built by hand: cjson prints numbers slowly,
-- and every script sends one.
local function reply(code, extra)
  local m = '{"o":' .. cjson.encode(ORIGIN)
  if touched then
    m = m .. ',"v":' .. int(redis.call('INCR', P .. 'version')) .. ',"q":' .. int(queued())
  end
  if wake > 0 then
    m = m .. ',"w":' .. int(wake)
  end
  if #notes > 0 then
    m = m .. ',"n":' .. cjson.encode(notes)
  end
  if #stops > 0 then
    m = m .. ',"s":' .. cjson.encode(stops)
  end
  m = m .. '}'
  if #notes > 0 or #stops > 0 or wake > 0 then
    if batched then
      outgoing[#outgoing + 1], outgoing[#outgoing + 2] = 'm', m
    else
      redis.call('XADD', P .. 'events', 'MAXLEN', '~', KEEP_EVENTS, '*', 'm', m)
    end
  end
  local out = { code, m }
  for _, x in ipairs(extra or {}) do
    out[#out + 1] = x
  end
  return out
end

-- Runs a batch of operations (functions only): the writer sends the operations it has waiting
-- in one call, which saves each the call's own cost (a third of a small operation's). ARGV
-- after the four shared arguments: for each operation its name in `ops`, its number in the
-- calling instance (its messages' origin is then `<origin>#<number>`, as a script's ARGV[1]
-- is), how many arguments it has, and those. Each runs as it would alone, in order, and has its own answer; an
-- operation that raises an error answers {'!', the error} and the next ones still run. Their
-- stream messages are appended as one entry, in order.
local function batch(keys, argv, ops)
  init(keys, argv)
  batched, outgoing = true, {}
  local answers, i = {}, 5
  while i <= #argv do
    local name, n = argv[i], tonumber(argv[i + 2])
    ORIGIN = argv[1] .. '#' .. argv[i + 1]
    local args = { ORIGIN, argv[2], argv[3], argv[4] }
    for j = 1, n do
      args[4 + j] = argv[i + 2 + j]
    end
    notes, stops, wake, touched = {}, {}, 0, false
    local ok, answer = pcall(ops[name], args)
    if not ok then
      answer = { '!', type(answer) == 'table' and answer.err or tostring(answer) }
    end
    answers[#answers + 1] = answer
    i = i + 3 + n
  end
  batched = false
  if #outgoing > 0 then
    redis.call('XADD', P .. 'events', 'MAXLEN', '~', KEEP_EVENTS, '*', unpack(outgoing))
  end
  return answers
end
