"""The Lua scripts behind every atomic update of one saga.

Each script touches only the keys of one saga (one hash tag, so one Cluster slot), checks
everything before it writes anything (Redis does not roll a script back when it fails
halfway), and compares strings only (Lua 5.1 prints large numbers in exponent form).
A key of the wrong type is reported as ``WRONGTYPE <key> ...`` so the store can name it.
"""

from __future__ import annotations

CREATE = """
-- Store a new saga at version 1 with its first events (and the timers of a first stage
-- that waits, SPEC section 8).
-- KEYS[1]   state hash     <prefix>{id}:state
-- KEYS[2]   event stream   <prefix>{id}:events
-- KEYS[3]   timers set     <prefix>timers, only with timers
-- ARGV[1]   the run's progress JSON (no plan)   ARGV[2] the plan JSON (written only here)
-- ARGV[3..] event JSONs, oldest first; with KEYS[3], ARGV[3] is the number n of timers,
--           the events follow it, then n pairs: a timer's due time (epoch ms) and member
-- Returns 1 if created, 0 if the state key already exists (nothing written).
local first, timers = 3, 0
if #KEYS == 3 then first, timers = 4, tonumber(ARGV[3]) end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
-- The timers set's type is checked before anything is written.
if timers > 0 then redis.call('ZCARD', KEYS[3]) end
-- A stream left without its state (retention, a manual delete) belonged to an older saga.
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'v', '1', 'd', ARGV[1], 'p', ARGV[2], 't', '0')
local last = #ARGV - 2 * timers
for i = first, last do
  redis.call('XADD', KEYS[2], '*', 'e', ARGV[i])
end
for i = last + 1, #ARGV, 2 do
  redis.call('ZADD', KEYS[3], 'NX', ARGV[i], ARGV[i + 1])
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
-- retry_rollback), 0 on a version or lease conflict (nothing written), 3 if the saga's
-- record is compacted or archived (``history.py``: nothing written; EXPAND it, then retry).
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
local state = redis.pcall('HMGET', KEYS[1], 'v', 't', 'j', 'c', 'a')
if failed(state) then return refuse(KEYS[1], 'hash', state) end
if state[1] ~= expected then return 0 end
-- A finished saga compacted or archived (``history.py``): EXPAND it first, then commit.
if state[4] or state[5] then return 3 end
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

# -- finished sagas: compaction, archive tombstones, expansion, deletion (``history.py``) ----

COMPACT = """
-- Replace a finished saga's progress, plan, journal and event stream by its history value.
-- KEYS[1]  state hash   KEYS[2]  event stream
-- ARGV[1]  the version the history was read at   ARGV[2] the compacted history
-- ARGV[3]  what older releases find in 'd' (a newer-format marker)
-- Returns 1 if compacted, now or already at this version (a batch sent again after another
-- node of a Cluster answered NOSCRIPT), 0 if the saga changed, runs again, or is archived.
local state = redis.call('HMGET', KEYS[1], 'v', 't', 'c', 'a')
if state[1] ~= ARGV[1] or state[2] ~= '1' or state[4] then return 0 end
if state[3] then return 1 end
-- Written afresh (a hash keeps its large encoding after HDEL), with its time to live.
local ttl = redis.call('PTTL', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], 'v', state[1], 't', '1', 'c', ARGV[2], 'd', ARGV[3])
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
"""

TOMBSTONE = """
-- Leave only a tombstone of an archived finished saga: version, status, archive marker.
-- KEYS[1]  state hash   KEYS[2]  event stream
-- ARGV[1]  the version the archive holds   ARGV[2] the saga's status
-- ARGV[3]  the archive marker   ARGV[4] what older releases find in 'd'
-- Returns 1 if written, 0 if the saga changed or runs again (the archive is then stale and
-- is written again when it next ends).
local state = redis.call('HMGET', KEYS[1], 'v', 't')
if state[1] ~= ARGV[1] or state[2] ~= '1' then return 0 end
-- Written afresh: a small hash takes Redis's compact encoding again (HDEL keeps the large
-- one the progress and plan needed), with its time to live.
local ttl = redis.call('PTTL', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], 'v', state[1], 't', '1', 'a', ARGV[3], 's', ARGV[2], 'd', ARGV[4])
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
"""

EXPAND = """
-- Give a compacted or archived saga its full record back (a commit must change it).
-- KEYS[1]  state hash   KEYS[2]  event stream
-- ARGV[1]  its version   ARGV[2] progress JSON   ARGV[3] plan JSON
-- ARGV[4..] stream id, event JSON, in pairs, oldest first
-- Returns 1 if expanded, 0 if the version moved or it is not compacted.
local state = redis.call('HMGET', KEYS[1], 'v', 'c', 'a')
if state[1] ~= ARGV[1] or not (state[2] or state[3]) then return 0 end
redis.call('DEL', KEYS[2])
for i = 4, #ARGV, 2 do
  redis.call('XADD', KEYS[2], ARGV[i], 'e', ARGV[i + 1])
end
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 and #ARGV >= 4 then redis.call('PEXPIRE', KEYS[2], ttl) end
redis.call('HSET', KEYS[1], 'd', ARGV[2], 'p', ARGV[3])
redis.call('HDEL', KEYS[1], 'c', 'a', 's', 'j')
return 1
"""

DELETE = """
-- Delete a finished saga's records.
-- KEYS[1]  state hash   KEYS[2]  event stream
-- Returns 1 if deleted, 0 if there was none, -1 if it runs (nothing deleted).
local state = redis.call('HMGET', KEYS[1], 'v', 't')
if not state[1] then
  redis.call('DEL', KEYS[2])
  return 0
end
if state[2] ~= '1' then return -1 end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"""
