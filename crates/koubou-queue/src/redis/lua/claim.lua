-- ARGV: worker, lease in ms, then the kinds to take (none: any kind).
local worker, lease = ARGV[4], tonumber(ARGV[5])
housekeeping()
local id
if #ARGV < 6 then
  id = redis.call('ZRANGE', PENDING, 0, 0)[1]
else
  local best
  for i = 6, #ARGV do
    local head = redis.call('ZRANGE', P .. 'pending:' .. ARGV[i], 0, 0, 'WITHSCORES')
    if head[1] and (not best or tonumber(head[2]) < best) then
      best, id = tonumber(head[2]), head[1]
    end
  end
end
if not id then
  return reply('none')
end
local key = task_key(id)
dequeue(id, key)
local attempt = redis.call('HINCRBY', key, 'attempts', 1)
local lease_until = NOW + lease
redis.call('HSET', key, 'worker', worker, 'started', int(NOW), 'lease', int(lease_until))
redis.call('HDEL', key, 'finished')
set_status(id, key, 'pending', 'running')
redis.call('ZADD', LEASES, lease_until, id)
note('claimed', id, worker, int(attempt))
return reply('ok', redis.call('HGETALL', key))
