"""The client: one WebSocket at a time, reconnecting, resubscribing and recovering.

A single task (``Client._run``) owns the connection loop: connect and serve the
connection until it ends (``tidings.client.dialer``, ``tidings.client.link``), ask the
session whether and when to reconnect, wait that backoff delay, repeat. Every decision
that needs no I/O (what each server message means, what to subscribe after a reconnect,
the close-code policy, the backoff, token refresh timing) is the pure
``tidings.client.session.Session``'s; this module keeps the application-facing API, the
subscriptions' queues (``tidings.client.subscription``), state listeners and the task
that connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Literal, assert_never

import aiohttp

from tidings.client.backoff import Backoff
from tidings.client.dialer import Dialer
from tidings.client.effects import (
    Added,
    AppEffect,
    Confirm,
    Connected,
    Deliver,
    End,
    Outcome,
    PresenceSeen,
    Recovered,
    Stop,
)
from tidings.client.errors import (
    AuthenticationFailed,
    ClientError,
    CommandError,
    ConnectionClosed,
    NotConnected,
)
from tidings.client.models import State, StateChange
from tidings.client.options import ClientOptions, StateListener
from tidings.client.session import Session
from tidings.client.sse import sse_url
from tidings.client.subscription import (
    ErrorCallback,
    EventCallback,
    GapCallback,
    PresenceCallback,
    RecoveryCallback,
    Subscription,
)
from tidings.client.tokens import TokenProvider
from tidings.protocol import is_valid_channel

__all__ = ["Client", "ClientOptions", "StateListener", "TokenProvider"]

logger = logging.getLogger("tidings.client")


class Client:
    """A Tidings connection that reconnects and recovers on its own.

    Options (all keyword) are listed, with their defaults, in ``ClientOptions``
    (``tidings.client.options``) and docs/client-python.md.
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
        transport: Literal["websocket", "sse"] = "websocket",
        sse_path: str = "/sse",
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
        #: The pure core: protocol state and every decision (``self._http`` is aiohttp's).
        self._core = Session(
            token=token,
            token_provider=token_provider,
            backoff=backoff or Backoff(),
            refresh_margin=refresh_margin,
            liveness_timeout=liveness_timeout,
            connect_timeout=connect_timeout,
            resubscribe_burst=resubscribe_burst,
            resubscribe_rate=resubscribe_rate,
            max_auth_failures=max_auth_failures,
            clock=clock,
            wall_clock=wall_clock,
        )
        self._close_timeout = close_timeout
        self._queue_size = queue_size
        if transport not in ("websocket", "sse"):
            raise ValueError("transport must be 'websocket' or 'sse'")
        #: Opens and serves each connection; ``self._dialer.link`` is the one up, if any.
        self._dialer = Dialer(
            url,
            self._core,
            self._apply,
            headers=headers or {},
            token_in_query=token_in_query,
            sse_url=sse_url(url, sse_path) if transport == "sse" else None,
            connect_timeout=connect_timeout,
            close_timeout=close_timeout,
            command_timeout=command_timeout,
            sleep=sleep,
        )
        self._listeners: list[StateListener] = [on_state] if on_state is not None else []
        self._http = session
        self._own_http = session is None
        self._clock = clock
        self._sleep = sleep

        self._state = State.DISCONNECTED
        #: The application's subscriptions: the same channels, in the same order, as
        #: ``self._core.channels``.
        self._subs: dict[str, Subscription] = {}
        self._run_task: asyncio.Task[None] | None = None
        self._first: asyncio.Future[None] | None = None
        self._stopped: asyncio.Event | None = None
        self._closing = False
        self._error: ClientError | None = None

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
        link = self._dialer.link
        if link is not None and not link.ws.closed:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._close_timeout):
                    await link.ws.close(code=1000, message=b"client closed")
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

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- observation -----------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def connected(self) -> bool:
        return self._core.connected

    @property
    def error(self) -> ClientError | None:
        """Why the client stopped, when it stopped on its own."""
        return self._error

    @property
    def expires_at(self) -> float | None:
        """Expiry of the current token (epoch seconds), as the server reported it."""
        return self._core.tokens.expires_at

    @property
    def connection_id(self) -> str | None:
        """From the last ``connected`` message."""
        return self._core.connection_id

    @property
    def user_id(self) -> str | None:
        """From the last ``connected`` message."""
        return self._core.user_id

    @property
    def heartbeat_interval(self) -> float | None:
        """From the last ``connected`` message."""
        return self._core.heartbeat_interval

    @property
    def automatic_channels(self) -> frozenset[str]:
        """Channels the server subscribed automatically (the personal channel)."""
        return self._core.automatic

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
        on_recovered: RecoveryCallback | None = None,
        on_presence: PresenceCallback | None = None,
        queue_size: int | None = None,
    ) -> Subscription:
        """Subscribe and wait for the server's confirmation; return the subscription.

        Iterate it (``async for item in sub``) or pass ``on_event`` together with the
        required ``on_gap`` (and optionally ``on_error``). ``on_recovered``, a plain
        function, is told of each later successful recovery (``Recovery``: after a
        reconnect, how many events were missed and are replayed). Subscribing again to a
        channel returns the same subscription. While disconnected, this waits for the next
        connection. ``on_presence``, a plain function, gets each ``Presence`` (a user's
        join or leave, in namespaces with presence events). Raises ``SubscriptionError``
        when the server refuses; if the wait is cancelled the subscription stays
        requested (``unsubscribe`` to drop it).
        """
        if not is_valid_channel(channel):
            raise ValueError(f"invalid channel name: {channel!r}")
        if (on_event is None) != (on_gap is None):
            raise TypeError(
                "on_event and on_gap go together: a Gap means events were missed "
                "and must be handled"
            )
        self._check_open()
        core = self._core
        core.want(channel)
        sub = self._subs.get(channel)
        if sub is None:
            sub = Subscription(self, channel, maxsize=queue_size or self._queue_size)
            core.add(sub.channel_state)
            self._subs[channel] = sub
            link = self._dialer.link
            if core.connected and link is not None:
                with contextlib.suppress(NotConnected):
                    await link.send_subscribe(sub.channel_state, core.gen)
        if on_recovered is not None:
            sub.on_recovered = on_recovered
        if on_presence is not None:
            sub.on_presence = on_presence
        await sub.wait_confirmed()
        if on_event is not None and on_gap is not None:
            sub.start_callbacks(on_event, on_gap, on_error)
        return sub

    async def unsubscribe(self, channel: str) -> None:
        """Stop receiving ``channel``; its subscription ends after the queued items."""
        sub = self._subs.pop(channel, None)
        self._core.remove(channel)
        if sub is not None:
            sub.finish(None)
        link = self._dialer.link
        if self._core.connected and link is not None:
            with contextlib.suppress(NotConnected, CommandError, TimeoutError):
                await link.command("unsubscribe", {"channel": channel})

    async def ping(self) -> float:
        """Send the ``ping`` command; return the round trip time in seconds.

        Raises ``NotConnected`` when there is no connection or it is lost meanwhile,
        ``TimeoutError`` after ``command_timeout``.
        """
        link = self._dialer.link
        if not self._core.connected or link is None:
            self._check_open()
            raise NotConnected("not connected")
        started = self._clock()
        await link.command("ping", {})
        return self._clock() - started

    # -- the connection loop ---------------------------------------------------------

    async def _run(self) -> None:
        try:
            while not self._closing:
                self._emit(StateChange(State.CONNECTING))
                outcome = await self._attempt()
                if self._closing:
                    return
                step = self._core.connection_ended(outcome)
                if isinstance(step, Stop):
                    self._stop(step.error)
                    return
                self._emit(
                    StateChange(
                        State.DISCONNECTED, outcome.code, outcome.reason, retry_in=step.delay
                    )
                )
                await self._sleep(step.delay)
        except AuthenticationFailed as exc:
            self._stop(exc)
        except Exception as exc:
            logger.exception("tidings client failed")
            self._stop(ConnectionClosed(None, f"client failure: {exc!r}"))

    async def _attempt(self) -> Outcome:
        if self._http is None:  # pragma: no cover - set by start()
            raise RuntimeError("the client was not started")
        return await self._dialer.attempt(self._http)

    def _apply(self, effect: AppEffect) -> None:
        """Carry out what the session decided for the subscriptions and the state (the
        link carries out the rest)."""
        if isinstance(effect, Deliver):
            self._subs[effect.channel].push(effect.items)
        elif isinstance(effect, Confirm):
            self._subs[effect.channel].confirm()
        elif isinstance(effect, Recovered):
            self._subs[effect.channel].recovered(effect.recovery)
        elif isinstance(effect, PresenceSeen):
            self._subs[effect.channel].presence(effect.presence)
        elif isinstance(effect, End):
            self._subs.pop(effect.channel).finish(effect.error)
        elif isinstance(effect, Added):
            self._subs[effect.state.channel] = Subscription(
                self, effect.state.channel, maxsize=self._queue_size, channel_state=effect.state
            )
        elif isinstance(effect, Connected):
            self._emit(StateChange(State.CONNECTED))
            self._settle_first(None)
        else:
            assert_never(effect)

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
        self._core.clear()
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
