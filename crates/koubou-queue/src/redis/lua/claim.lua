-- ARGV: worker, lease in ms, then the kinds to take (none: any kind).
local worker, lease = ARGV[4], tonumber(ARGV[5])
housekeeping()
-- The head of the claim order (of the given kinds), and the set it came from.
local function head()
  if #ARGV < 6 then
    return redis.call('ZRANGE', PENDING, 0, 0)[1], PENDING
  end
  local best, id, from
  for i = 6, #ARGV do
    local set = P .. 'pending:' .. ARGV[i]
    local h = redis.call('ZRANGE', set, 0, 0, 'WITHSCORES')
    if h[1] and (not best or tonumber(h[2]) < best) then
      best, id, from = tonumber(h[2]), h[1], set
    end
  end
  return id, from
end
local id, from = head()
-- An entry whose task is gone (deleted behind the queue's back) is dropped, not claimed.
while id and redis.call('EXISTS', task_key(id)) == 0 do
  redis.call('ZREM', PENDING, id)
  redis.call('ZREM', from, id)
  id, from = head()
end
if not id then
  return reply('none')
end
return reply('ok', take(id, task_key(id), worker, lease))
