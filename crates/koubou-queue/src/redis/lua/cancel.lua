-- ARGV: id.
local id = ARGV[5]
local key = task_key(id)
local h = redis.call('HMGET', key, 'status', 'attempts')
local status = h[1]
if not status then
  return reply('notfound')
elseif status == 'pending' then
  dequeue(id, key)
elseif status == 'retrying' then
  redis.call('ZREM', DELAYED, id)
elseif status == 'running' then
  redis.call('ZREM', LEASES, id)
  stop(id, h[2])
else
  return reply('conflict', { status })
end
finish(id, key, status, 'cancelled')
note('cancelled', id)
local fields = redis.call('HGETALL', key)
trim()
return reply('ok', fields)
