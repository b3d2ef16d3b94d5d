-- ARGV: id, worker, attempt, result, backend, model, usage (JSON), warnings (JSON, '' none),
-- remote ('1' or '0'), cost (optional).
local id, worker, attempt = ARGV[5], ARGV[6], ARGV[7]
local result, backend, model, usage, warnings, remote, cost = ARGV[8], ARGV[9], ARGV[10], ARGV[11], ARGV[12],
  ARGV[13], opt(ARGV[14])
local key = task_key(id)
local t = read(key, 'seq')
local held, status = fence_read(t, worker, attempt)
if held ~= 'held' then
  return reply(held == 'notfound' and 'notfound' or 'conflict', { status })
end
local set = { 'result', result, 'backend', backend, 'model', model, 'usage', usage, 'remote', remote }
local unset = { 'partial', 'error', 'lease' }
if warnings ~= '' then
  set[#set + 1], set[#set + 2] = 'warnings', warnings
else
  unset[#unset + 1] = 'warnings'
end
if cost then
  set[#set + 1], set[#set + 2] = 'cost', cost
else
  unset[#unset + 1] = 'cost'
end
redis.call('HDEL', key, unpack(unset))
redis.call('ZREM', LEASES, id)
finish(id, key, 'running', 'completed', t[EXTRA], set)
note('completed', id, usage, int(NOW - tonumber(t[FIELD_AT.created])), result)
patch(t, set, unset)
trim(true)
return reply('ok', record(t))
