-- ARGV: node. Requeues every running task held by a worker "<node>/…".
local node = ARGV[5]
local prefix = node .. '/'
local n = 0
for _, id in ipairs(redis.call('ZRANGE', LEASES, '0', '-1')) do
  local worker = redis.call('HGET', task_key(id), 'worker')
  if worker and string.sub(worker, 1, #prefix) == prefix then
    requeue_lost(id, 'node ' .. node .. ' restarted while the task ran')
    n = n + 1
  end
end
return reply('ok', { int(n) })
