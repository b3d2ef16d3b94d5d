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
-- The first task in `set`'s claim order that the worker serves, and its score.
local function first(set)
  -- The head alone first: it is almost always the one (a worker that takes any tags, or a
  -- backlog of tasks it serves); reading a hundred entries with their scores on every claim
  -- was most of a claim's cost on a long backlog. Further pages are a hundred long.
  local from, lo, hi = 0, '0', '0'
  while true do
    local page = redis.call('ZRANGE', set, lo, hi, 'WITHSCORES')
    if #page == 0 then
      return nil
    end
    for i = 1, #page, 2 do
      if serves(task_key(page[i])) then
        return page[i], tonumber(page[i + 1])
      end
    end
    from = from + #page / 2
    lo, hi = int(from), int(from + 99)
  end
end
-- The most urgent task the worker serves, over every kind it takes, and the set it is in.
local function head()
  if #ARGV < 8 then
    return first(PENDING), PENDING
  end
  local best, id, from
  for i = 8, #ARGV do
    local set = P .. 'pending:' .. ARGV[i]
    local h, score = first(set)
    if h and (not best or score < best) then
      best, id, from = score, h, set
    end
  end
  return id, from
end
while true do
  local id, set = head()
  if not id then
    return reply('none')
  end
  local fields = take(id, task_key(id), worker, lease)
  if fields then
    return reply('ok', fields)
  end
  -- Its record was deleted behind the queue's back: dropped (take did the rest), not claimed.
  redis.call('ZREM', set, id)
end
