-- ARGV: id, worker, lease in ms. Claims exactly that task if it is pending (after housekeeping,
-- which promotes a retry whose backoff is over and requeues an expired lease).
local id, worker, lease = ARGV[5], ARGV[6], tonumber(ARGV[7])
housekeeping()
local key = task_key(id)
if redis.call('HGET', key, 'status') ~= 'pending' then
  return reply('none')
end
local t = take(id, key, worker, lease)
return reply(t and 'ok' or 'none', t)
