-- ARGV: id, worker, attempt, error, retryable ('1' or '0'), retry delay in ms, then backend,
-- model, remote, partial (optional).
local id, worker, attempt, err, retryable, backoff = ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], tonumber(ARGV[10])
local key = task_key(id)
local t = read(key, 'seq')
local held, status = fence_read(t, worker, attempt)
if held ~= 'held' then
  return reply(held == 'notfound' and 'notfound' or 'conflict', { status })
end
local set, unset = { 'error', err }, { 'lease' }
for i, field in ipairs({ 'backend', 'model', 'remote' }) do
  local v = opt(ARGV[10 + i])
  if v then
    set[#set + 1], set[#set + 2] = field, v
  end
end
local partial = opt(ARGV[14])
if partial then
  set[#set + 1], set[#set + 2] = 'partial', partial
else
  unset[#unset + 1] = 'partial'
end
redis.call('HDEL', key, unpack(unset))
redis.call('ZREM', LEASES, id)
if retryable == '1' and tonumber(attempt) < tonumber(t[FIELD_AT.max]) then
  local at = int(NOW + backoff)
  set[#set + 1], set[#set + 2], set[#set + 3], set[#set + 4] = 'available', at, 'status', 'retrying'
  redis.call('HSET', key, unpack(set))
  move(id, key, 'running', 'retrying', t[EXTRA])
  delay(id, at)
  note('failed', id, err, at, 'retrying')
  patch(t, set, unset)
  return reply('ok', record(t))
end
finish(id, key, 'running', 'failed', t[EXTRA], set)
note('failed', id, err, '', 'failed')
patch(t, set, unset)
trim(true)
return reply('ok', record(t))
