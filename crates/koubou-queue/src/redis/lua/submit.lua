-- ARGV: spec (the task as JSON), id, kind, priority, max attempts, idempotency key ('' none),
-- most tasks waiting ('' unbounded), tags (a JSON array, for claims by capabilities).
local spec, id, kind, priority, max, idem, limit = ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11]
local tags = ARGV[12]
if idem ~= '' then
  local existing = redis.call('HGET', IDEM, idem)
  if existing then
    local t = read(task_key(existing))
    if t[FIELD_AT.spec] then
      return reply('exists', record(t))
    end
  end
end
if limit ~= '' then
  local waiting = queued()
  if waiting >= tonumber(limit) then
    return reply('full', { int(waiting) })
  end
end
local seq = redis.call('INCR', P .. 'seq')
-- Lowest first: priority 10 before 1, then submission order (2^43 tasks per priority level,
-- and 10 * 2^43 < 2^53, so every score is an exact double).
local score = (10 - tonumber(priority)) * 2 ^ 43 + seq
local key = task_key(id)
seq, score = int(seq), int(score)
local now = NOW_S
local fields = { 'spec', spec, 'seq', seq, 'score', score, 'kind', kind, 'max', max, 'status', 'pending',
  'attempts', '0', 'created', now, 'available', now, 'tags', tags }
if idem ~= '' then
  fields[#fields + 1], fields[#fields + 2] = 'idem', idem
  redis.call('HSET', IDEM, idem, id)
end
redis.call('HSET', key, unpack(fields))
redis.call('ZADD', P .. 's:pending', seq, id)
enqueue(id, key, score, kind)
note('created', id, kind, priority)
return reply('ok', { now })
