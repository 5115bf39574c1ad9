"""Key layout, hash slots and Lua scripts of the Redis broker (plain data: no Redis import).

Every key of one channel carries the channel as a hash tag, ``{<channel>}``, so that all
of them, and the channel's pub/sub channel, live in one slot on Redis Cluster and one
script can touch them atomically. Channel names cannot contain braces (protocol section
4), so the tag is always the channel itself.

    <prefix>:{<channel>}:meta         hash: epoch, offset (appended), committed
    <prefix>:{<channel>}:stream       stream: entry id "<offset>-0", field p = payload
    <prefix>:{<channel>}:idem:<key>   string "<epoch>\\n<offset>\\n<event id>", PX window
    <prefix>:{<channel>}:presence     hash: node id -> JSON {user: connections}
    <prefix>:{<channel>}              pub/sub channel: "<epoch>:<offset>:<payload>"
                                      (traced: "<epoch>:<offset>;<traceparent>:<payload>")
    <prefix>:node:<node id>           string: JSON {channel: subscribers}, PX node ttl
    <prefix>:nodes                    set of node ids (pruned by readers)
    <prefix>:control                  pub/sub channel: node-to-node commands

**Committed offsets.** ``offset`` is the last offset handed out; ``committed`` the last
one that may be shown (delivered live or read from history). With acknowledgement by
replicas (``broker.ack_replicas > 0``) a publish appends (``APPEND_SCRIPT``), waits for
the replicas (``WAIT``), then commits (``COMMIT_SCRIPT``: raises ``committed`` and
publishes): nothing a failover can take back is ever shown. Without it,
``PUBLISH_SCRIPT`` appends and publishes in one step, and a meta hash without
``committed`` has everything committed.
"""

from __future__ import annotations

from binascii import crc_hqx

__all__ = [
    "APPEND_SCRIPT",
    "COMMIT_SCRIPT",
    "READ_SCRIPT",
    "SLOTS",
    "KeyLayout",
    "key_slot",
    "publish_script",
]

#: Hash slots of Redis Cluster.
SLOTS = 16384


def key_slot(key: bytes) -> int:
    """The Redis Cluster hash slot of ``key`` (hash tags honoured)."""
    start = key.find(b"{")
    if start > -1:
        end = key.find(b"}", start + 1)
        if end > -1 and end != start + 1:
            key = key[start + 1 : end]
    return crc_hqx(key, 0) % SLOTS


class KeyLayout:
    """Key and pub/sub channel names under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes = f"{prefix}:nodes"
        self.control = f"{prefix}:control".encode()

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

    def node(self, node_id: str) -> str:
        return f"{self.prefix}:node:{node_id}"


# The shared head of the two appending scripts: idempotency check, epoch creation, offset.
# KEYS: meta, stream[, idempotency record]
# ARGV: candidate epoch, payload head, payload tail, history size, ttl ms,
#       idempotency window ms, pub/sub channel, event id[, traceparent]
# The first write is the one that may fail under maxmemory (Redis refuses the first write
# of a script when out of memory and lets a script that already wrote finish), so a
# refused publish leaves nothing behind.
_APPEND = """
if KEYS[3] then
  local seen = redis.call('GET', KEYS[3])
  if seen then
    local e, o, i = string.match(seen, '^([^\\n]*)\\n([^\\n]*)\\n(.*)$')
    return {e, o, i, 1}
  end
