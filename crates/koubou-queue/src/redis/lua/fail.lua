-- ARGV: id, worker, attempt, error, retryable ('1' or '0'), retry delay in ms, then backend,
-- model, remote, partial (optional).
local id, worker, attempt, err, retryable, delay = ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], tonumber(ARGV[10])
local key = task_key(id)
local held, status = fence(key, worker, attempt)
if held ~= 'held' then
  return reply(held == 'notfound' and 'notfound' or 'conflict', { status })
end
redis.call('HSET', key, 'error', err)
for i, field in ipairs({ 'backend', 'model', 'remote' }) do
  local v = opt(ARGV[10 + i])
  if v then
    redis.call('HSET', key, field, v)
  end
end
local partial = opt(ARGV[14])
if partial then
  redis.call('HSET', key, 'partial', partial)
else
  redis.call('HDEL', key, 'partial')
end
redis.call('ZREM', LEASES, id)
if retryable == '1' and tonumber(attempt) < tonumber(redis.call('HGET', key, 'max')) then
  local at = NOW + delay
  redis.call('HSET', key, 'available', int(at))
  redis.call('HDEL', key, 'lease', 'finished')
  set_status(id, key, 'running', 'retrying')
  redis.call('ZADD', DELAYED, at, id)
  note('failed', id, err, int(at), 'retrying')
  return reply('ok', redis.call('HGETALL', key))
end
finish(id, key, 'running', 'failed')
note('failed', id, err, '', 'failed')
local fields = redis.call('HGETALL', key)
trim()
return reply('ok', fields)
