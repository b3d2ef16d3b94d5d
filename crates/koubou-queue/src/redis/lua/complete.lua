-- ARGV: id, worker, attempt, result, backend, model, usage (JSON), warnings (JSON, '' none),
-- remote ('1' or '0'), cost (optional).
local id, worker, attempt = ARGV[5], ARGV[6], ARGV[7]
local result, backend, model, usage, warnings, remote, cost = ARGV[8], ARGV[9], ARGV[10], ARGV[11], ARGV[12],
  ARGV[13], opt(ARGV[14])
local key = task_key(id)
local held, status = fence(key, worker, attempt)
if held ~= 'held' then
  return reply(held == 'notfound' and 'notfound' or 'conflict', { status })
end
redis.call('HSET', key, 'result', result, 'backend', backend, 'model', model, 'usage', usage, 'remote', remote)
redis.call('HDEL', key, 'partial', 'error')
if warnings ~= '' then
  redis.call('HSET', key, 'warnings', warnings)
else
  redis.call('HDEL', key, 'warnings')
end
if cost then
  redis.call('HSET', key, 'cost', cost)
else
  redis.call('HDEL', key, 'cost')
end
redis.call('ZREM', LEASES, id)
finish(id, key, 'running', 'completed')
note('completed', id, usage, int(NOW - tonumber(redis.call('HGET', key, 'created'))), result)
local fields = redis.call('HGETALL', key)
trim()
return reply('ok', fields)
