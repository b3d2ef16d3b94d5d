-- ARGV: worker, lease in ms, the tags the worker declares (a JSON array; '' for a worker that
-- takes any tags), then the kinds to take (none: any kind).
local worker, lease, declared = ARGV[5], tonumber(ARGV[6]), ARGV[7]
housekeeping()
local allowed
if declared ~= '' then
  allowed = {}
  for _, t in ipairs(cjson.decode(declared)) do
    allowed[t] = true
  end
end
-- Whether the worker serves the task: it declares every tag the task carries.
local function serves(key)
  if not allowed then
    return true
  end
  for _, t in ipairs(cjson.decode(tags_json(key))) do
    if not allowed[t] then
      return false
    end
  end
  return true
end
-- The first task in `set`'s claim order that the worker serves, and its score. An entry whose
-- task is gone (deleted behind the queue's back) is dropped on the way, not claimed.
local function first(set)
  -- The head alone first: it is almost always the one (a worker that takes any tags, or a
  -- backlog of tasks it serves); reading a hundred entries with their scores on every claim
  -- was most of a claim's cost on a long backlog. Further pages are a hundred long.
  local from, size = 0, 1
  while true do
    local page = redis.call('ZRANGE', set, from, from + size - 1, 'WITHSCORES')
    size = 100
    if #page == 0 then
      return nil
    end
    local seen, gone = 0, 0
    for i = 1, #page, 2 do
      local id = page[i]
      local key = task_key(id)
      seen = seen + 1
      if redis.call('EXISTS', key) == 0 then
        redis.call('ZREM', PENDING, id)
        redis.call('ZREM', set, id)
        gone = gone + 1
      elseif serves(key) then
        return id, tonumber(page[i + 1])
      end
    end
    from = from + seen - gone
  end
end
-- The most urgent task the worker serves, over every kind it takes.
local function head()
  if #ARGV < 8 then
    return first(PENDING)
  end
  local best, id
  for i = 8, #ARGV do
    local h, score = first(P .. 'pending:' .. ARGV[i])
    if h and (not best or score < best) then
      best, id = score, h
    end
  end
  return id
end
local id = head()
if not id then
  return reply('none')
end
return reply('ok', take(id, task_key(id), worker, lease))
