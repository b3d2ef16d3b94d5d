-- Shared by every writing script (prepended to each). KEYS[1] is the namespace's prefix,
-- "{koubou:<namespace>}:", and every key is built from it: one hash tag, one cluster slot.
-- ARGV[1] is the calling queue's origin id, ARGV[2] and ARGV[3] how many finished tasks to
-- keep and for how many milliseconds, ARGV[4] about how many entries the event stream keeps;
-- each script's own arguments start at ARGV[5].
local P = KEYS[1]
local ORIGIN, KEEP, KEEP_MS, KEEP_EVENTS = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local PENDING, DELAYED, LEASES = P .. 'pending', P .. 'delayed', P .. 'leases'
local FINISHED, ALL, IDEM = P .. 'finished', P .. 'all', P .. 'idem'
-- The claimable tasks no confirmed delivery of an outside dispatcher covers (RabbitMQ), in
-- claim order; see outbox.lua.
local OUTBOX = P .. 'outbox'

-- Redis's clock, never the client's: every node of a distributed queue agrees on it.
local TIME = redis.call('TIME')
local NOW = tonumber(TIME[1]) * 1000 + math.floor(tonumber(TIME[2]) / 1000)

-- Integers are doubles in Lua: printed with %d they stay exact (everything here is < 2^53).
local function int(x)
  return string.format('%d', x)
end

local function task_key(id)
  return P .. 'task:' .. id
end

-- An optional argument: '' is none, '=' .. value is the value.
local function opt(s)
  if s == '' then
    return nil
  end
  return string.sub(s, 2)
end

-- What this script did, for the reply and the namespace's channel: events (`notes`), claims
-- whose holders must stop (`stops`, as {id, attempt}), and tasks made claimable (`wake`).
local notes, stops, wake = {}, {}, 0
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

-- The per-status sets (by submission order) follow every change of status.
local function set_status(id, key, from, to)
  redis.call('ZREM', P .. 's:' .. from, id)
  redis.call('ZADD', P .. 's:' .. to, redis.call('HGET', key, 'seq'), id)
  redis.call('HSET', key, 'status', to)
end

-- Into the claim order, at the task's own score: priority, then submission order. A task
-- that comes back (released, requeued, retried) keeps its place.
local function enqueue(id, key)
  local h = redis.call('HMGET', key, 'score', 'kind')
  redis.call('ZADD', PENDING, h[1], id)
  redis.call('ZADD', P .. 'pending:' .. h[2], h[1], id)
  redis.call('ZADD', OUTBOX, h[1], id)
  wake = wake + 1
end

local function dequeue(id, key)
  redis.call('ZREM', PENDING, id)
  redis.call('ZREM', P .. 'pending:' .. redis.call('HGET', key, 'kind'), id)
  redis.call('ZREM', OUTBOX, id)
end

local function queued()
  return redis.call('ZCARD', PENDING) + redis.call('ZCARD', DELAYED)
end

-- The lease check every worker write starts with: 'held', 'notfound', or 'lost' and the
-- task's status.
local function fence(key, worker, attempt)
  local h = redis.call('HMGET', key, 'status', 'worker', 'attempts')
  if not h[1] then
    return 'notfound'
  end
  if h[1] == 'running' and h[2] == worker and h[3] == attempt then
    return 'held', h[1]
  end
  return 'lost', h[1]
end

local function finish(id, key, from, to)
  redis.call('HSET', key, 'finished', int(NOW))
  redis.call('HDEL', key, 'lease')
  set_status(id, key, from, to)
  redis.call('ZADD', FINISHED, NOW, id)
end

-- A running task whose worker is gone: back to the queue, or failed if its attempts are used up.
local function requeue_lost(id, reason)
  local key = task_key(id)
  local h = redis.call('HMGET', key, 'attempts', 'max')
  redis.call('ZREM', LEASES, id)
  stop(id, h[1])
  if tonumber(h[1]) >= tonumber(h[2]) then
    local err = reason .. '; gave up after ' .. h[1] .. ' attempts'
    redis.call('HSET', key, 'error', err)
    finish(id, key, 'running', 'failed')
    note('failed', id, err, '', 'failed')
  else
    redis.call('HSET', key, 'available', int(NOW))
    redis.call('HDEL', key, 'worker', 'lease')
    set_status(id, key, 'running', 'pending')
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
  redis.call('ZREM', ALL, id)
  redis.call('ZREM', OUTBOX, id)
  redis.call('ZREM', FINISHED, id)
end

-- Keeps the newest KEEP finished tasks, none older than KEEP_MS; at most 100 forgotten per
-- script, so no script runs long (the next ones go on).
local function trim()
  local budget = 100
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', FINISHED, '-inf', '(' .. int(NOW - KEEP_MS), 'LIMIT', 0, budget)) do
    forget(id)
    budget = budget - 1
  end
  local excess = math.min(redis.call('ZCARD', FINISHED) - KEEP, budget)
  if excess > 0 then
    for _, id in ipairs(redis.call('ZRANGE', FINISHED, 0, excess - 1)) do
      forget(id)
    end
  end
end

-- Promotes retries whose backoff is over and requeues (or fails) tasks whose lease ran out.
local function housekeeping()
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', DELAYED, '-inf', NOW, 'LIMIT', 0, 100)) do
    local key = task_key(id)
    redis.call('ZREM', DELAYED, id)
    if redis.call('EXISTS', key) == 1 then
      set_status(id, key, 'retrying', 'pending')
      enqueue(id, key)
    end
  end
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', LEASES, '-inf', NOW, 'LIMIT', 0, 100)) do
    local worker = redis.call('HGET', task_key(id), 'worker')
    if worker then
      requeue_lost(id, 'lease expired (worker ' .. worker .. ' stopped answering)')
    else
      redis.call('ZREM', LEASES, id)
    end
  end
  trim()
end

-- Claims a pending task for `worker` until NOW + `lease` ms; `claims` counts every claim, for
-- the outbox. Returns the task's fields.
local function take(id, key, worker, lease)
  dequeue(id, key)
  local attempt = redis.call('HINCRBY', key, 'attempts', 1)
  redis.call('HINCRBY', key, 'claims', 1)
  local lease_until = NOW + lease
  redis.call('HSET', key, 'worker', worker, 'started', int(NOW), 'lease', int(lease_until))
  redis.call('HDEL', key, 'finished')
  set_status(id, key, 'pending', 'running')
  redis.call('ZADD', LEASES, lease_until, id)
  note('claimed', id, worker, int(attempt))
  return redis.call('HGETALL', key)
end

-- Every script ends here: {code, message, extra...}. The message (JSON) carries the events,
-- stops and wake-ups, the namespace's write version and how many tasks wait; when there is
-- news it is appended (field `m`) to the namespace's event stream, capped at about KEEP_EVENTS
-- entries, which the other queues sharing the namespace read from the last entry they saw.
local function reply(code, extra)
  local m = { o = ORIGIN, v = redis.call('INCR', P .. 'version'), q = queued(), w = wake }
  if #notes > 0 then
    m.n = notes
  end
  if #stops > 0 then
    m.s = stops
  end
  local msg = cjson.encode(m)
  if #notes > 0 or #stops > 0 or wake > 0 then
    redis.call('XADD', P .. 'events', 'MAXLEN', '~', KEEP_EVENTS, '*', 'm', msg)
  end
  local out = { code, msg }
  for _, x in ipairs(extra or {}) do
    out[#out + 1] = x
  end
  return out
end
