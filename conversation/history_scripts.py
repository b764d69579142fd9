"""The Lua scripts behind conversation/history.py: claims, answered marks, turns, a
tenant's sessions bound. Kept apart so that history.py reads as the Python API.

Three steps per request, so that a crash between them loses nothing:

1. LOAD, before the envelope is sent: a request whose claim holds was processed
   before (an at-least-once redelivery) and gets nil: no envelope. Otherwise the
   history is read; nothing is written. With room >= 0 only the newest turns whose
   stored counts fit `room` tokens are read, from the tail in chunks: a window of a
   long history moves a few turns, not all of them. Returns {turns in the list, kept}.
2. CLAIM_APPEND, once the broker acknowledged the envelope: claim the request id
   (in CLAIMS_KEY) and, if the claim is new, append the request's own turns and
   record the session in its tenant's index (the sessions bound), atomically. A
   processor that dies between the two leaves no claim: the redelivered request is
   read and forwarded again (the worker and the client drop the duplicate).
3. ANSWER_ONCE, the worker's, once per request id (its member of ANSWERED_KEY): the
   assistant turn follows the request's claimed turns. A worker can answer before
   step 2 ran (the envelope is on the contexts topic as soon as it is
   acknowledged); its turn then waits under the request's `early` key, and step 2
   appends it right after the question, in the same script: the history never
   reads answer, question. "Not claimed" means "not claimed yet" only while the
   envelope is younger than a claim lasts: an envelope answered later than that
   (a request with no deadline behind an hour's backlog) had its claim run and
   lapse, and its turn is appended at once; parked, it would wait for a claim
   that already happened.

Claims and answered marks are members of sorted sets without a TTL, scored by the
Unix ms at which each lapses (no volatile-* eviction can pick them); a mark holds
while its score is in the future, and each new one prunes up to 64 lapsed ones.

Rolling upgrade, for one release: a claim or answered mark of the layout before
(`seen:` / `answered:` keys with a TTL, written by the processors and workers of
the release before) counts as well (`or EXISTS`); only the new layout is written.
"""

from __future__ import annotations

# how many lapsed marks, or sessions past a bound, one call removes at most: a
# bounded amount of work per call (and unpack's arguments stay far below Lua's stack)
PRUNE_LIMIT = 64

_NOW = f"""
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local function held(set, member, legacy)
  local lapses = redis.call('ZSCORE', set, member)
  if lapses and tonumber(lapses) > now then return true end
  return legacy ~= nil and redis.call('EXISTS', legacy) == 1
end
local function mark(set, member, lasts_ms)
  local lapsed = redis.call('ZRANGEBYSCORE', set, '-inf', now, 'LIMIT', 0, {PRUNE_LIMIT})
  if #lapsed > 0 then redis.call('ZREM', set, unpack(lapsed)) end
  redis.call('ZADD', set, now + lasts_ms, member)
end
-- the session takes its place in its tenant's index; sessions idle past the TTL leave
-- it (their history expired); past `limit` (0: no bound, no index) the least recently used lose
-- their history and embeddings, at most {PRUNE_LIMIT} a call, never `session` itself
local function bound(index, limit, ttl, session, history_prefix, embeddings_prefix)
  if limit <= 0 then return 0 end  -- no bound: no index to keep
  redis.call('ZADD', index, now, session)
  redis.call('EXPIRE', index, ttl)
  redis.call('ZREMRANGEBYSCORE', index, '-inf', now - ttl * 1000)
  local over = redis.call('ZCARD', index) - limit
  if over <= 0 then return 0 end
  local oldest = redis.call('ZRANGE', index, 0, math.min(over, {PRUNE_LIMIT}))
  local dropped = {{}}
  for _, other in ipairs(oldest) do
    if other ~= session and #dropped < math.min(over, {PRUNE_LIMIT}) then
      redis.call('DEL', history_prefix .. other, embeddings_prefix .. other)
      dropped[#dropped + 1] = other
    end
  end
  if #dropped > 0 then redis.call('ZREM', index, unpack(dropped)) end
  return #dropped
end
"""

