"""Cluster-wide views: channel counts, presence and ``disconnect_user`` across nodes.

Each node keeps a key with its channel counts (expiring unless refreshed) and one field
per channel in that channel's presence hash; readers ignore (and remove) entries of
nodes whose key is gone. ``disconnect_user`` reaches every node over the control pub/sub
channel. Sums and what to write are worked out by the pure ``tidings.brokers.presence``;
the commands go through the ``Router``, each to the primary of its key's slot (on a
cluster the node keys and presence hashes live on different shards).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

from redis.exceptions import ResponseError

from tidings.brokers.base import BrokerHandler
from tidings.brokers.presence import (
    PresenceSync,
    decode_entry,
    encode_entry,
    live_entries,
    sum_channels,
    sum_presence,
)
from tidings.brokers.redis.codec import encode_control
from tidings.brokers.redis.link import Command, unavailable
from tidings.brokers.redis.router import Router
from tidings.brokers.redis.scripts import KeyLayout, key_slot
from tidings.errors import BrokerUnavailable

__all__ = ["Views"]

logger = logging.getLogger(__name__)

#: Seconds a presence sync waits after a write before the next round: a burst of
#: (un)subscriptions then makes one write, not one each, at little added lag.
_SYNC_DEBOUNCE = 0.05


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _slot(key: str | bytes) -> int:
    return key_slot(key.encode() if isinstance(key, str) else key)


class Views:
    """Presence, channel counts and control messages; see the module docstring.

    ``handler()`` gives the node's handler (None before start and after close);
    ``served()`` the channels whose streams this node keeps alive.
    """

    def __init__(
        self,
        router: Router,
        keys: KeyLayout,
        node_id: str,
        *,
        handler: Callable[[], BrokerHandler | None],
        served: Callable[[], Iterable[str]],
        pubsub_command: str,
        node_ttl_ms: int,
        presence_keep_ms: int,
        ttl_ms: int,
        sync_interval: float,
    ) -> None:
        self._router = router
        self._keys = keys
        self._node_id = node_id
        self._handler = handler
        self._served = served
        self._pubsub_command = pubsub_command
        self._node_ttl_ms = node_ttl_ms
        self._presence_keep_ms = presence_keep_ms
        self._ttl_ms = ttl_ms
        self._sync_interval = sync_interval
        self._synced = PresenceSync()
        self._wakeup = asyncio.Event()
        self.rewrite = False
        self.closing = False

    def changed(self) -> None:
        """Local subscriptions changed: write them soon."""
        self._wakeup.set()

    def rewrite_all(self) -> None:
        """Redis may have restarted empty: write presence and counts again now."""
        self.rewrite = True
        self._wakeup.set()

    async def _run(self, items: list[tuple[str | bytes, Command]], retry: bool = True) -> list[Any]:
        replies = await self._router.scatter([(_slot(k), c) for k, c in items], retry=retry)
        for reply in replies:
            if isinstance(reply, ResponseError):
                logger.warning("redis refused a command: %s", type(reply).__name__)
                raise unavailable(reply)
        return replies

    async def disconnect_user(self, user_id: str, reason: str) -> None:
        handler = self._handler()
        if handler is not None:
            try:
                handler.on_disconnect_user(user_id, reason)
            except Exception:
                # BrokerHandler's failing-handler contract: logged, the rest go on.
                logger.exception("on_disconnect_user failed")
        message = encode_control(self._node_id, user_id, reason)
        await self._run(
            [(self._keys.control, (self._pubsub_command, self._keys.control, message))], retry=False
        )

    async def publish_control(self, message: str) -> None:
        """Send one message to every node's control subscription (relay messages)."""
        await self._run(
            [(self._keys.control, (self._pubsub_command, self._keys.control, message))], retry=False
        )

    async def channels(self, prefix: str) -> dict[str, int]:
        (members,) = await self._run([(self._keys.nodes, ("SMEMBERS", self._keys.nodes))])
        others = sorted(n for n in map(_text, members) if n != self._node_id)
        values = await self._run(
            [(self._keys.node(n), ("GET", self._keys.node(n))) for n in others]
        )
        alive, dead = live_entries(others, values)
        if dead:
            with contextlib.suppress(BrokerUnavailable):
                await self._run([(self._keys.nodes, ("SREM", self._keys.nodes, *dead))])
        handler = self._handler()
        local = handler.local_channels() if handler is not None else {}
        return sum_channels([local, *map(decode_entry, alive)], prefix)

    async def presence(self, channel: str) -> dict[str, int]:
        key = self._keys.presence(channel)
        (flat,) = await self._run([(key, ("HGETALL", key))])
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        others = {_text(n): v for n, v in fields.items() if _text(n) != self._node_id}
        names = sorted(others)
        exists = await self._run(
            [(self._keys.node(n), ("EXISTS", self._keys.node(n))) for n in names]
        )
        alive, dead = live_entries(
            names, [others[n] if ok else None for n, ok in zip(names, exists, strict=True)]
        )
        if dead:
            with contextlib.suppress(BrokerUnavailable):
                await self._run([(key, ("HDEL", key, *dead))])
        handler = self._handler()
        local = handler.local_presence(channel) if handler is not None else {}
        return sum_presence([local, *map(decode_entry, alive)])

    async def sync_forever(self) -> None:
        """Keep this node's channel counts, presence and served streams fresh in Redis.

        Every round writes what changed (channels whose subscriber count changed); every
        tenth round compares the presence of every channel; the node key is rewritten
        before it expires, every presence field before its hash expires, and the keys of
        served streams before their history ttl runs out.
        """
        loop = asyncio.get_running_loop()
        due = {"node": -float("inf"), "presence": loop.time(), "touch": -float("inf")}
        every = {
            "node": self._node_ttl_ms / 3000,
            "presence": self._presence_keep_ms / 3000,
            "touch": self._ttl_ms / 3000,
        }
        rounds = 0
        while not self.closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._sync_interval):
                    await self._wakeup.wait()
            self._wakeup.clear()
            now = loop.time()
            rounds += 1
            needed = {name for name, last in due.items() if now - last >= every[name]}
            forced, self.rewrite = self.rewrite, False
            if forced:
                needed |= {"node", "presence", "touch"}
            try:
                await self._sync_once(
                    force_node="node" in needed,
                    recheck=rounds % 10 == 0,
                    rewrite="presence" in needed,
                    touch="touch" in needed,
                )
            except BrokerUnavailable as exc:
                logger.debug("presence sync failed: %s", exc)
                self.rewrite = self.rewrite or forced
                continue
            for name in needed:
                due[name] = now
            # Debounce: a burst of (un)subscriptions makes one write, not one each.
            await asyncio.sleep(min(_SYNC_DEBOUNCE, self._sync_interval))

    async def _sync_once(
        self, *, force_node: bool, recheck: bool, rewrite: bool, touch: bool
    ) -> None:
        handler = self._handler()
        if handler is None:
            return
        plan = self._synced.plan(
            handler.local_channels(),
            handler.local_presence,
            force_node=force_node,
            recheck=recheck,
            rewrite=rewrite,
        )
        if plan.empty and not touch:
            return
        items: list[tuple[str | bytes, Command]] = []
        if plan.write_node:
            node_key = self._keys.node(self._node_id)
            items.append(
                (node_key, ("SET", node_key, encode_entry(plan.counts), "PX", self._node_ttl_ms))
            )
            items.append((self._keys.nodes, ("SADD", self._keys.nodes, self._node_id)))
        for name, users in plan.presence.items():
            key = self._keys.presence(name)
            if users:
                items.append((key, ("HSET", key, self._node_id, encode_entry(users))))
                items.append((key, ("PEXPIRE", key, self._presence_keep_ms)))
            else:
                items.append((key, ("HDEL", key, self._node_id)))
        if touch:
            # Served streams keep their epoch while any node has subscribers.
            for name in self._served():
                for key in (self._keys.meta(name), self._keys.stream(name)):
                    items.append((key, ("PEXPIRE", key, self._ttl_ms)))
        await self._run(items)
        self._synced.written(plan)

    async def remove_node_entries(self) -> None:
        items: list[tuple[str | bytes, Command]] = [
            (self._keys.node(self._node_id), ("DEL", self._keys.node(self._node_id))),
            (self._keys.nodes, ("SREM", self._keys.nodes, self._node_id)),
        ]
        for name in self._synced.presence:
            key = self._keys.presence(name)
            items.append((key, ("HDEL", key, self._node_id)))
        await self._run(items, retry=False)
