"""The Lua scripts behind every atomic update of one saga.

Each script touches only the keys of one saga (one hash tag, so one Cluster slot), checks
everything before it writes anything (Redis does not roll a script back when it fails
halfway), and compares strings only (Lua 5.1 prints large numbers in exponent form).
A key of the wrong type is reported as ``WRONGTYPE <key> ...`` so the store can name it.
"""

from __future__ import annotations

CREATE = """
-- Store a new saga at version 1 with its first events.
-- KEYS[1]   state hash     <prefix>{id}:state
-- KEYS[2]   event stream   <prefix>{id}:events
-- ARGV[1]   the run's progress JSON (no plan)   ARGV[2] the plan JSON (written only here)
-- ARGV[3..] event JSONs, oldest first
-- Returns 1 if created, 0 if the state key already exists (nothing written).
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
-- A stream left without its state (retention, a manual delete) belonged to an older saga.
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'v', '1', 'd', ARGV[1], 'p', ARGV[2], 't', '0')
for i = 3, #ARGV do
  redis.call('XADD', KEYS[2], '*', 'e', ARGV[i])
end
return 1
"""

COMMIT = """
-- Commit one saga transition: compare-and-set the version, append events, apply a lease.
-- KEYS[1]   state hash        <prefix>{id}:state
-- KEYS[2]   event stream      <prefix>{id}:events
-- KEYS[3]   lease (optional)  <prefix>{id}:lease:<name>
-- ARGV[1]   the header, '|'-separated (one argument where there were seven: packing each
--           argument cost the client more than Redis spends on the whole commit):
--             expected version | new version | lease action ('acquire', 'release' or '')
--             | lease time to live in ms (acquire) | '1' if the saga is terminal after
--             this transition, else '0' | retention in ms of a terminal saga's state and
--             events ('' keeps them forever) | 'd' if ARGV[3] is the progress (the journal
--             is then emptied) or 'j' if it is a journal line to append
--             (``_store/journal.py``: the progress stays as it is) [ | the number n of
--             timers recorded with it (SPEC section 8): left out, with its '|', by every
--             commit that decides no long delay ]
-- ARGV[2]   lease token (any text)
-- ARGV[3]   the progress JSON (no plan), or a journal line
-- ARGV[4..] event JSONs, oldest first, then n pairs: a timer's due time (epoch ms) and
--           its member (``keys.py``)
-- KEYS[#KEYS] timers set  <prefix>timers, when n > 0 (after the lease key, if any)
-- Returns 1 if committed, 2 if committed and the saga was terminal before (revived by
-- retry_rollback), 0 on a version or lease conflict (nothing written).
--
-- The hot path sends only the commands it needs: keys are read with pcall and a key of the
-- wrong type is diagnosed (TYPE) only then, before anything is written.  Any other error
-- (READONLY from a master that a failover demoted) is returned as it is.
local function refuse(key, wanted, reply)
  if not string.find(tostring(reply['err']), 'WRONGTYPE', 1, true) then return reply end
  local t = redis.call('TYPE', key)
  if type(t) == 'table' then t = t['ok'] end
  return redis.error_reply('WRONGTYPE ' .. key .. ' holds a ' .. t .. ', not a ' .. wanted)
end
local function failed(reply)
  return type(reply) == 'table' and reply['err'] ~= nil
end

local expected, version, action, ttl, terminal, retention, mode, timers = string.match(
  ARGV[1], '^(%d+)|(%d+)|(%l*)|(%d*)|([01])|(%d*)|([dj])|(%d+)$')
if not expected then  -- no timers: the header of every commit that decides no long delay
  timers = '0'
  expected, version, action, ttl, terminal, retention, mode = string.match(ARGV[1],
    '^(%d+)|(%d+)|(%l*)|(%d*)|([01])|(%d*)|([dj])$')
end
if not expected then
  return redis.error_reply('ERR saga_celery commit: malformed header ' .. ARGV[1])
end
local state = redis.pcall('HMGET', KEYS[1], 'v', 't', 'j')
if failed(state) then return refuse(KEYS[1], 'hash', state) end
if state[1] ~= expected then return 0 end
local holder = false
local last_event = #ARGV - 2 * tonumber(timers)
if action ~= '' then
  holder = redis.pcall('GET', KEYS[3])
  if failed(holder) then return refuse(KEYS[3], 'string', holder) end
end
if action == 'acquire' and holder and holder ~= ARGV[2] then return 0 end

if timers ~= '0' then
  local counted = redis.pcall('ZCARD', KEYS[#KEYS])
  if failed(counted) then return refuse(KEYS[#KEYS], 'zset', counted) end
end
-- Events first: a stream key of the wrong type fails the first XADD, before any write.
for i = 4, last_event do
  local added = redis.pcall('XADD', KEYS[2], '*', 'e', ARGV[i])
  if failed(added) then return refuse(KEYS[2], 'stream', added) end
end
if mode == 'j' then
  redis.call('HSET', KEYS[1], 'v', version, 'j', (state[3] or '') .. ARGV[3] .. '\\n',
             't', terminal)
else
  redis.call('HSET', KEYS[1], 'v', version, 'd', ARGV[3], 't', terminal)
  if state[3] then redis.call('HDEL', KEYS[1], 'j') end
end
if action == 'acquire' then
  redis.call('SET', KEYS[3], ARGV[2], 'PX', ttl)
elseif action == 'release' and holder == ARGV[2] then
  redis.call('DEL', KEYS[3])
end
for i = last_event + 1, #ARGV, 2 do
  redis.call('ZADD', KEYS[#KEYS], 'NX', ARGV[i], ARGV[i + 1])
end
local revived = state[2] == '1' and terminal == '0'
if terminal == '1' and retention ~= '' then
  redis.call('PEXPIRE', KEYS[1], retention)
  redis.call('PEXPIRE', KEYS[2], retention)
elseif revived then
  -- retry_rollback() revived a terminal saga: its records must not expire under it.
  redis.call('PERSIST', KEYS[1])
  redis.call('PERSIST', KEYS[2])
end
if revived then return 2 end
return 1
"""

RENEW_LEASE = """
-- Extend a lease, only if this token still holds it.
-- KEYS[1]  lease   <prefix>{id}:lease:<name>
-- ARGV[1]  token   ARGV[2] time to live in ms
-- Returns 1 if extended, 0 if the token does not hold the lease.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

RELEASE_LEASE = """
-- Give back a lease, only if this token holds it.
-- KEYS[1]  lease   <prefix>{id}:lease:<name>
-- ARGV[1]  token
-- Returns 1 if released, 0 if the token did not hold the lease.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

CLAIM_TIMERS = """
-- Claim the timers that are due: each is due again when the claim lapses, so another
-- worker's poll skips it and it fires again if this claimer dies before sending it.
-- KEYS[1]  timers set   <prefix>timers
-- ARGV[1]  now, epoch ms   ARGV[2] when the claim lapses, epoch ms   ARGV[3] at most this many
-- Returns a flat list: member, original due time, member, due time, ...
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES',
                       'LIMIT', 0, tonumber(ARGV[3]))
for i = 1, #due, 2 do
  redis.call('ZADD', KEYS[1], 'XX', ARGV[2], due[i])
end
return due
"""
