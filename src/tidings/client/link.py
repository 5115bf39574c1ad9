"""One open WebSocket of the client: the I/O half of a connection.

A ``Link`` reads frames until the connection ends (with the session's receive timeout, so
a silent connection is declared dead), answers WebSocket pings, sends commands and hands
their replies to whoever awaits them, and runs the connection's own tasks: the paced
resubscription after ``connected``, retries, the unsubscribe-and-recover fallback and the
token refresh. What each frame means, and what to send, is decided by the
``tidings.client.session.Session``; effects that concern subscriptions and the client's
state go to the ``on_effect`` callback (the ``Client``). ``lost()`` ends it all: tasks are
cancelled and waiting commands fail with ``NotConnected``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp

from tidings.client.effects import (
    AppEffect,
    ChannelState,
    Effect,
    Failed,
    Outcome,
    RecoverFresh,
    Reply,
    Resubscribe,
    RetrySubscribe,
    StartRefresh,
    SubscribeNow,
)
from tidings.client.errors import AuthenticationFailed, CommandError, NotConnected
from tidings.client.session import Session
from tidings.client.tracker import ProtocolViolation
from tidings.protocol import dumps

__all__ = ["Link", "describe", "handshake"]

logger = logging.getLogger("tidings.client")


def describe(exc: BaseException) -> str:
    """A short description of a connection error."""
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        return f"handshake refused (HTTP {exc.status})"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def handshake(
    url: str, token: str, headers: Mapping[str, str], *, token_in_query: bool
) -> tuple[str, dict[str, str]]:
    """The URL and headers to open a connection with ``token``: an ``Authorization:
    Bearer`` header, or the ``token`` query parameter."""
    headers = dict(headers)
    if not token_in_query:
        headers["Authorization"] = f"Bearer {token}"
        return url, headers
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "token"]
    query.append(("token", token))
    return urlunsplit(parts._replace(query=urlencode(query))), headers


class Link:
    """One open WebSocket; see the module docstring."""

    def __init__(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        session: Session,
        *,
        on_effect: Callable[[AppEffect], None],
        command_timeout: float,
        sleep: Callable[[float], Awaitable[None]],
    ) -> None:
        self.ws = ws
        self._session = session
        self._on_effect = on_effect
        self._command_timeout = command_timeout
        self._sleep = sleep
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- reading ---------------------------------------------------------------------

    async def serve(self) -> Outcome:
        """Read frames until the connection ends; return how it ended."""
        ws, session = self.ws, self._session
        session.connection_opened()
        while True:
            timeout = session.receive_timeout()
            try:
                msg = await ws.receive(timeout=timeout)
            except TimeoutError:
                return session.outcome(
                    None, f"no frame received for {timeout:g} s; connection presumed dead"
                )
            kind = msg.type
            if kind is aiohttp.WSMsgType.TEXT:
                try:
                    self._apply(session.receive(msg.data))
                except ProtocolViolation as exc:
                    logger.warning("dropping the connection: %s", exc)
                    return session.outcome(None, f"protocol violation: {exc}")
            elif kind is aiohttp.WSMsgType.PING:
                with contextlib.suppress(Exception):
                    await ws.pong(msg.data)
            elif kind in (aiohttp.WSMsgType.PONG, aiohttp.WSMsgType.BINARY):
                continue
            elif kind is aiohttp.WSMsgType.CLOSE:
                code = msg.data if isinstance(msg.data, int) else None
                reason = msg.extra if isinstance(msg.extra, str) else ""
                return session.outcome(code, reason)
            else:
                # A TCP close without a close frame (aiohttp then reports 1000) is abnormal.
                detail = f": {msg.data}" if kind is aiohttp.WSMsgType.ERROR else ""
                return session.outcome(None, f"connection lost{detail}")

    def _apply(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Reply):
                future = self._pending.pop(effect.id, None)
                if future is not None and not future.done():
                    future.set_result(effect.data)
            elif isinstance(effect, Failed):
                self._fail(effect)
            elif isinstance(effect, Resubscribe):
                self._spawn(self._resubscribe(effect), "tidings-resubscribe")
            elif isinstance(effect, SubscribeNow):
                self._spawn(self.send_subscribe(effect.state, effect.gen), "tidings-resubscribe")
            elif isinstance(effect, RetrySubscribe):
                self._spawn(self._retry_subscribe(effect), "tidings-retry")
            elif isinstance(effect, RecoverFresh):
                self._spawn(self._recover_fresh(effect), "tidings-recover")
            elif isinstance(effect, StartRefresh):
                self._spawn(self._refresh_loop(), "tidings-refresh")
            else:
                self._on_effect(effect)

    def _fail(self, failed: Failed) -> None:
        future = self._pending.pop(failed.id, None)
        if future is not None and not future.done():
            future.set_exception(CommandError(failed.code, failed.message))
            future.exception()
        else:
            self._session.server_error(failed.code, failed.message)

    # -- the end ---------------------------------------------------------------------

    def lost(self) -> None:
        """The connection is gone: cancel its tasks, fail the commands awaiting replies."""
        self._session.connection_lost()
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(NotConnected("the connection was lost before the reply"))
                future.exception()
        self._pending.clear()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if not isinstance(exc, NotConnected):
                logger.error("client task %s failed", task.get_name(), exc_info=exc)

    # -- sending ---------------------------------------------------------------------

    async def send(self, message: dict[str, Any]) -> None:
        """Send one message; raise ``NotConnected`` when the connection cannot take it."""
        try:
            await self.ws.send_str(dumps(message).decode())
        except (ConnectionError, aiohttp.ClientError, RuntimeError) as exc:
            raise NotConnected(f"cannot send: {describe(exc)}") from exc

    async def command(self, kind: str, data: dict[str, Any]) -> dict[str, Any]:
        """Send a command and return the data of its reply; raise ``CommandError`` for an
        ``error`` reply, ``NotConnected``, or ``TimeoutError`` after the command timeout."""
        command_id, message = self._session.command(kind, data)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[command_id] = future
        try:
            await self.send(message)
            async with asyncio.timeout(self._command_timeout):
                return await future
        finally:
            self._pending.pop(command_id, None)

    async def send_subscribe(self, state: ChannelState, gen: int) -> None:
        """Send the ``subscribe`` for ``state``, unless connection ``gen`` is gone."""
        message = self._session.subscribe_message(state, gen)
        if message is not None:
            await self.send(message)

    async def _resubscribe(self, plan: Resubscribe) -> None:
        session = self._session
        sent = 0
        for message in plan.unsubscribes:
            await self.send(message)
            sent += 1
        for state in plan.channels:
            if not session.needs_resubscribe(state, plan.gen):
                continue
            pause = session.pacing_delay(sent)
            if pause is not None:
                await asyncio.sleep(pause)
            await self.send_subscribe(state, plan.gen)
            sent += 1

    async def _retry_subscribe(self, retry: RetrySubscribe) -> None:
        await self._sleep(retry.delay)
        if self._session.is_current(retry.state):
            await self.send_subscribe(retry.state, retry.gen)

    async def _recover_fresh(self, recover: RecoverFresh) -> None:
        _, unsubscribe = self._session.command("unsubscribe", {"channel": recover.state.channel})
        await self.send(unsubscribe)
        await self.send_subscribe(recover.state, recover.gen)

    async def _refresh_loop(self) -> None:
        """Replace the token before it expires, with the ``refresh`` command."""
        session = self._session
        while (delay := session.refresh_delay()) is not None:
            await asyncio.sleep(delay)
            expires = session.tokens.expires_at
            try:
                token = await session.tokens.fetch()
            except AuthenticationFailed as exc:
                logger.warning("token refresh: %s; retrying", exc.reason)
                await asyncio.sleep(session.refresh_retry_delay(expires))
                continue
            try:
                reply = await self.command("refresh", {"token": token})
            except CommandError as exc:
                logger.warning("the server refused the refreshed token: %s", exc.message)
                return  # it closes with 4401; the reconnect asks the provider again
            except TimeoutError:
                logger.warning("no reply to refresh; trying again")
                continue
            if not session.refreshed(token, reply):
                logger.warning(
                    "the token provider returned a token that expires no later "
                    "than the current one; not refreshing again on this connection"
                )
                return
