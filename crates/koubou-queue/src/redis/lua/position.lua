-- KEYS: the task, the claim order. Reads only: how many claimable tasks go first.
local h = redis.call('HMGET', KEYS[1], 'status', 'score')
if not h[1] then
  return 'notfound'
elseif h[1] ~= 'pending' and h[1] ~= 'retrying' then
  return 'none'
end
return redis.call('ZCOUNT', KEYS[2], '-inf', '(' .. h[2])
