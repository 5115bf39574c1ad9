"""Presence transitions across nodes: one Lua script per channel, leases and a due index.

Keys of one channel (all in the channel's slot, so one script updates them atomically,
on Redis Cluster too):

    <prefix>:{<channel>}:pconn    sorted set: "<node>\\n<user>" -> lease expiry (ms)
    <prefix>:{<channel>}:pusers   hash: user -> nodes holding them
    <prefix>:{<channel>}:pleave   sorted set: user -> deadline of the pending leave (ms)
    <prefix>:{<channel>}:pmeta    hash: gen (random, set once), seq (transition counter)
    <prefix>:presence:due         sorted set: channel -> earliest lease expiry or leave
                                  deadline (a hint, in its own slot)

``PRESENCE_SCRIPT`` registers a node's users (``arrive``: a lease of ``ttl``; refreshed
every third of it), removes them (``depart``: a pending leave due after ``ttl``), and on
every call first releases expired leases (their node crashed or lost Redis: their users
get a pending leave due at once) and then removes and reports the due leaves. Each
transition is reported to exactly one caller (the script removes what it reports) and
published by the script itself, ``~:<message>`` on the channel's pub/sub channel
(``SPUBLISH`` on a cluster), so every node serving the channel gets it once.

Every node scans the due index every ``interval`` and sweeps the channels that are due:
this is how the users of a crashed node get their leaves, whoever is left. The index
is written after each script call with the script's answer (a hint: an entry is removed
only if unchanged since it was read, and the nodes holding users rewrite it with each
lease refresh).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from hashlib import sha1

from redis.exceptions import ResponseError

from tidings.brokers.base import BrokerHandler
from tidings.brokers.presence_table import Kind, PresenceChange
from tidings.brokers.redis.link import unavailable
from tidings.brokers.redis.router import Router
from tidings.brokers.redis.scripts import KeyLayout, key_slot
from tidings.errors import BrokerUnavailable
from tidings.protocol.wire import format_timestamp

__all__ = [
    "DUE_REMOVE_SCRIPT",
    "PRESENCE_MARK",
    "PRESENCE_SCRIPT",
    "SCRIPTS",
    "PresenceLedger",
]

logger = logging.getLogger(__name__)

#: What starts a presence message on a channel's pub/sub channel (epochs are hex).
PRESENCE_MARK = b"~:"

# KEYS: pconn, pusers, pleave, pmeta
# ARGV: op (arrive|depart|sweep), now ms, ttl ms, candidate generation, keep ms, node,
#       pub/sub command, pub/sub channel, channel as JSON, timestamp, users...
# Returns {generation, next deadline ms (-1: nothing left), then kind, user, seq,
#          occupancy ('' | 'occupied' | 'vacated') per transition}.
PRESENCE_SCRIPT = """
local now = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local gen = redis.call('HGET', KEYS[4], 'gen')
if not gen then
  gen = ARGV[4]
  redis.call('HSET', KEYS[4], 'gen', gen)
end
local out = {gen, -1}
local function present()
  return redis.call('HLEN', KEYS[2]) + redis.call('ZCARD', KEYS[3])
