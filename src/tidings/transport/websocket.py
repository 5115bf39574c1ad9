"""The WebSocket endpoint: handshake, read loop and raw frame writes on aiohttp.

aiohttp's reader handles client frames, control frames, fragmentation and the RFC 6455
rules, except one that this module adds: client frames must be masked (section 5.1).
Outbound event frames are pre-built and written straight into the socket transport,
bypassing a per-message ``await``, so that fan-out never waits on a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
from typing import Any
from urllib.parse import unquote_plus

from aiohttp import WebSocketError, WSMessage, WSMsgType, web

from tidings.config import LimitsSettings
from tidings.errors import PersonalChannelUnavailable, TooManyConnections, Unauthorized
from tidings.ports import ConnectionHost
from tidings.protocol import CloseCode, ErrorCode
from tidings.protocol.deflate import deflate_frames
from tidings.protocol.messages import ErrorReply, encode
from tidings.protocol.wire import close_frame, ping_frame
from tidings.session import Session
from tidings.transport.frames import MaskCheckingResponse

__all__ = ["WsConnection", "origin_allowed", "token_from_request", "websocket_handler"]

logger = logging.getLogger(__name__)

#: Seconds a closing handshake may take before the socket is simply dropped. It bounds
#: how long a client that stopped reading keeps its send buffer (at most the
#: ``limits.send_buffer_bytes`` cap, the write that passed it and the close frame) after
#: being closed with 1013.
CLOSE_TIMEOUT = 5.0
#: Extra seconds the whole close gets over ``CLOSE_TIMEOUT``: the inner wait for the
#: client's close frame expires first, and writing the close frame and EOF before it
#: still has a bound of its own.
_CLOSE_BEHIND_QUEUE_MARGIN = 1.0

#: The only protocol version the server speaks: RFC 6455. Drafts 7 and 8, which aiohttp
#: would accept, are answered 426 like any other version (RFC 6455 section 4.4).
WS_VERSION = "13"


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
    and the handler then runs the closing handshake (``finish``), which waits, bounded,
    for the client's close frame. Calling ``ws.close`` from another task while
    ``receive`` is pending would drop the TCP connection without completing the
    handshake.
    """

    __slots__ = (
        "_closing",
        "_gateway",
        "_handler",
        "_limit",
        "_transport",
        "close_request",
        "deflate",
        "receiving",
        "session",
        "ws",
    )

    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport,
        session: Session,
        gateway: ConnectionHost,
        handler: asyncio.Task[Any] | None,
    ) -> None:
        self.ws = ws
        self._transport = transport
        self.session = session
        self._gateway = gateway
        self._limit = gateway.settings.limits.send_buffer_bytes
        self._closing = False
        self._handler = handler
        self.close_request: tuple[CloseCode, str] | None = None
        self.receiving = False
        #: permessage-deflate negotiated: data frames go out compressed (RSV1).
        self.deflate = bool(ws.compress)

    @property
    def conn_id(self) -> str:
        return self.session.conn_id

    @property
    def user_id(self) -> str:
        return self.session.identity.user_id

    def send(self, data: bytes) -> None:
        """Write plain frames, compressed first if this connection negotiated deflate."""
        self.send_encoded(deflate_frames(data) if self.deflate else data)

    def send_encoded(self, data: bytes) -> None:
        """Write frames as they are (already compressed if ``deflate``)."""
        if self._closing:
            return
        transport = self._transport
        if transport.is_closing():
            return
        transport.write(data)
        if transport.get_write_buffer_size() > self._limit:
            self._gateway.metrics.slow_consumer_closes.inc()
            logger.warning(
                "closing slow consumer %s (user %s) with 1013: more than %d bytes "
                "queued (limits.send_buffer_bytes)",
                self.conn_id,
                self.user_id,
                self._limit,
            )
            self.close(CloseCode.TRY_AGAIN_LATER, "send buffer full: client reads too slowly")

    def send_ping(self) -> None:
        self.send_encoded(ping_frame())

    def close(self, code: CloseCode, reason: str) -> None:
        """Request a close: nothing more is sent but the close frame, which ``finish``
        writes behind what is already queued."""
        if self._closing:
            return
        self._closing = True
        self._gateway.metrics.closed(int(code))
        self.close_request = (code, reason)
        if self.receiving and self._handler is not None:
            self._handler.cancel(_CLOSE_REQUESTED)

    async def finish(self) -> None:
        """Run the closing handshake for a requested close (in the handler task).

        The close frame goes behind the bytes already queued, so a client reads every
        frame it was sent and then the close code. Within ``CLOSE_TIMEOUT`` the client
        must have read all of it and answered (or ended the connection); otherwise the
        socket is aborted and its buffer freed. That buffer never holds more than the
        send-buffer cap, the write that passed it and the close frame: ``send`` writes
        nothing once a close is requested.
        """
        if self.close_request is None or self._transport.is_closing():
            return
        code, reason = self.close_request
        transport = self._transport
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT + _CLOSE_BEHIND_QUEUE_MARGIN):
                if code is CloseCode.TRY_AGAIN_LATER and transport.can_write_eof():
                    await self._close_behind_queue(code, reason)
                else:
                    await self.ws.close(code=int(code), message=reason.encode()[:123], drain=False)
        except (TimeoutError, ConnectionError):
            pass
        if transport.get_write_buffer_size():
            # The client did not read what was queued in time: a graceful close would
            # wait on it indefinitely.
            transport.abort()
        else:
            transport.close()

    async def _close_behind_queue(self, code: CloseCode, reason: str) -> None:
        """Close a client that fell behind: close frame, then half-close, then wait.

        Such a client has up to the cap queued before the close frame; the FIN after it
        lets a client that reads to the end see the end at once instead of after the
        close timeout, and reading on (not closing) keeps the kernel from answering the
        client's late frames with a reset that could destroy the unread close frame.
        """
        self._transport.write(close_frame(int(code), reason))
        self._transport.write_eof()
        with contextlib.suppress(ConnectionError, RuntimeError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                # Whatever the client sends now is not acted on (RFC 6455 section 5.5.1).
                # aiohttp's answer to the client's close frame cannot be written on the
                # half-closed transport; aiohttp swallows that RuntimeError, and it is
                # suppressed here should a version not.
                while (await self.ws.receive()).type not in _CLOSED_TYPES:
                    pass


#: Cancellation message that marks a cancel as ours (a close request), not a shutdown.
_CLOSE_REQUESTED = "tidings: close requested"

#: What ``receive`` returns once the connection is over.
_CLOSED_TYPES = frozenset({WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR})


def _json_error(status: int, code: ErrorCode, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _upgrade_required() -> web.Response:
    """The 426 for a request that is not a valid RFC 6455 upgrade: the JSON error, plus
    the headers that say which upgrade would work (RFC 9110 section 15.5.22, RFC 6455
    section 4.4)."""
    response = _json_error(426, ErrorCode.INVALID_REQUEST, "expected a WebSocket upgrade request")
    response.headers["Upgrade"] = "websocket"
    response.headers["Connection"] = "Upgrade"
    response.headers["Sec-WebSocket-Version"] = WS_VERSION
    return response


async def _reject(
    ws: web.WebSocketResponse,
    error: bytes | None,
    code: CloseCode,
    reason: str,
    gateway: ConnectionHost,
) -> web.WebSocketResponse:
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


def websocket_handler(gateway: ConnectionHost) -> Any:
    """The aiohttp handler for the WebSocket path.

    The read loop lives in the handler itself, and the handshake and each message are
    handled by coroutines that have finished before the next ``receive``: an idle
    connection then holds one suspended frame, not a stack of them (each costs every idle
    connection a few hundred bytes).

    In development mode each connection's start and end is logged at info (its id, user
    and close code, never its token); in production that would be two lines per
    handshake, for numbers the metrics already count.
    """
    announce = gateway.settings.dev_mode

    async def handle(request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        accepted = await _accept(request, gateway, task)
        if not isinstance(accepted, WsConnection):
            return accepted
        peer = accepted
        ws = peer.ws
        if announce:
            logger.info(
                "websocket %s connected: user %s from %s",
                peer.conn_id,
                peer.user_id,
                request.remote,
            )
        try:
            while peer.close_request is None:
                peer.receiving = True
                try:
                    msg = await ws.receive()
                except asyncio.CancelledError as exc:
                    if (
                        peer.close_request is None
                        or not exc.args
                        or exc.args[0] != _CLOSE_REQUESTED
                    ):
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
        if announce:
            code = peer.close_request[0] if peer.close_request is not None else ws.close_code
            logger.info(
                "websocket %s disconnected: user %s, close code %s",
                peer.conn_id,
                peer.user_id,
                int(code) if code is not None else "none",
            )
        return ws

    return handle


async def _accept(
    request: web.Request, gateway: ConnectionHost, task: asyncio.Task[Any] | None
) -> WsConnection | web.StreamResponse:
    """Origin check, upgrade, authentication and ``connected``: the accepted connection
    (handled by ``task``), or the response that refused it."""
    settings = gateway.settings
    server = settings.server
    if gateway.draining:
        return _json_error(503, ErrorCode.UNAVAILABLE, "server is shutting down")
    if server.allowed_origins and not origin_allowed(
        request.headers.get("Origin"), server.allowed_origins
    ):
        gateway.metrics.handshakes.labels("forbidden_origin").inc()
        logger.info("handshake refused: origin not allowed")
        return _json_error(403, ErrorCode.FORBIDDEN, "origin not allowed")
    if request.headers.get("Sec-WebSocket-Version") != WS_VERSION:
        return _upgrade_required()
    ws = MaskCheckingResponse(
        # Negotiated by MaskCheckingResponse itself (protocol.deflate.negotiate).
        compress=server.permessage_deflate,
        autoping=False,
        autoclose=True,
        # aiohttp refuses a message of max_msg_size bytes or more; the limit allows
        # messages of exactly max_message_bytes.
        max_msg_size=settings.limits.max_message_bytes + 1,
        timeout=CLOSE_TIMEOUT,
    )
    try:
        # Not ws.can_prepare first: it would run the whole handshake check twice. A
        # refused handshake raises before anything is written.
        await ws.prepare(request)
    except web.HTTPBadRequest:
        return _upgrade_required()
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
        message = encode(ErrorReply(ErrorCode.UNAUTHORIZED, exc.message), gateway.wall_clock())
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
    except PersonalChannelUnavailable as exc:
        # Logged by the gateway (rate-limited); 1013 makes the SDKs back off and retry.
        gateway.metrics.handshakes.labels("unavailable").inc()
        return await _reject(ws, None, CloseCode.TRY_AGAIN_LATER, exc.message, gateway)
    metrics.handshake_ok.inc()
    return peer


def _inflated_too_big(text: str, limits: LimitsSettings) -> bool:
    """An inflated message of exactly ``max_message_bytes + 1`` bytes: aiohttp refuses
    an inflated message only past its ``max_msg_size`` (the limit + 1), a plain one at it."""
    limit = limits.max_message_bytes
    # A str has at most as many characters as UTF-8 bytes, at least a quarter as many.
    return len(text) * 4 > limit and len(text.encode()) > limit


async def _on_message(msg: WSMessage, peer: WsConnection, gateway: ConnectionHost) -> bool:
    """Handle one message from the client; False when the connection is over."""
    session = peer.session
    clock = gateway.clock
    kind = msg.type
    if kind is WSMsgType.TEXT:
        if peer.deflate and _inflated_too_big(msg.data, gateway.settings.limits):
            peer.close(CloseCode.MESSAGE_TOO_BIG, "message too big")
            return False
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
        if kind is WSMsgType.ERROR and isinstance(msg.data, WebSocketError):
            # aiohttp failed the connection on a bad frame (1002, 1007, 1009) and sent
            # that code; ws.close_code says 1006 by now, as the socket is gone.
            gateway.metrics.closed(msg.data.code)
        return False
    return True
