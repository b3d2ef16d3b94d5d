-- ARGV: id, worker, attempt, then why: '' for a stopping worker (the task is claimable again
-- at once), or the reason a worker cannot serve it and the wait in ms before it may be claimed
-- again (retrying meanwhile, the reason as its error). Either way the attempt does not count.
local id, worker, attempt, reason, wait = ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local key = task_key(id)
local held, status = fence(key, worker, attempt)
if held ~= 'held' then
  return reply(held == 'notfound' and 'notfound' or 'conflict', { status })
end
redis.call('HINCRBY', key, 'attempts', '-1')
redis.call('HDEL', key, 'worker', 'lease', 'partial')
redis.call('ZREM', LEASES, id)
stop(id, attempt)
if reason == '' then
  set_status(id, key, 'running', 'pending')
  enqueue(id, key)
  note('requeued', id, 'released by a stopping worker')
else
  local at = NOW + tonumber(wait)
  redis.call('HSET', key, 'error', reason, 'available', int(at), 'status', 'retrying')
  move(id, key, 'running', 'retrying')
  delay(id, int(at))
  note('requeued', id, 'released by worker ' .. worker .. ': ' .. reason)
end
return reply('ok')
