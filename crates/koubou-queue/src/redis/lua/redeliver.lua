-- No ARGV. Every pending task back in the outbox, whatever deliveries were confirmed for it (the
-- broker lost them): answers how many were counted as delivered.
local before = redis.call('ZCARD', OUTBOX)
redis.call('ZUNIONSTORE', OUTBOX, '2', OUTBOX, PENDING, 'AGGREGATE', 'MIN')
return reply('ok', { int(redis.call('ZCARD', OUTBOX) - before) })