# KEYS: claims, history, legacy claim. ARGV: room, claim member.
LOAD = (
    _NOW
    + """
local room = tonumber(ARGV[1])
if held(KEYS[1], ARGV[2], KEYS[3]) then return false end
local total = redis.call('LLEN', KEYS[2])
local kept = {}
if room < 0 then
  kept = redis.call('LRANGE', KEYS[2], 0, -1)
elseif room > 0 then
  local newest, used, stop = {}, 0, -1
  while -stop <= total do
    local part = redis.call('LRANGE', KEYS[2], stop - 31, stop)
    local full = false
    for i = #part, 1, -1 do
      local n = tonumber(string.match(part[i], '^(%d+)\t')) or 0
      if used + n > room then full = true break end
      used = used + n
      newest[#newest + 1] = part[i]
    end
    if full then break end
    stop = stop - 32
  end
  for i = #newest, 1, -1 do kept[#kept + 1] = newest[i] end
end
return {total, kept}
"""
)

# KEYS: claims, history, early answer, legacy claim, the tenant's sessions index.
# ARGV: history TTL, max turns, claim member, claim lasts (s), keep turns ('0'/'1'),
# sessions bound, session key part, history and embeddings key prefixes, turns...
CLAIM_APPEND = (
    _NOW
    + """
local ttl, max_turns = tonumber(ARGV[1]), tonumber(ARGV[2])
if held(KEYS[1], ARGV[3], KEYS[4]) then return 0 end
-- Lua keeps the writes made before an error: whatever can fail is checked first,
-- and the parked answer is deleted only once it is in the history
local kind = redis.call('TYPE', KEYS[2])
if type(kind) == 'table' then kind = kind['ok'] end
if ARGV[5] ~= '0' and kind ~= 'none' and kind ~= 'list' then
  return redis.error_reply('WRONGTYPE the session history is a ' .. tostring(kind) .. ', not a list')
end
local early = redis.call('LRANGE', KEYS[3], 0, -1)
mark(KEYS[1], ARGV[3], tonumber(ARGV[4]) * 1000)
if ARGV[5] == '0' then
  if #early > 0 then redis.call('DEL', KEYS[3]) end
  return 1
end
if #ARGV > 9 or #early > 0 then
  if #ARGV > 9 then redis.call('RPUSH', KEYS[2], unpack(ARGV, 10)) end
  if #early > 0 then redis.call('RPUSH', KEYS[2], unpack(early)) end
  if #early > 0 then redis.call('DEL', KEYS[3]) end
  redis.call('LTRIM', KEYS[2], -max_turns, -1)
  redis.call('EXPIRE', KEYS[2], ttl)
  bound(KEYS[5], tonumber(ARGV[6]), ttl, ARGV[7], ARGV[8], ARGV[9])
end
return 1
"""
)

# Which members hold a claim (1) or not (0). KEYS: claims, then per member its legacy
# claim key; ARGV: the members.
CLAIMED = (
    _NOW
    + """
local found = {}
for i = 1, #ARGV do found[i] = held(KEYS[1], ARGV[i], KEYS[i + 1]) and 1 or 0 end
return found
"""
)

# KEYS: answered marks, history, claims, early answer, legacy answered, legacy claim.
# ARGV: mark lasts (s), history TTL, max turns, member, the envelope's forwarded_ms
# (0: unknown), a claim's lasts (s), turns...
ANSWER_ONCE = (
    _NOW
    + """
local ttl, max_turns, member = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local forwarded, claim_ms = tonumber(ARGV[5]), tonumber(ARGV[6]) * 1000
if held(KEYS[1], member, KEYS[5]) then return 0 end
mark(KEYS[1], member, tonumber(ARGV[1]) * 1000)
if #ARGV < 7 then return 1 end
-- a margin (a minute, at most a tenth of the claim) for the processors' clock against
-- Redis's and for the claim that follows the acknowledgement: a claim not run that
-- long after the forward never will (the processor died first and its redelivery
-- has been claimed since)
local claim_ran = forwarded > 0 and now >= forwarded + claim_ms - math.min(60000, claim_ms / 10)
if not claim_ran and not held(KEYS[3], member, KEYS[6]) then
  redis.call('RPUSH', KEYS[4], unpack(ARGV, 7))
  redis.call('EXPIRE', KEYS[4], ttl)
  return 1
end
redis.call('RPUSH', KEYS[2], unpack(ARGV, 7))
redis.call('LTRIM', KEYS[2], -max_turns, -1)
redis.call('EXPIRE', KEYS[2], ttl)
return 1
"""
)

# A tenant's share after an answer: KEYS[1] its sessions index, ARGV: the bound, the
# TTL, the session's key part, the prefixes of its history and embeddings keys. Keys
# named in ARGV, not KEYS: one Redis, not a cluster. Replies how many were dropped.
BOUND_SESSIONS = (
    _NOW
    + """
return bound(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5])
"""
)