end
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'committed')
local epoch = meta[1]
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
"""


def publish_script(command: str) -> str:
    """Append and publish one event at once (``broker.ack_replicas = 0``).

    ``command``: ``PUBLISH`` (one primary) or ``SPUBLISH`` (cluster: the pub/sub channel
    is in the slot of the channel's keys). Returns {epoch, offset, event id, duplicate}.
    A meta hash that has a ``committed`` field (written by nodes that wait for replicas)
    gets it raised: what is published live is committed. A ninth argument, the publish's
    ``traceparent``, goes into the pub/sub message (not into history).
    """
    return (
        _APPEND
        + f"""
if meta[2] then
  redis.call('HSET', KEYS[1], 'committed', o)
end
local mark = o
if ARGV[9] then
  mark = o .. ';' .. ARGV[9]
end
redis.call('{command}', ARGV[7], epoch .. ':' .. mark .. ':' .. payload)
return {{epoch, o, ARGV[8], 0}}
"""
    )


#: Append one event without publishing it (``broker.ack_replicas > 0``); the caller
#: waits for the replicas, then runs ``COMMIT_SCRIPT``. A meta hash without ``committed``
#: gets it now, at the offset before this one (everything before was committed).
#: Returns {epoch, offset, event id, duplicate}.
APPEND_SCRIPT = (
    _APPEND
    + """
if not meta[2] then
  redis.call('HSET', KEYS[1], 'committed', tonumber(o) - 1)
end
return {epoch, o, ARGV[8], 0}
"""
)

#: Commit a channel's events up to an offset: publish those after ``committed`` in order
#: and raise ``committed``. Idempotent; a changed epoch commits nothing.
#: KEYS: meta, stream
#: ARGV: epoch, offset to commit up to, pub/sub command, pub/sub channel, then
#:       (offset, payload, traceparent or "") triples of events the caller appended (in
#:       increasing order); events not among them are read from the stream (untraced).
#: Returns the committed offset (-1: the epoch changed).
COMMIT_SCRIPT = """
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'committed', 'offset')
if meta[1] ~= ARGV[1] then
  return -1
end
local committed = tonumber(meta[2]) or tonumber(meta[3]) or 0
local upto = math.min(tonumber(ARGV[2]), tonumber(meta[3]) or 0)
if upto <= committed then
  return committed
end
local given = {}
local marks = {}
for i = 5, #ARGV, 3 do
  local o = tonumber(ARGV[i])
  given[o] = ARGV[i + 1]
  if ARGV[i + 2] ~= '' then
    marks[o] = o .. ';' .. ARGV[i + 2]
  end
end
local stored = {}
local first = committed + 1
if not given[first] then
  local entries = redis.call('XRANGE', KEYS[2], first .. '-0', upto .. '-0')
  for _, entry in ipairs(entries) do
    stored[tonumber(string.match(entry[1], '^(%d+)'))] = entry[2][2]
  end
end
for o = first, upto do
  local payload = given[o] or stored[o]
  if payload then
    redis.call(ARGV[3], ARGV[4], ARGV[1] .. ':' .. (marks[o] or o) .. ':' .. payload)
  end
end
redis.call('HSET', KEYS[1], 'committed', upto)
return upto
"""

#: Read a channel's position and (optionally) history, creating its epoch if missing.
#: KEYS: meta, stream
#: ARGV: candidate epoch, first stream id wanted ("<since + 1>-0"), limit, ttl ms,
#:       touch (1: extend the keys' expiry, as a node serving the channel does), since
#: Returns {epoch, position, oldest offset in the stream (offset + 1 when empty),
#:          appended offset, id1, payload1, id2, payload2, ...}: events up to the
#:          committed offset only. The position is the committed offset, or ``since``
#:          when the reader has seen more than is committed here and the offset was
#:          handed out (a commit not yet replicated when a primary failed): what the
#:          reader has is still in this stream, and nothing uncommitted is shown.
READ_SCRIPT = """
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'offset', 'committed')
local epoch = meta[1]
local offset = 0
local visible = 0
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
else
  offset = tonumber(meta[2]) or 0
  visible = tonumber(meta[3]) or offset
  if ARGV[5] == '1' then
    redis.call('PEXPIRE', KEYS[1], ARGV[4])
    redis.call('PEXPIRE', KEYS[2], ARGV[4])
  end
end
local since = tonumber(ARGV[6])
local position = visible
if since > visible and since <= offset then
  position = since
end
local out = {epoch, position, visible + 1, offset}
local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
if #first > 0 then
  out[3] = tonumber(string.match(first[1][1], '^(%d+)'))
end
local limit = tonumber(ARGV[3])
if limit > 0 and visible > since then
  local entries = redis.call('XRANGE', KEYS[2], ARGV[2], visible .. '-0', 'COUNT', limit)
  for _, entry in ipairs(entries) do
    out[#out + 1] = entry[1]
    out[#out + 1] = entry[2][2]
  end
end
return out
"""
