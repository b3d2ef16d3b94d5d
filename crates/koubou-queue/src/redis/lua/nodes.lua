-- The node registry ([`Nodes`]). KEYS[1] is the namespace's prefix. `nodes` maps a node id to
-- its registration (JSON, never decoded here: an instance is a 64-bit integer, which Lua's
-- doubles would round), `node_inst` to the instance holding it, `node_exp` scores each id by
-- when its registration runs out and `node_seen` by its last heartbeat (registration or
-- renewal), both on Redis's clock. ARGV[1] is the action.
local P = KEYS[1]
local NODES, INST, EXP, SEEN = P .. 'nodes', P .. 'node_inst', P .. 'node_exp', P .. 'node_seen'
local TIME = redis.call('TIME')
local NOW = tonumber(TIME[1]) * 1000 + math.floor(tonumber(TIME[2]) / 1000)
local action, id = ARGV[1], ARGV[2]

if action == 'register' then
  -- ARGV: id, instance, ttl ms, the instance it may replace ('' for none), the node as JSON.
  local inst, ttl, replace, json = ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6]
  local held = redis.call('HGET', INST, id)
  if held and held ~= inst then
    local exp = tonumber(redis.call('ZSCORE', EXP, id))
    if exp and exp > NOW and replace ~= held then
      local seen = redis.call('ZSCORE', SEEN, id) or '0'
      return { 'taken', redis.call('HGET', NODES, id), string.format('%d', exp), seen }
    end
  end
  redis.call('HSET', NODES, id, json)
  redis.call('HSET', INST, id, inst)
  redis.call('ZADD', EXP, NOW + ttl, id)
  redis.call('ZADD', SEEN, NOW, id)
  return { 'ok' }
elseif action == 'renew' then
  -- ARGV: id, instance, ttl ms, the node as JSON (what it now says of its backends and load).
  if redis.call('HGET', INST, id) ~= ARGV[3] then
    return { 'gone' }
  end
  redis.call('HSET', NODES, id, ARGV[5])
  redis.call('ZADD', EXP, NOW + tonumber(ARGV[4]), id)
  redis.call('ZADD', SEEN, NOW, id)
  return { 'ok' }
elseif action == 'deregister' then
  -- ARGV: id, instance.
  if redis.call('HGET', INST, id) == ARGV[3] then
    redis.call('HDEL', NODES, id)
    redis.call('HDEL', INST, id)
    redis.call('ZREM', EXP, id)
    redis.call('ZREM', SEEN, id)
  end
  return { 'ok' }
elseif action == 'expire' then
  -- Every expired registration, removed: { json, expired at, last seen, json, ... }.
  local out = {}
  for _, dead in ipairs(redis.call('ZRANGEBYSCORE', EXP, '-inf', NOW, 'WITHSCORES')) do
    table.insert(out, dead)
  end
  local gone = {}
  for i = 1, #out, 2 do
    local node = out[i]
    table.insert(gone, redis.call('HGET', NODES, node) or '')
    table.insert(gone, out[i + 1])
    table.insert(gone, redis.call('ZSCORE', SEEN, node) or '0')
    redis.call('HDEL', NODES, node)
    redis.call('HDEL', INST, node)
    redis.call('ZREM', EXP, node)
    redis.call('ZREM', SEEN, node)
  end
  return gone
end
return redis.error_reply('nodes.lua: unknown action ' .. tostring(action))
