-- ARGV: id, worker, attempt, lease in ms, then backend, model, partial, remote (optional).
local id, worker, attempt, ttl = ARGV[5], ARGV[6], ARGV[7], tonumber(ARGV[8])
local key = task_key(id)
local held, status = fence(key, worker, attempt)
if held == 'notfound' then
  return reply('notfound')
elseif held ~= 'held' then
  return reply(status == 'cancelled' and 'cancelled' or 'lost')
end
local lease_until = NOW + ttl
redis.call('HSET', key, 'lease', int(lease_until))
redis.call('ZADD', LEASES, lease_until, id)
for i, field in ipairs({ 'backend', 'model', 'partial', 'remote' }) do
  local v = opt(ARGV[8 + i])
  if v then
    redis.call('HSET', key, field, v)
  end
end
return reply('held')
