-- ARGV: id, worker, attempt, lease in ms, then backend, model, partial, remote (optional).
local id, worker, attempt, ttl = ARGV[5], ARGV[6], ARGV[7], tonumber(ARGV[8])
local key = task_key(id)
local held, status = fence(key, worker, attempt)
if held == 'notfound' then
  return reply('notfound')
elseif held ~= 'held' then
  return reply(status == 'cancelled' and 'cancelled' or 'lost')
end
local lease_until = int(NOW + ttl)
local set = { 'lease', lease_until }
for i, field in ipairs({ 'backend', 'model', 'partial', 'remote' }) do
  local v = opt(ARGV[8 + i])
  if v then
    set[#set + 1], set[#set + 2] = field, v
  end
end
redis.call('HSET', key, unpack(set))
redis.call('ZADD', LEASES, lease_until, id)
lower_due(lease_until)
return reply('held')
