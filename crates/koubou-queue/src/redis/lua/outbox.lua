-- ARGV: most tasks to return. Housekeeping, then the claimable tasks no confirmed delivery
-- covers, most urgent first: {id, kind, priority, claims, tags (JSON)} for each.
local limit = tonumber(ARGV[5])
housekeeping()
-- Tasks made pending by a Koubou that kept no outbox: all of them need a delivery, once.
if redis.call('EXISTS', P .. 'outbox:since') == 0 then
  redis.call('ZUNIONSTORE', OUTBOX, 2, OUTBOX, PENDING, 'AGGREGATE', 'MIN')
  redis.call('SET', P .. 'outbox:since', NOW_S)
end
local out = {}
for _, id in ipairs(redis.call('ZRANGE', OUTBOX, '0', int(limit - 1), 'WITHSCORES')) do
  out[#out + 1] = id
end
local tasks = {}
for i = 1, #out, 2 do
  local id, score = out[i], tonumber(out[i + 1])
  local h = redis.call('HMGET', task_key(id), 'status', 'kind', 'claims')
  if h[1] == 'pending' then
    tasks[#tasks + 1] = id
    tasks[#tasks + 1] = h[2]
    tasks[#tasks + 1] = int(10 - math.floor(score / 2 ^ 43))
    tasks[#tasks + 1] = h[3] or '0'
    tasks[#tasks + 1] = tags_json(task_key(id))
  else
    redis.call('ZREM', OUTBOX, id)
  end
end
return reply('ok', tasks)
