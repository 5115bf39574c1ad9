"""The client: one WebSocket at a time, reconnecting, resubscribing and recovering.

A single task (``Client._run``) owns the connection loop: connect, read frames until the
connection ends, decide from the close code (``tidings.client.policy``), wait a backoff
delay (``tidings.client.backoff``), repeat. Per-channel ordering and dedupe live in
``tidings.client.tracker``; the application-facing queues in
``tidings.client.subscription``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypedDict, Unpack
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp

from tidings.client.backoff import Backoff
from tidings.client.errors import (
    AuthenticationFailed,
    ClientError,
    CommandError,
    ConnectionClosed,
    NotConnected,
    SubscriptionError,
)
from tidings.client.models import Event, State, StateChange
from tidings.client.policy import Action, decide
from tidings.client.subscription import ErrorCallback, EventCallback, GapCallback, Subscription
from tidings.client.tokens import TokenProvider, TokenSource
from tidings.client.tracker import ProtocolViolation
from tidings.protocol import dumps, is_valid_channel, loads

__all__ = ["Client", "ClientOptions", "Connecting", "StateListener", "TokenProvider", "connect"]

logger = logging.getLogger("tidings.client")

StateListener = Callable[[StateChange], None]

#: Recovery point for an automatically subscribed channel (the personal channel) seen for
#: the first time: no epoch matches it, so the server answers ``recovered: false`` with the
#: offset at which this connection's subscription went live: the baseline of its events.
_FIRST_RECOVER = {"offset": 0, "epoch": ""}

#: Error codes after which a failed subscription is given up instead of retried.
_FATAL_SUBSCRIBE_ERRORS = frozenset({"unauthorized", "invalid_request"})


class ClientOptions(TypedDict, total=False):
    """Keyword options of ``connect`` and ``Client`` (see ``Client``)."""

    token: str | None
    token_provider: TokenProvider | None
    backoff: Backoff | None
    liveness_timeout: float
    connect_timeout: float
    close_timeout: float
    command_timeout: float
    refresh_margin: float
    queue_size: int
    token_in_query: bool
    headers: Mapping[str, str] | None
    on_state: StateListener | None
    session: aiohttp.ClientSession | None
    resubscribe_burst: int
    resubscribe_rate: float
    max_auth_failures: int
    clock: Callable[[], float]
    wall_clock: Callable[[], float]
    sleep: Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class _Outcome:
    """How one connection attempt ended."""

    code: int | None
    reason: str
    welcomed: bool


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        return f"handshake refused (HTTP {exc.status})"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


class Client:
    """A Tidings connection that reconnects and recovers on its own.

    Options (all keyword):

    * ``token`` / ``token_provider``: a JWT, and/or a callable (sync or async) returning a
      fresh one. With a provider the client refreshes the token before it expires and
      asks for a new one after a 4401 close.
    * ``backoff``: a ``Backoff`` (defaults: 0.5 s initial, 20 s cap, reset after 10 s up).
    * ``liveness_timeout`` (10 s): a connection with no frame for the server's
      ``heartbeat_interval`` plus this is treated as dead and replaced.
    * ``connect_timeout`` (10 s): limit for the handshake and the ``connected`` message.
    * ``close_timeout`` (5 s), ``command_timeout`` (10 s, ``ping``/``unsubscribe``/refresh).
    * ``refresh_margin`` (30 s): refresh this long before expiry (at most half the
      remaining lifetime).
    * ``queue_size`` (1000): default bound of each subscription's queue.
    * ``token_in_query`` (False): send the token as ``?token=`` instead of an
      ``Authorization: Bearer`` header; ``headers``: extra handshake headers.
    * ``on_state``: a listener for ``StateChange``; ``session``: an aiohttp session to use.
    * ``resubscribe_burst`` (50) / ``resubscribe_rate`` (25/s): pacing of the subscribe
      commands sent after a reconnect, to stay under the server's command rate limit.
    * ``max_auth_failures`` (3): consecutive rejected tokens (4401 before ``connected``)
      tolerated from the provider before giving up.
    * ``clock``/``wall_clock``/``sleep``: injectable for tests (monotonic seconds, epoch
      seconds, the backoff sleep).
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        token_provider: TokenProvider | None = None,
        backoff: Backoff | None = None,
        liveness_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        close_timeout: float = 5.0,
        command_timeout: float = 10.0,
        refresh_margin: float = 30.0,
        queue_size: int = 1000,
        token_in_query: bool = False,
        headers: Mapping[str, str] | None = None,
        on_state: StateListener | None = None,
        session: aiohttp.ClientSession | None = None,
        resubscribe_burst: int = 50,
        resubscribe_rate: float = 25.0,
        max_auth_failures: int = 3,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if queue_size < 1 or resubscribe_burst < 1 or resubscribe_rate <= 0:
            raise ValueError("queue_size, resubscribe_burst and resubscribe_rate must be > 0")
        self.url = url
        self._tokens = TokenSource(token, token_provider, refresh_margin=refresh_margin,
                                   wall_clock=wall_clock)
        self._backoff = backoff or Backoff()
        self._liveness_timeout = liveness_timeout
        self._connect_timeout = connect_timeout
        self._close_timeout = close_timeout
        self._command_timeout = command_timeout
        self._queue_size = queue_size
        self._token_in_query = token_in_query
        self._headers = dict(headers or {})
        self._listeners: list[StateListener] = [on_state] if on_state is not None else []
        self._http = session
        self._own_http = session is None
        self._burst = resubscribe_burst
        self._rate = resubscribe_rate
        self._max_auth_failures = max_auth_failures
        self._clock = clock
        self._wall = wall_clock
        self._sleep = sleep

        self._state = State.DISCONNECTED
        self._subs: dict[str, Subscription] = {}
        self._auto: set[str] = set()
        self._unwanted: set[str] = set()
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._gen = 0
        self._connected = False
        self._welcomed = False
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._sub_ids: dict[str, Subscription] = {}
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._last_unauthorized = ""
        self._run_task: asyncio.Task[None] | None = None
        self._first: asyncio.Future[None] | None = None
        self._stopped: asyncio.Event | None = None
        self._closing = False
        self._error: ClientError | None = None

        #: From the last ``connected`` message.
        self.connection_id: str | None = None
        self.user_id: str | None = None
        self.heartbeat_interval: float | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, *, wait: bool = True) -> Client:
        """Start connecting; with ``wait`` return once the first connection is up.

        Raises ``ConnectionClosed``/``AuthenticationFailed`` when the client stops before
        that. Transient failures are retried with backoff, so this may wait long: wrap it
        in ``asyncio.timeout`` to bound it.
        """
        if self._run_task is not None:
            raise RuntimeError("the client was already started")
        loop = asyncio.get_running_loop()
        if self._http is None:
            self._http = aiohttp.ClientSession()
        self._first = loop.create_future()
        self._stopped = asyncio.Event()
        self._run_task = asyncio.create_task(self._run(), name="tidings-client")
        if wait:
            try:
                await asyncio.shield(self._first)
            except BaseException:
                await self.close()
                raise
        return self

    async def close(self) -> None:
        """Close the connection (code 1000) and stop; subscriptions end. Idempotent."""
        already = self._closing
        self._closing = True
        subs = list(self._subs.values())
        ws = self._ws
        if ws is not None and not ws.closed:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._close_timeout):
                    await ws.close(code=1000, message=b"client closed")
        task = self._run_task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if not already and self._error is None:
            self._finish(None)
            self._emit(StateChange(State.CLOSED, 1000, "closed by the application"))
            self._settle_first(ConnectionClosed(None, "closed by the application"))
        for sub in subs:
            await sub.stop_callbacks()
        if self._own_http and self._http is not None:
            await self._http.close()
            self._http = None
        if self._stopped is not None:
            self._stopped.set()

    async def wait_closed(self) -> None:
        """Wait until the client stops; raise the reason unless the application closed it."""
        if self._stopped is None:
            raise RuntimeError("the client was not started")
        await self._stopped.wait()
        if self._error is not None:
            raise self._error

    async def __aenter__(self) -> Client:
        return await self.start()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    # -- observation -----------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def error(self) -> ClientError | None:
        """Why the client stopped, when it stopped on its own."""
        return self._error

    @property
    def expires_at(self) -> float | None:
        """Expiry of the current token (epoch seconds), as the server reported it."""
        return self._tokens.expires_at

    @property
    def automatic_channels(self) -> frozenset[str]:
        """Channels the server subscribed automatically (the personal channel)."""
        return frozenset(self._auto)

    @property
    def subscriptions(self) -> dict[str, Subscription]:
        return dict(self._subs)

    def add_state_listener(self, listener: StateListener) -> Callable[[], None]:
        """Call ``listener`` on every state change; returns a function that removes it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    # -- commands --------------------------------------------------------------------

    async def subscribe(
        self,
        channel: str,
        *,
        on_event: EventCallback | None = None,
        on_gap: GapCallback | None = None,
        on_error: ErrorCallback | None = None,
        queue_size: int | None = None,
    ) -> Subscription:
        """Subscribe and wait for the server's confirmation; return the subscription.

        Iterate it (``async for item in sub``) or pass ``on_event`` together with the
        required ``on_gap`` (and optionally ``on_error``). Subscribing again to a channel
        returns the same subscription. While disconnected, this waits for the next
        connection. Raises ``SubscriptionError`` when the server refuses; if the wait is
        cancelled the subscription stays requested (``unsubscribe`` to drop it).
        """
        if not is_valid_channel(channel):
            raise ValueError(f"invalid channel name: {channel!r}")
        if (on_event is None) != (on_gap is None):
            raise TypeError("on_event and on_gap go together: a Gap means events were missed "
                            "and must be handled")
        self._check_open()
        self._unwanted.discard(channel)
        sub = self._subs.get(channel)
        if sub is None:
            sub = Subscription(self, channel, maxsize=queue_size or self._queue_size)
            self._subs[channel] = sub
            ws = self._ws
            if self._connected and ws is not None:
                with contextlib.suppress(NotConnected):
                    await self._send_subscribe(ws, self._gen, sub)
        await sub.wait_confirmed()
        if on_event is not None and on_gap is not None:
            sub.start_callbacks(on_event, on_gap, on_error)
        return sub

    async def unsubscribe(self, channel: str) -> None:
        """Stop receiving ``channel``; its subscription ends after the queued items."""
        sub = self._subs.pop(channel, None)
        if channel in self._auto:
            self._unwanted.add(channel)
        if sub is not None:
            sub.finish(None)
        ws = self._ws
        if self._connected and ws is not None:
            with contextlib.suppress(NotConnected, CommandError, TimeoutError):
                await self._command(ws, "unsubscribe", {"channel": channel})

    async def ping(self) -> float:
        """Send the ``ping`` command; return the round trip time in seconds.

        Raises ``NotConnected`` when there is no connection or it is lost meanwhile,
        ``TimeoutError`` after ``command_timeout``.
        """
        ws = self._ws
        if not self._connected or ws is None:
            self._check_open()
            raise NotConnected("not connected")
        started = self._clock()
        await self._command(ws, "ping", {})
        return self._clock() - started

    # -- the connection loop ---------------------------------------------------------

    async def _run(self) -> None:
        auth_failures = 0
        try:
            while not self._closing:
                self._emit(StateChange(State.CONNECTING))
                outcome = await self._attempt()
                if self._closing:
                    return
                self._backoff.disconnected(self._clock())
                decision = decide(outcome.code, has_token_provider=self._tokens.has_provider)
                if decision.action is Action.STOP:
                    error_type = AuthenticationFailed if decision.auth else ConnectionClosed
                    why = f"{decision.reason}: {outcome.reason}" if outcome.reason \
                        else decision.reason
                    self._stop(error_type(outcome.code, why))
                    return
                if decision.action is Action.NEW_TOKEN:
                    auth_failures = 1 if outcome.welcomed else auth_failures + 1
                    if auth_failures > self._max_auth_failures:
                        self._stop(AuthenticationFailed(outcome.code, (
                            f"the server rejected {auth_failures} tokens from the token "
                            f"provider in a row: {outcome.reason}")))
                        return
                    self._tokens.rejected()
                elif outcome.welcomed:
                    auth_failures = 0
                delay = self._backoff.next_delay(slow=decision.action is Action.RECONNECT_SLOWLY)
                self._emit(StateChange(State.DISCONNECTED, outcome.code, outcome.reason,
                                       retry_in=delay))
                await self._sleep(delay)
        except AuthenticationFailed as exc:
            self._stop(exc)
        except Exception as exc:
            logger.exception("tidings client failed")
            self._stop(ConnectionClosed(None, f"client failure: {exc!r}"))

    async def _attempt(self) -> _Outcome:
        token = await self._tokens.for_connection()
        url, headers = self._handshake(token)
        if self._http is None:  # pragma: no cover - set by start()
            raise RuntimeError("the client was not started")
        try:
            async with asyncio.timeout(self._connect_timeout):
                ws = await self._http.ws_connect(
                    url, headers=headers, autoping=False, autoclose=True,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None,
                                                    ws_close=self._close_timeout))
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return _Outcome(None, f"cannot connect: {_describe(exc)}", False)
        try:
            return await self._serve(ws)
        finally:
            self._connection_lost()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._close_timeout):
                    await ws.close()

    def _handshake(self, token: str) -> tuple[str, dict[str, str]]:
        headers = dict(self._headers)
        if not self._token_in_query:
            headers["Authorization"] = f"Bearer {token}"
            return self.url, headers
        parts = urlsplit(self.url)
        query = [(k, v) for k, v in parse_qsl(parts.query) if k != "token"]
        query.append(("token", token))
        return urlunsplit(parts._replace(query=urlencode(query))), headers

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse) -> _Outcome:
        self._ws = ws
        self._welcomed = False
        self._last_unauthorized = ""
        while True:
            timeout = self._connect_timeout
            if self._welcomed:
                timeout = (self.heartbeat_interval or 0.0) + self._liveness_timeout
            try:
                msg = await ws.receive(timeout=timeout)
            except TimeoutError:
                return _Outcome(None, f"no frame received for {timeout:g} s; connection "
                                      "presumed dead", self._welcomed)
            kind = msg.type
            if kind is aiohttp.WSMsgType.TEXT:
                try:
                    self._on_text(ws, msg.data)
                except ProtocolViolation as exc:
                    logger.warning("dropping the connection: %s", exc)
                    return _Outcome(None, f"protocol violation: {exc}", self._welcomed)
            elif kind is aiohttp.WSMsgType.PING:
                with contextlib.suppress(Exception):
                    await ws.pong(msg.data)
            elif kind in (aiohttp.WSMsgType.PONG, aiohttp.WSMsgType.BINARY):
                continue
            elif kind is aiohttp.WSMsgType.CLOSE:
                code = msg.data if isinstance(msg.data, int) else None
                reason = msg.extra if isinstance(msg.extra, str) else ""
                if code == 4401 and self._last_unauthorized:
                    reason = self._last_unauthorized
                return _Outcome(code, reason, self._welcomed)
            else:
                # A TCP close without a close frame (aiohttp then reports 1000) is abnormal.
                detail = f": {msg.data}" if kind is aiohttp.WSMsgType.ERROR else ""
                return _Outcome(None, f"connection lost{detail}", self._welcomed)

    def _connection_lost(self) -> None:
        self._connected = False
        self._ws = None
        for task in self._conn_tasks:
            task.cancel()
        self._conn_tasks.clear()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(NotConnected("the connection was lost before the reply"))
                future.exception()
        self._pending.clear()
        self._sub_ids.clear()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._conn_tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._conn_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if not isinstance(exc, NotConnected):
                logger.error("client task %s failed", task.get_name(), exc_info=exc)

    # -- inbound messages ------------------------------------------------------------

    def _on_text(self, ws: aiohttp.ClientWebSocketResponse, raw: str) -> None:
        try:
            message = loads(raw)
        except Exception:
            logger.warning("ignoring a frame that is not JSON")
            return
        if not isinstance(message, dict):
            return
        kind = message.get("type")
        data = message.get("data")
        data = data if isinstance(data, dict) else {}
        reply_id = message.get("id") if isinstance(message.get("id"), str) else None
        if kind == "connected":
            self._on_connected(ws, data)
        elif kind == "subscribed":
            self._on_subscribed(ws, reply_id, data)
        elif kind == "unsubscribed":
            self._on_unsubscribed(ws, reply_id, data)
        elif kind in ("pong", "refreshed"):
            future = self._pending.pop(reply_id, None) if reply_id else None
            if future is not None and not future.done():
                future.set_result(data)
        elif kind == "error":
            self._on_error(ws, reply_id, data)
        elif "channel" in message and "offset" in message:
            self._on_event(message)

    def _on_connected(self, ws: aiohttp.ClientWebSocketResponse, data: dict[str, Any]) -> None:
        self._gen += 1
        gen = self._gen
        self._welcomed = self._connected = True
        self.connection_id = data.get("connection_id")
        self.user_id = data.get("user_id")
        interval = data.get("heartbeat_interval")
        self.heartbeat_interval = float(interval) if isinstance(interval, int | float) else None
        self._tokens.accepted(data.get("expires_at"))
        channels = data.get("channels")
        self._auto = {c for c in channels if isinstance(c, str)} if isinstance(
            channels, list) else set()
        self._backoff.connected(self._clock())
        for channel in sorted(self._auto - self._unwanted):
            sub = self._subs.get(channel)
            if sub is None:
                sub = self._subs[channel] = Subscription(self, channel,
                                                         maxsize=self._queue_size)
            if sub.automatic and sub.tracker.epoch is None:
                sub.tracker.baseline_lost = True  # live before, but never got a baseline
            sub.automatic = True
        # Before any event is read: hold what arrives until each channel's reply.
        for sub in self._subs.values():
            sub.tracker.begin()
        self._spawn(self._resubscribe_all(ws, gen, list(self._subs.values()),
                                          sorted(self._auto & self._unwanted)),
                    "tidings-resubscribe")
        if self._tokens.has_provider:
            self._spawn(self._refresh_loop(ws), "tidings-refresh")
        self._emit(StateChange(State.CONNECTED))
        self._settle_first(None)

    def _on_subscribed(self, ws: aiohttp.ClientWebSocketResponse, reply_id: str | None,
                       data: dict[str, Any]) -> None:
        sub = self._sub_ids.pop(reply_id, None) if reply_id else None
        if sub is None or self._subs.get(sub.channel) is not sub or sub.pending_id != reply_id:
            return
        offset, epoch, recovered = data.get("offset"), data.get("epoch"), data.get("recovered")
        if type(offset) is not int or not isinstance(epoch, str) or not (
                recovered is None or isinstance(recovered, bool)):
            raise ProtocolViolation(f"{sub.channel}: malformed 'subscribed' reply")
        if (sub.automatic and recovered is False and epoch == sub.tracker.epoch
                and offset > sub.tracker.offset and sub.fallback_on != self._gen):
            # The server subscribed this channel at connect and may already have sent live
            # events past the recovery point, so it could not replay without reordering.
            # Unsubscribe and subscribe again with recover: a fresh subscription replays
            # from history. Events keep being held meanwhile; a Gap only if that fails too.
            sub.fallback_on = self._gen
            self._spawn(self._resubscribe_fresh(ws, self._gen, sub), "tidings-recover")
            return
        sub.retries = 0
        sub.push(sub.tracker.subscribed(offset, epoch, recovered))
        sub.confirm()

    def _on_unsubscribed(self, ws: aiohttp.ClientWebSocketResponse, reply_id: str | None,
                         data: dict[str, Any]) -> None:
        if reply_id is not None:
            future = self._pending.pop(reply_id, None)
            if future is not None and not future.done():
                future.set_result(data)
            return
        channel = data.get("channel")
        sub = self._subs.get(channel) if isinstance(channel, str) else None
        if sub is None:
            return
        if data.get("resubscribe") is True:
            logger.info("server ended %s (%s); resubscribing with recovery", sub.channel,
                        data.get("reason"))
            sub.tracker.begin()
            self._spawn(self._send_subscribe(ws, self._gen, sub), "tidings-resubscribe")
            return
        del self._subs[sub.channel]
        reason = data.get("reason")
        sub.finish(SubscriptionError(sub.channel, reason if isinstance(reason, str) else "revoked",
                                     "the server ended the subscription"))

    def _on_error(self, ws: aiohttp.ClientWebSocketResponse, reply_id: str | None,
                  data: dict[str, Any]) -> None:
        raw_code, raw_message = data.get("code"), data.get("message")
        code = raw_code if isinstance(raw_code, str) else "internal_error"
        message = raw_message if isinstance(raw_message, str) else ""
        if reply_id is not None:
            sub = self._sub_ids.pop(reply_id, None)
            if sub is not None:
                if sub.pending_id == reply_id:  # else a newer subscribe is in flight
                    self._subscribe_failed(ws, sub, code, message)
                return
            future = self._pending.pop(reply_id, None)
            if future is not None and not future.done():
                future.set_exception(CommandError(code, message))
                future.exception()
                return
        if code == "unauthorized":
            self._last_unauthorized = message
        logger.warning("server error %s: %s", code, message)

    def _subscribe_failed(self, ws: aiohttp.ClientWebSocketResponse, sub: Subscription,
                          code: str, message: str) -> None:
        if self._subs.get(sub.channel) is not sub:
            return
        if code in _FATAL_SUBSCRIBE_ERRORS or not (sub.confirmed or sub.automatic):
            del self._subs[sub.channel]
            sub.finish(SubscriptionError(sub.channel, code, message))
            return
        # A resubscription failed for a reason that may pass (broker or authorizer
        # unavailable, rate limit): try again on this connection after a delay.
        sub.retries += 1
        delay = self._backoff.random() * min(self._backoff.cap,
                                             self._backoff.initial * 2 ** min(sub.retries, 16))
        logger.warning("resubscribing %s failed (%s: %s); retrying in %.2f s", sub.channel,
                       code, message, delay)
        self._spawn(self._retry_subscribe(ws, self._gen, sub, delay), "tidings-retry")

    def _on_event(self, message: dict[str, Any]) -> None:
        channel = message.get("channel")
        sub = self._subs.get(channel) if isinstance(channel, str) else None
        if sub is None:
            return
        try:
            event = Event.from_message(message)
        except ValueError:
            logger.warning("ignoring a malformed event on %s", sub.channel)
            return
        sub.push(sub.tracker.event(event))

    # -- outbound --------------------------------------------------------------------

    def _next_id(self) -> str:
        return str(next(self._ids))

    async def _send(self, ws: aiohttp.ClientWebSocketResponse, message: dict[str, Any]) -> None:
        try:
            await ws.send_str(dumps(message).decode())
        except (ConnectionError, aiohttp.ClientError, RuntimeError) as exc:
            raise NotConnected(f"cannot send: {_describe(exc)}") from exc

    async def _command(self, ws: aiohttp.ClientWebSocketResponse, kind: str,
                       data: dict[str, Any]) -> dict[str, Any]:
        command_id = self._next_id()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[command_id] = future
        try:
            await self._send(ws, {"type": kind, "id": command_id, "data": data})
            async with asyncio.timeout(self._command_timeout):
                return await future
        finally:
            self._pending.pop(command_id, None)

    async def _send_subscribe(self, ws: aiohttp.ClientWebSocketResponse, gen: int,
                              sub: Subscription) -> None:
        if gen != self._gen or not self._connected:
            return
        data: dict[str, Any] = {"channel": sub.channel}
        point = sub.tracker.recover_point()
        if point is not None:
            data["recover"] = {"offset": point[0], "epoch": point[1]}
        elif sub.channel in self._auto:
            data["recover"] = dict(_FIRST_RECOVER)
        command_id = self._next_id()
        self._sub_ids[command_id] = sub
        sub.sent_on = gen
        sub.pending_id = command_id
        await self._send(ws, {"type": "subscribe", "id": command_id, "data": data})

    async def _resubscribe_fresh(self, ws: aiohttp.ClientWebSocketResponse, gen: int,
                                 sub: Subscription) -> None:
        """Unsubscribe, then subscribe with recover (the reply to the unsubscribe, carrying
        an id nobody waits for, is ignored)."""
        await self._send(ws, {"type": "unsubscribe", "id": self._next_id(),
                              "data": {"channel": sub.channel}})
        await self._send_subscribe(ws, gen, sub)

    async def _resubscribe_all(self, ws: aiohttp.ClientWebSocketResponse, gen: int,
                               subs: list[Subscription], unwanted: list[str]) -> None:
        sent = 0
        for channel in unwanted:
            await self._send(ws, {"type": "unsubscribe", "data": {"channel": channel}})
            sent += 1
        for sub in subs:
            if self._subs.get(sub.channel) is not sub or sub.sent_on == gen:
                continue
            if sent >= self._burst:
                await asyncio.sleep(1 / self._rate)
            await self._send_subscribe(ws, gen, sub)
            sent += 1

    async def _retry_subscribe(self, ws: aiohttp.ClientWebSocketResponse, gen: int,
                               sub: Subscription, delay: float) -> None:
        await self._sleep(delay)
        if self._subs.get(sub.channel) is sub:
            await self._send_subscribe(ws, gen, sub)

    async def _refresh_loop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Replace the token before it expires, with the ``refresh`` command."""
        tokens = self._tokens
        while (delay := tokens.refresh_delay()) is not None:
            await asyncio.sleep(delay)
            expires = tokens.expires_at
            try:
                token = await tokens.fetch()
            except AuthenticationFailed as exc:
                logger.warning("token refresh: %s; retrying", exc.reason)
                await asyncio.sleep(tokens.retry_delay(expires or self._wall()))
                continue
            try:
                reply = await self._command(ws, "refresh", {"token": token})
            except CommandError as exc:
                logger.warning("the server refused the refreshed token: %s", exc.message)
                return  # it closes with 4401; the reconnect asks the provider again
            except TimeoutError:
                logger.warning("no reply to refresh; trying again")
                continue
            if not tokens.refreshed(token, reply.get("expires_at")):
                logger.warning("the token provider returned a token that expires no later "
                               "than the current one; not refreshing again on this connection")
                return

    # -- stopping --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closing:
            raise ConnectionClosed(None, "the client is closed")

    def _stop(self, error: ClientError) -> None:
        self._error = error
        self._closing = True
        self._finish(error)
        code = error.code if isinstance(error, ConnectionClosed) else None
        reason = error.reason if isinstance(error, ConnectionClosed) else str(error)
        self._emit(StateChange(State.CLOSED, code, reason, error=error))
        self._settle_first(error)
        if self._stopped is not None:
            self._stopped.set()

    def _finish(self, error: ClientError | None) -> None:
        subs, self._subs = list(self._subs.values()), {}
        for sub in subs:
            sub.finish(error)

    def _settle_first(self, error: ClientError | None) -> None:
        first = self._first
        if first is None or first.done():
            return
        if error is None:
            first.set_result(None)
        else:
            first.set_exception(error)
            first.exception()

    def _emit(self, change: StateChange) -> None:
        self._state = change.state
        logger.debug("state %s (code %s, %s)", change.state.value, change.code, change.reason)
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:
                logger.exception("a state listener failed")


class Connecting:
    """What ``connect`` returns: ``async with connect(...) as client`` or
    ``client = await connect(...)`` (then ``await client.close()``)."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def __await__(self) -> Generator[Any, None, Client]:
        return self.client.start().__await__()

    async def __aenter__(self) -> Client:
        return await self.client.start()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.client.close()


def connect(url: str, **options: Unpack[ClientOptions]) -> Connecting:
    """Connect to a Tidings server at ``url`` (``ws://host:port/ws``); see ``Client``."""
    return Connecting(Client(url, **options))
