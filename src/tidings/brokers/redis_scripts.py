"""Key layout and Lua scripts of the Redis broker (plain data: no Redis import here).

Every key of one channel carries the channel as a hash tag, ``{<channel>}``, so that all
of them live in one slot on Redis Cluster and one script can touch them atomically.
Channel names cannot contain braces (protocol section 4), so the tag is always the
channel itself.

    <prefix>:{<channel>}:meta         hash: epoch, offset
    <prefix>:{<channel>}:stream       stream: entry id "<offset>-0", field p = payload
    <prefix>:{<channel>}:idem:<key>   string "<epoch>\\n<offset>\\n<event id>", PX window
    <prefix>:{<channel>}:presence     hash: node id -> JSON {user: connections}
    <prefix>:{<channel>}              pub/sub channel: "<epoch>:<offset>:<payload>"
    <prefix>:node:<node id>           string: JSON {channel: subscribers}, PX node ttl
    <prefix>:nodes                    set of node ids (pruned by readers)
    <prefix>:control                  pub/sub channel: node-to-node commands
"""

from __future__ import annotations

__all__ = [
    "PUBLISH_SCRIPT",
    "READ_SCRIPT",
    "KeyLayout",
]


class KeyLayout:
    """Key and pub/sub channel names under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes = f"{prefix}:nodes"
        self.control = f"{prefix}:control".encode()
        self._events_head = f"{prefix}:{{".encode()

    def meta(self, channel: str) -> str:
        return f"{self.prefix}:{{{channel}}}:meta"

    def stream(self, channel: str) -> str:
        return f"{self.prefix}:{{{channel}}}:stream"

    def idempotency(self, channel: str, key: str) -> str:
        return f"{self.prefix}:{{{channel}}}:idem:{key}"

    def presence(self, channel: str) -> str:
        return f"{self.prefix}:{{{channel}}}:presence"

    def events(self, channel: str) -> bytes:
        """The pub/sub channel carrying ``channel``'s events."""
        return f"{self.prefix}:{{{channel}}}".encode()

    def channel_of(self, events: bytes) -> str | None:
        """The Tidings channel of a pub/sub channel name, or None if it is not one."""
        if events.startswith(self._events_head) and events.endswith(b"}"):
            return events[len(self._events_head):-1].decode()
        return None

    def node(self, node_id: str) -> str:
        return f"{self.prefix}:node:{node_id}"


#: Publish one event atomically.
#: KEYS: meta, stream[, idempotency record]
#: ARGV: candidate epoch, payload head, payload tail, history size, ttl ms,
#:       idempotency window ms, pub/sub channel, event id
#: Returns {epoch, offset, event id, duplicate (0/1)}.
#:
#: The first write is the one that may fail under maxmemory (Redis refuses the first
#: write of a script when out of memory and lets a script that already wrote finish),
#: so a refused publish leaves nothing behind.
PUBLISH_SCRIPT = """
if KEYS[3] then
  local seen = redis.call('GET', KEYS[3])
  if seen then
    local e, o, i = string.match(seen, '^([^\\n]*)\\n([^\\n]*)\\n(.*)$')
    return {e, o, i, 1}
  end
end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
end
local o = string.format('%d', redis.call('HINCRBY', KEYS[1], 'offset', 1))
local payload = ARGV[2] .. o .. ARGV[3]
local size = tonumber(ARGV[4])
if size > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', size, o .. '-0', 'p', payload)
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
if KEYS[3] then
  redis.call('SET', KEYS[3], epoch .. '\\n' .. o .. '\\n' .. ARGV[8], 'PX', ARGV[6])
end
redis.call('PUBLISH', ARGV[7], epoch .. ':' .. o .. ':' .. payload)
return {epoch, o, ARGV[8], 0}
"""

#: Read a channel's position and (optionally) history, creating its epoch if missing.
#: KEYS: meta, stream
#: ARGV: candidate epoch, first stream id wanted ("<since + 1>-0"), limit, ttl ms,
#:       touch (1: extend the keys' expiry, as a node serving the channel does)
#: Returns {epoch, offset, oldest offset in the stream (offset + 1 when empty),
#:          id1, payload1, id2, payload2, ...}.
READ_SCRIPT = """
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'offset')
local epoch = meta[1]
local offset = 0
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
else
  offset = tonumber(meta[2]) or 0
  if ARGV[5] == '1' then
    redis.call('PEXPIRE', KEYS[1], ARGV[4])
    redis.call('PEXPIRE', KEYS[2], ARGV[4])
  end
end
local out = {epoch, offset, offset + 1}
local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
if #first > 0 then
  out[3] = tonumber(string.match(first[1][1], '^(%d+)'))
end
local limit = tonumber(ARGV[3])
if limit > 0 then
  local entries = redis.call('XRANGE', KEYS[2], ARGV[2], '+', 'COUNT', limit)
  for _, entry in ipairs(entries) do
    out[#out + 1] = entry[1]
    out[#out + 1] = entry[2][2]
  end
end
return out
"""
