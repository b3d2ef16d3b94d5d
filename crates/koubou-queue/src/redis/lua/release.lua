-- ARGV: id, worker, attempt.
local id, worker, attempt = ARGV[4], ARGV[5], ARGV[6]
local key = task_key(id)
local held, status = fence(key, worker, attempt)
if held ~= 'held' then
  return reply(held == 'notfound' and 'notfound' or 'conflict', { status })
end
redis.call('HINCRBY', key, 'attempts', -1)
redis.call('HDEL', key, 'worker', 'lease', 'partial')
redis.call('ZREM', LEASES, id)
set_status(id, key, 'running', 'pending')
enqueue(id, key)
stop(id, attempt)
note('requeued', id, 'released by a stopping worker')
return reply('ok')
