"""The WebSocket endpoint: handshake, read loop and raw frame writes on aiohttp.

aiohttp's reader handles client frames, control frames, fragmentation and the RFC 6455
rules; outbound event frames are pre-built and written straight into the socket
transport, bypassing a per-message ``await``, so that fan-out never waits on a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
from typing import Any
from urllib.parse import unquote_plus

from aiohttp import WSMessage, WSMsgType, web

from tidings.errors import Unauthorized
from tidings.gateway import Gateway, TooManyConnections
from tidings.protocol import CloseCode, ErrorCode
from tidings.protocol.wire import close_frame, ping_frame
from tidings.session import Session, error_message

__all__ = ["WsConnection", "origin_allowed", "token_from_request", "websocket_handler"]

logger = logging.getLogger(__name__)

#: Seconds a closing handshake may take before the socket is simply dropped.
CLOSE_TIMEOUT = 5.0


def origin_allowed(origin: str | None, allowed: tuple[str, ...]) -> bool:
    """No allow-list, or no Origin (not a browser): allowed. Entries may use ``*``."""
    if not allowed or origin is None:
        return True
    return any(origin == pattern or fnmatch.fnmatchcase(origin, pattern) for pattern in allowed)


def _query_token(raw: str) -> str | None:
    """The first ``token`` parameter of a raw query string, decoded like ``parse_qsl``."""
    for pair in raw.split("&"):
        name, _, value = pair.partition("=")
        # unquote_plus only where it can change something: JWTs have no '%' or '+'.
        if name == "token" or (("%" in name or "+" in name) and unquote_plus(name) == "token"):
            return unquote_plus(value) if "%" in value or "+" in value else value
    return None


def token_from_request(request: web.BaseRequest) -> str | None:
    """The JWT from ``?token=`` or ``Authorization: Bearer``."""
    # Not request.query: it would parse the whole query string into a MultiDict cached on
    # the request, which lives as long as the connection (about 0.7 KB per connection).
    # raw_path is the request target as received; reading it caches nothing.
    _, _, raw = request.raw_path.partition("?")
    token = _query_token(raw.partition("#")[0]) if raw else None
    if token:
        return token
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


class WsConnection:
    """One accepted connection: the ``Peer`` the gateway and hub write to.

    A close requested from outside the handler (gateway, hub, sweeper) is carried out by
    the handler task itself: ``close`` records it and interrupts a pending ``receive``,
    and the handler then runs aiohttp's closing handshake, which waits for the client's
    close frame. Calling ``ws.close`` from another task while ``receive`` is pending
    would drop the TCP connection without completing the handshake.
    """

    __slots__ = ("_closing", "_gateway", "_handler", "_limit", "_transport",
                 "close_request", "receiving", "session", "ws")

    def __init__(self, ws: web.WebSocketResponse, transport: asyncio.Transport,
                 session: Session, gateway: Gateway,
                 handler: asyncio.Task[Any] | None) -> None:
        self.ws = ws
        self._transport = transport
        self.session = session
        self._gateway = gateway
        self._limit = gateway.settings.limits.send_buffer_bytes
        self._closing = False
        self._handler = handler
        self.close_request: tuple[CloseCode, str] | None = None
        self.receiving = False

    @property
    def conn_id(self) -> str:
        return self.session.conn_id

    @property
    def user_id(self) -> str:
        return self.session.identity.user_id

    def send(self, data: bytes) -> None:
        if self._closing:
            return
        transport = self._transport
        if transport.is_closing():
            return
        transport.write(data)
        if transport.get_write_buffer_size() > self._limit:
            self._gateway.metrics.slow_consumer_closes.inc()
            self.close(CloseCode.TRY_AGAIN_LATER, "send buffer full: client reads too slowly")

    def send_ping(self) -> None:
        self.send(ping_frame())

    def close(self, code: CloseCode, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        self._gateway.metrics.closed(int(code))
        self.close_request = (code, reason)
        if code is CloseCode.TRY_AGAIN_LATER and not self._transport.is_closing():
            # The buffer is full: a close frame queued behind it would never be read in
            # time, so drop the socket after a best-effort close frame.
            self._transport.write(close_frame(int(code), reason))
            self._transport.abort()
        if self.receiving and self._handler is not None:
            self._handler.cancel(_CLOSE_REQUESTED)

    async def finish(self) -> None:
        """Run the closing handshake for a requested close (in the handler task)."""
        if self.close_request is None or self._transport.is_closing():
            return
        code, reason = self.close_request
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT + 1):
                await self.ws.close(code=int(code), message=reason.encode()[:123], drain=False)
        except (TimeoutError, ConnectionError):
            self._transport.abort()


#: Cancellation message that marks a cancel as ours (a close request), not a shutdown.
_CLOSE_REQUESTED = "tidings: close requested"


def _json_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


async def _reject(ws: web.WebSocketResponse, error: bytes | None, code: CloseCode,
                  reason: str, gateway: Gateway) -> web.WebSocketResponse:
    """Send at most one error message, close, and act on nothing the client sends."""
    gateway.metrics.closed(int(code))
    if error is not None:
        gateway.metrics.error(ErrorCode.UNAUTHORIZED)
        with contextlib.suppress(ConnectionError):
            await ws.send_frame(error, WSMsgType.TEXT)
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await ws.close(code=int(code), message=reason.encode(), drain=False)
    return ws


def websocket_handler(gateway: Gateway) -> Any:
    """The aiohttp handler for the WebSocket path.

    The read loop lives in the handler itself, and the handshake and each message are
    handled by coroutines that have finished before the next ``receive``: an idle
    connection then holds one suspended frame, not a stack of them (each costs every idle
    connection a few hundred bytes).
    """

    async def handle(request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        accepted = await _accept(request, gateway, task)
        if not isinstance(accepted, WsConnection):
            return accepted
        peer = accepted
        ws = peer.ws
        try:
            while peer.close_request is None:
                peer.receiving = True
                try:
                    msg = await ws.receive()
                except asyncio.CancelledError as exc:
                    if (peer.close_request is None or not exc.args
                            or exc.args[0] != _CLOSE_REQUESTED):
                        raise
                    if task is not None:
                        task.uncancel()
                    break
                finally:
                    peer.receiving = False
                if not await _on_message(msg, peer, gateway):
                    break
        except Exception:
            # A fault of ours: tell the client to come back later, keep the server up.
            logger.exception("connection handler failed")
            peer.close(CloseCode.INTERNAL_ERROR, "internal server error")
        finally:
            gateway.disconnect(peer)
        await peer.finish()
        return ws

    return handle


async def _accept(request: web.Request, gateway: Gateway, task: asyncio.Task[Any] | None
                  ) -> WsConnection | web.StreamResponse:
    """Origin check, upgrade, authentication and ``connected``: the accepted connection
    (handled by ``task``), or the response that refused it."""
    settings = gateway.settings
    server = settings.server
    if gateway.draining:
        return _json_error(503, "unavailable", "server is shutting down")
    if server.allowed_origins and not origin_allowed(request.headers.get("Origin"),
                                                     server.allowed_origins):
        gateway.metrics.handshakes.labels("forbidden_origin").inc()
        logger.info("handshake refused: origin not allowed")
        return _json_error(403, "forbidden", "origin not allowed")
    ws = web.WebSocketResponse(
        compress=False,
        autoping=False,
        autoclose=True,
        max_msg_size=settings.limits.max_message_bytes,
        timeout=CLOSE_TIMEOUT,
    )
    try:
        # Not ws.can_prepare first: it would run the whole handshake check twice. A
        # refused handshake raises before anything is written.
        await ws.prepare(request)
    except web.HTTPBadRequest:
        return _json_error(426, "invalid_request", "expected a WebSocket upgrade request")
    transport = request.transport
    if transport is None:
        return ws
    token = token_from_request(request)
    metrics = gateway.metrics
    try:
        identity = gateway.verify_now(token)
        if identity is None:  # the key must be fetched first (JWKS)
            async with asyncio.timeout(server.handshake_timeout):
                identity = await gateway.authenticate(token)
    except Unauthorized as exc:
        metrics.handshake_unauthorized.inc()
        logger.info("connection rejected: %s", exc.message)
        message = error_message(ErrorCode.UNAUTHORIZED, exc.message)
        return await _reject(ws, message, CloseCode.UNAUTHORIZED, "unauthorized", gateway)
    except TimeoutError:
        metrics.handshakes.labels("timeout").inc()
        logger.warning("authentication timed out")
        return await _reject(ws, None, CloseCode.TRY_AGAIN_LATER, "try again later", gateway)
    peer = WsConnection(ws, transport, gateway.new_session(identity), gateway, task)
    try:
        await gateway.connect(peer)
    except TooManyConnections as exc:
        gateway.metrics.handshakes.labels("too_many").inc()
        logger.info("connection rejected: %s", exc.message)
        return await _reject(ws, None, CloseCode.TOO_MANY, "too many connections", gateway)
    metrics.handshake_ok.inc()
    return peer


async def _on_message(msg: WSMessage, peer: WsConnection, gateway: Gateway) -> bool:
    """Handle one message from the client; False when the connection is over."""
    session = peer.session
    clock = gateway.clock
    kind = msg.type
    if kind is WSMsgType.TEXT:
        effects = session.receive_text(msg.data, clock())
        if effects:
            await gateway.handle(peer, effects)
    elif kind is WSMsgType.BINARY:
        await gateway.handle(peer, session.receive_binary(clock()))
    elif kind is WSMsgType.PING:
        session.saw_frame(clock())
        with contextlib.suppress(ConnectionError):
            await peer.ws.pong(msg.data)
    elif kind is WSMsgType.PONG:
        session.saw_frame(clock())
    else:
        if kind is WSMsgType.ERROR and peer.ws.close_code == CloseCode.MESSAGE_TOO_BIG:
            gateway.metrics.closed(CloseCode.MESSAGE_TOO_BIG)
        return False
    return True