end
local function emit(kind, user, occ)
  local seq = redis.call('HINCRBY', KEYS[4], 'seq', 1)
  out[#out + 1] = kind
  out[#out + 1] = user
  out[#out + 1] = seq
  out[#out + 1] = occ
  redis.call(ARGV[7], ARGV[8], '~:{"type":"' .. kind .. '","channel":' .. ARGV[9] ..
    ',"timestamp":"' .. ARGV[10] .. '","data":{"user_id":' .. cjson.encode(user) .. '}}')
end
local function release(user, deadline)
  if redis.call('HINCRBY', KEYS[2], user, -1) <= 0 then
    redis.call('HDEL', KEYS[2], user)
    redis.call('ZADD', KEYS[3], deadline, user)
  end
end
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  redis.call('ZREM', KEYS[1], member)
  release(string.match(member, '^[^\\n]*\\n(.*)$'), now)
end
local op = ARGV[1]
for i = 11, #ARGV do
  local user = ARGV[i]
  local member = ARGV[6] .. '\\n' .. user
  if op == 'arrive' then
    if redis.call('ZADD', KEYS[1], now + ttl, member) == 1 then
      if redis.call('HINCRBY', KEYS[2], user, 1) == 1
          and redis.call('ZREM', KEYS[3], user) == 0 then
        local occ = ''
        if present() == 1 then occ = 'occupied' end
        emit('join', user, occ)
      end
    end
  elseif op == 'depart' then
    if redis.call('ZREM', KEYS[1], member) == 1 then
      release(user, now + ttl)
    end
  end
end
for _, user in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  redis.call('ZREM', KEYS[3], user)
  local occ = ''
  if present() == 0 then occ = 'vacated' end
  emit('leave', user, occ)
end
local a = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local b = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
local nxt = -1
if #a > 0 then nxt = tonumber(a[2]) end
if #b > 0 and (nxt < 0 or tonumber(b[2]) < nxt) then nxt = tonumber(b[2]) end
out[2] = nxt
for k = 1, 4 do
  redis.call('PEXPIRE', KEYS[k], ARGV[5])
end
return out
"""

#: Remove a channel from the due index only if its score is still the one read.
#: KEYS: due index; ARGV: channel, score as read. Returns 1 when removed.
DUE_REMOVE_SCRIPT = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"""

#: How long presence keys outlive their last update (their generation with them).
KEEP_MS = 7 * 24 * 3600 * 1000
#: Channels swept per scan of the due index.
DUE_BATCH = 100


def _sha(text: str) -> str:
    return sha1(text.encode(), usedforsecurity=False).hexdigest()


SCRIPTS = {_sha(PRESENCE_SCRIPT): PRESENCE_SCRIPT, _sha(DUE_REMOVE_SCRIPT): DUE_REMOVE_SCRIPT}


class PresenceLedger:
    """This node's side of the script (see the module docstring).

    ``interval``: the longest pause between two scans of the due index (shorter while
    this node holds users of a short ``ttl``: a third of it, for the lease refresh).
    """

    def __init__(
        self,
        router: Router,
        keys: KeyLayout,
        node_id: str,
        *,
        pubsub_command: str,
        handler: Callable[[], BrokerHandler | None],
        new_generation: Callable[[], str],
        interval: float = 1.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._router = router
        self._keys = keys
        self._node = node_id
        self._pubsub_command = pubsub_command
        self._handler = handler
        self._new_generation = new_generation
        self._interval = interval
        self._wall_clock = wall_clock
        self._due = f"{keys.prefix}:presence:due"
        self._sha = _sha(PRESENCE_SCRIPT)
        self._remove_sha = _sha(DUE_REMOVE_SCRIPT)
        #: (channel, user) -> ttl: the users this node holds (leases to refresh).
        self._held: dict[tuple[str, str], float] = {}

    async def arrive(self, channel: str, user_id: str, ttl: float) -> None:
        self._held[(channel, user_id)] = ttl
        await self._call("arrive", channel, ttl, [user_id])

    async def depart(self, channel: str, user_id: str, ttl: float) -> None:
        self._held.pop((channel, user_id), None)
        await self._call("depart", channel, ttl, [user_id])

    async def depart_all(self) -> None:
        """Unregister every user this node holds (a clean shutdown): their leaves come
        after the ttl unless they reconnect elsewhere."""
        held, self._held = self._held, {}
        for (channel, ttl), users in _by_channel(held).items():
            await self._call("depart", channel, ttl, users)

    def period(self) -> float:
        """The pause before the next round."""
        shortest = min(self._held.values(), default=self._interval * 3)
        return max(0.01, min(self._interval, shortest / 3))

    async def sweep_forever(self) -> None:
        """Refresh this node's leases and sweep due channels, forever."""
        while True:
            await asyncio.sleep(self.period())
            try:
                await self.round()
            except BrokerUnavailable as exc:
                logger.debug("presence sweep failed: %s", exc)

    async def round(self) -> None:
        """One refresh of the leases and one scan of the due index."""
        for (channel, ttl), users in _by_channel(self._held).items():
            await self._call("arrive", channel, ttl, users)
        now_ms = int(self._wall_clock() * 1000)
        slot = key_slot(self._due.encode())
        (due,) = await self._router.run(
            slot,
            [("ZRANGEBYSCORE", self._due, "-inf", now_ms, "WITHSCORES", "LIMIT", 0, DUE_BATCH)],
            retry=True,
        )
        if isinstance(due, ResponseError):
            raise unavailable(due)
        for i in range(0, len(due), 2):
            channel, score = due[i].decode(), due[i + 1]
            if await self._call("sweep", channel, 0.0, []) < 0:
                await self._router.run(
                    slot, [("EVALSHA", self._remove_sha, 1, self._due, channel, score)]
                )

    async def _call(self, op: str, channel: str, ttl: float, users: Sequence[str]) -> int:
        """Run the script; report its transitions; return the next deadline (ms, -1:
        none), which also goes into the due index."""
        wall = self._wall_clock()
        keys = [
            f"{self._keys.prefix}:{{{channel}}}:{name}"
            for name in ("pconn", "pusers", "pleave", "pmeta")
        ]
        (reply,) = await self._router.run(
            key_slot(keys[0].encode()),
            [
                (
                    "EVALSHA",
                    self._sha,
                    4,
                    *keys,
                    op,
                    int(wall * 1000),
                    int(ttl * 1000),
                    self._new_generation(),
                    KEEP_MS,
                    self._node,
                    self._pubsub_command,
                    self._keys.events(channel),
                    json.dumps(channel),
                    format_timestamp(wall),
                    *users,
                )
            ],
            retry=op != "depart",
        )
        if isinstance(reply, ResponseError):
            logger.warning("redis refused a presence update: %s", type(reply).__name__)
            raise unavailable(reply)
        generation, deadline = reply[0].decode(), int(reply[1])
        handler = self._handler()
        for i in range(2, len(reply), 4):
            occupancy = reply[i + 3].decode() or None
            kind: Kind = "join" if reply[i] == b"join" else "leave"
            change = PresenceChange(
                channel,
                reply[i + 1].decode(),
                kind,
                generation,
                int(reply[i + 2]),
                "occupied"
                if occupancy == "occupied"
                else "vacated"
                if occupancy == "vacated"
                else None,
            )
            if handler is not None:
                try:
                    handler.on_presence_change(change)
                except Exception:
                    # BrokerHandler's failing-handler contract: logged, the rest go on.
                    logger.exception("on_presence_change failed for a channel")
        if deadline >= 0:
            # After the script, in another slot: a hint that may briefly lag (see above).
            await self._router.run(
                key_slot(self._due.encode()), [("ZADD", self._due, deadline, channel)]
            )
        return deadline


def _by_channel(held: dict[tuple[str, str], float]) -> dict[tuple[str, float], list[str]]:
    groups: dict[tuple[str, float], list[str]] = {}
    for (channel, user), ttl in held.items():
        groups.setdefault((channel, ttl), []).append(user)
    return groups
