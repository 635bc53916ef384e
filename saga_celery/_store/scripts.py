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
-- ARGV[1]   expected version  ARGV[2] new version  ARGV[3] the progress JSON (no plan)
-- ARGV[4]   lease action: 'acquire', 'release' or ''
-- ARGV[5]   lease token       ARGV[6] lease time to live in ms (acquire)
-- ARGV[7]   '1' if the saga is terminal after this transition, else '0'
-- ARGV[8]   retention in ms of a terminal saga's state and events; '' keeps them forever
-- ARGV[9]   'd' if ARGV[3] is the progress (the journal is then emptied), 'j' if it is a
--           journal line to append (``_core/journal.py``: the progress stays as it is)
-- ARGV[10..] event JSONs, oldest first
-- Returns 1 if committed, 2 if committed and the saga was terminal before (revived by
-- retry_rollback), 0 on a version or lease conflict (nothing written).
--
-- The hot path sends only the commands it needs: keys are read with pcall and a key of the
-- wrong type is diagnosed (TYPE) only then, before anything is written.
local function refuse(key, wanted)
  local t = redis.call('TYPE', key)
  if type(t) == 'table' then t = t['ok'] end
  return redis.error_reply('WRONGTYPE ' .. key .. ' holds a ' .. t .. ', not a ' .. wanted)
end
local function failed(reply)
  return type(reply) == 'table' and reply['err'] ~= nil
end

local state = redis.pcall('HMGET', KEYS[1], 'v', 't', 'j')
if failed(state) then return refuse(KEYS[1], 'hash') end
if state[1] ~= ARGV[1] then return 0 end
local holder = false
if #KEYS == 3 then
  holder = redis.pcall('GET', KEYS[3])
  if failed(holder) then return refuse(KEYS[3], 'string') end
end
if ARGV[4] == 'acquire' and holder and holder ~= ARGV[5] then return 0 end

-- Events first: a stream key of the wrong type fails the first XADD, before any write.
for i = 10, #ARGV do
  if failed(redis.pcall('XADD', KEYS[2], '*', 'e', ARGV[i])) then
    return refuse(KEYS[2], 'stream')
  end
end
if ARGV[9] == 'j' then
  redis.call('HSET', KEYS[1], 'v', ARGV[2], 'j', (state[3] or '') .. ARGV[3] .. '\\n',
             't', ARGV[7])
else
  redis.call('HSET', KEYS[1], 'v', ARGV[2], 'd', ARGV[3], 't', ARGV[7])
  if state[3] then redis.call('HDEL', KEYS[1], 'j') end
end
if ARGV[4] == 'acquire' then
  redis.call('SET', KEYS[3], ARGV[5], 'PX', ARGV[6])
elseif ARGV[4] == 'release' and holder == ARGV[5] then
  redis.call('DEL', KEYS[3])
end
local revived = state[2] == '1' and ARGV[7] == '0'
if ARGV[7] == '1' and ARGV[8] ~= '' then
  redis.call('PEXPIRE', KEYS[1], ARGV[8])
  redis.call('PEXPIRE', KEYS[2], ARGV[8])
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
