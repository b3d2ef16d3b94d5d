-- ARGV: id.
local id = ARGV[5]
local key = task_key(id)
local t = read(key, 'seq')
local status = t[FIELD_AT.status]
local set, unset = {}, {}
if not status then
  return reply('notfound')
elseif status == 'pending' then
  dequeue(id, key)
elseif status == 'retrying' then
  undelay(id)
elseif status == 'running' then
  redis.call('ZREM', LEASES, id)
  unset[1] = 'lease'
  redis.call('HDEL', key, 'lease')
  stop(id, t[FIELD_AT.attempts])
else
  return reply('conflict', { status })
end
finish(id, key, status, 'cancelled', t[EXTRA], set)
note('cancelled', id)
patch(t, set, unset)
trim(true)
return reply('ok', record(t))
