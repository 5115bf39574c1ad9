"""Commands to the primary that owns their slot, with redirections followed.

``Router.run(slot, commands)`` sends commands of one slot to its primary's ``Link`` and
follows what a cluster or a failover answers, until ``timeout`` has passed since the call:

* ``MOVED``: the slot has a new owner; the map is updated (and read again in the
  background) and the redirected commands go there.
* ``ASK``: the slot is migrating; the redirected commands go to the target once, each
  after ``ASKING``.
* ``TRYAGAIN``, ``CLUSTERDOWN``, ``LOADING``, ``MASTERDOWN``: retried after a short delay.
* ``READONLY``: the address is no longer a primary (a failover); the topology is read
  again and the commands go to the new primary.
* ``NOSCRIPT``: the ``EVALSHA`` is sent again as ``EVAL`` with the script's text.

None of these ran the command, so following them is always safe. A failed connection is
different: the commands may have run. ``run`` raises ``BrokerUnavailable`` then, unless
``retry`` is set (for reads and idempotent writes), which reads the topology again and
retries until the deadline. Reply errors other than those above are returned in place.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    ReadOnlyError,
    RedisError,
    TryAgainError,
)

from tidings.brokers.redis.link import Address, Command, Link, parse_role, unavailable
from tidings.brokers.redis.topology import Topology
from tidings.errors import BrokerUnavailable

__all__ = ["Router"]

logger = logging.getLogger(__name__)

_RETRY_DELAY = (0.01, 0.2)
_WAIT = (TryAgainError, ClusterDownError, BusyLoadingError)


def _redirect(reply: Any) -> bool:
    return isinstance(reply, (AskError, ReadOnlyError, NoScriptError, *_WAIT))


class Router:
    """Links to the primaries of a ``Topology``, and redirection handling."""

    def __init__(
        self,
        topology: Topology,
        opener: Callable[[Address], Any],
        *,
        timeout: float,
        scripts: dict[str, str],
    ) -> None:
        self.topology = topology
        self._opener = opener
        self._timeout = timeout
        self._scripts = scripts  # sha -> text, for NOSCRIPT
        self._links: dict[Address, Link] = {}
        self._closed = False
        self._background: set[asyncio.Task[Any]] = set()

    def link(self, address: Address) -> Link:
        """The link to ``address`` (made on first use)."""
        link = self._links.get(address)
        if link is None:
            link = self._links[address] = Link(
                address, self._opener, timeout=self._timeout, on_broken=self._broken
            )
        return link

    def links(self) -> list[Link]:
        return list(self._links.values())

    async def refresh_roles(self) -> None:
        """Ask every connected link's server for its ``ROLE`` now, so that replicas that
        joined (or left) since a link connected are counted. Failures are left to the
        links (a broken connection reconnects and asks again)."""
        links = [link for link in self._links.values() if link.connected]
        replies = await asyncio.gather(
            *(link.call([("ROLE",)]) for link in links), return_exceptions=True
        )
        for link, reply in zip(links, replies, strict=True):
            if isinstance(reply, list) and reply and not isinstance(reply[0], BaseException):
                link.note_role(parse_role(reply[0]))

    async def close(self) -> None:
        self._closed = True
        for task in self._background:
            task.cancel()
        for link in list(self._links.values()):
            await link.close()
        self._links.clear()

    async def run(
        self,
        slot: int,
        commands: Sequence[Command],
        *,
        retry: bool = False,
        suffix: Command | None = None,
    ) -> list[Any]:
        """The replies to ``commands`` (all of one slot); see the module docstring.

        ``suffix`` (e.g. ``WAIT``) is sent after the commands in every attempt, on the same
        connection; its reply comes last, after those of ``commands``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        replies: list[Any] = [None] * len(commands)
        last: Any = None
        todo = list(range(len(commands)))
        asking: Address | None = None
        as_eval: set[int] = set()
        attempt = 0
        while True:
            if not self._known(slot):
                await self._refresh(None, deadline)
            address = asking or self.topology.address(slot)
            batch = [self._eval(commands[i]) if i in as_eval else commands[i] for i in todo]
            seen = self.topology.version
            sent = self._asking(batch) if asking else batch
            if suffix is not None:
                sent = [*sent, suffix]
            try:
                got = await self.link(address).call(sent)
            except BrokerUnavailable:
                if not retry or loop.time() >= deadline:
                    raise
                attempt += 1
                await self._refresh(seen, deadline)
                await self._pause(attempt, deadline)
                asking = None
                continue
            if suffix is not None:
                last = got.pop()
            if asking is not None:
                got = got[1::2]  # drop the ASKING replies
                asking = None
            again: list[int] = []
            wait = refresh = False
            for index, reply in zip(todo, got, strict=True):
                if not _redirect(reply):
                    replies[index] = reply
                    continue
                again.append(index)
                if isinstance(reply, MovedError):
                    self.topology.moved(reply.slot_id, reply.node_addr)
                    self._refresh_later()
                elif isinstance(reply, AskError):
                    asking = reply.node_addr
                elif isinstance(reply, ReadOnlyError):
                    refresh = True
                elif isinstance(reply, NoScriptError):
                    as_eval.add(index)
                elif isinstance(reply, _WAIT):
                    wait = True
            if not again:
                if suffix is not None:
                    replies.append(last)
                return replies
            if loop.time() >= deadline:
                raise unavailable(type(got[todo.index(again[0])]).__name__)
            todo = again
            if refresh:
                await self._refresh(seen, deadline)
            if wait or refresh:
                attempt += 1
                await self._pause(attempt, deadline)

    async def scatter(
        self, items: Sequence[tuple[int, Command]], *, retry: bool = False
    ) -> list[Any]:
        """Replies to commands of many slots, in the order of ``items``: one ``run`` per
        slot, all made in one tick, so that each primary gets them as one write."""
        if not items:
            return []
        by_slot: dict[int, list[int]] = {}
        for index, (slot, _) in enumerate(items):
            by_slot.setdefault(slot, []).append(index)
        results = await asyncio.gather(
            *(
                self.run(slot, [items[i][1] for i in members], retry=retry)
                for slot, members in by_slot.items()
            )
        )
        replies: list[Any] = [None] * len(items)
        for members, got in zip(by_slot.values(), results, strict=True):
            for i, reply in zip(members, got, strict=True):
                replies[i] = reply
        return replies

    async def run_many(
        self, groups: Sequence[tuple[int, Sequence[Command]]], *, suffix: Command | None = None
    ) -> list[list[Any] | BrokerUnavailable]:
        """``run`` (without ``retry``) for each (slot, commands) group, cheaper: the groups of
        one primary are one call, awaited without a task per group. A group whose call
        failed gets the ``BrokerUnavailable`` in place of its replies; one with redirected
        commands has them followed by ``run``.

        ``suffix`` (e.g. ``WAIT``) ends every call, once per primary rather than once per
        group; each group's replies are then followed by one more item: the list of the
        suffix's replies from every call that carried its commands (two when some were
        redirected and sent again)."""
        by_address: dict[Address, list[int]] = {}
        for index, (slot, _) in enumerate(groups):
            by_address.setdefault(self.topology.address(slot), []).append(index)
        tail = [] if suffix is None else [suffix]
        calls = [
            (
                members,
                self.link(address).call(
                    [command for i in members for command in groups[i][1]] + tail
                ),
            )
            for address, members in by_address.items()
        ]
        out: list[list[Any] | BrokerUnavailable] = [[] for _ in groups]
        suffixes: list[list[Any]] = [[] for _ in groups]
        follow: list[tuple[int, list[int]]] = []
        for members, call in calls:
            try:
                got = await call
            except BrokerUnavailable as exc:
                for i in members:
                    out[i] = exc
                continue
            last = got.pop() if suffix is not None else None
            position = 0
            for i in members:
                count = len(groups[i][1])
                replies = got[position : position + count]
                position += count
                out[i] = replies
                suffixes[i].append(last)
                redirected = [j for j, reply in enumerate(replies) if _redirect(reply)]
                for j in redirected:
                    if isinstance(replies[j], MovedError):
                        self.topology.moved(replies[j].slot_id, replies[j].node_addr)
                if redirected:
                    follow.append((i, redirected))
        for i, redirected in follow:
            slot, commands = groups[i]
            try:
                again = await self.run(slot, [commands[j] for j in redirected], suffix=suffix)
            except BrokerUnavailable as exc:
                out[i] = exc
                continue
            if suffix is not None:
                suffixes[i].append(again.pop())
            merged = out[i]
            if isinstance(merged, list):
                for j, reply in zip(redirected, again, strict=True):
                    merged[j] = reply
        if suffix is not None:
            for result, got_suffix in zip(out, suffixes, strict=True):
                if isinstance(result, list):
                    result.append(got_suffix)
        return out

    # -- helpers ---------------------------------------------------------------------

    def _known(self, slot: int) -> bool:
        return self.topology.address(slot) != ("", 0)

    @staticmethod
    def _asking(batch: list[Command]) -> list[Command]:
        out: list[Command] = []
        for command in batch:
            out += [("ASKING",), command]
        return out

    def _eval(self, command: Command) -> Command:
        """``EVALSHA sha ...`` as ``EVAL text ...`` (after NOSCRIPT)."""
        return ("EVAL", self._scripts[command[1]], *command[2:])

    async def _refresh(self, seen: int | None, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(max(0.0, deadline - loop.time())):
                await self.topology.refresh(seen)
        except (RedisError, OSError, TimeoutError) as exc:
            logger.debug("reading the topology failed: %s", type(exc).__name__)

    def _refresh_later(self) -> None:
        if self._closed or self._background:
            return
        task = asyncio.get_running_loop().create_task(self._refresh_quietly())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _refresh_quietly(self) -> None:
        try:
            await self.topology.refresh()
        except (RedisError, OSError, TimeoutError) as exc:
            logger.debug("reading the topology failed: %s", type(exc).__name__)

    def _broken(self, link: Link, error: BaseException) -> None:
        # A primary that went away may have failed over: look again soon.
        self._refresh_later()

    @staticmethod
    async def _pause(attempt: int, deadline: float) -> None:
        low, high = _RETRY_DELAY
        delay = random.uniform(low, min(high, low * 2 ** min(attempt, 10)))  # noqa: S311
        left = deadline - asyncio.get_running_loop().time()
        if left > 0:
            await asyncio.sleep(min(delay, left))
