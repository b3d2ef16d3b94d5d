-- ARGV: id, claims, id, claims… Each task's delivery was confirmed for that claim count: it
-- leaves the outbox unless it was claimed since.
for i = 5, #ARGV, 2 do
  local id = ARGV[i]
  local h = redis.call('HMGET', task_key(id), 'status', 'claims')
  if h[1] == 'pending' and (h[2] or '0') == ARGV[i + 1] then
    redis.call('ZREM', OUTBOX, id)
  end
end
return reply('ok')
