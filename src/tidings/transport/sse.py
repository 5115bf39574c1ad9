"""The Server-Sent Events fallback transport: ``GET <sse_path>`` and its commands.

An SSE connection is just another ``Peer``: the gateway and hub write it the same
WebSocket frames, which ``sse_format.SseEncoder`` turns into SSE events, written straight
into the socket transport as HTTP/1.1 chunks (no ``await`` per message, as for the
WebSocket). Heartbeats are ``: ping`` comment lines; the client never answers them: a
socket that is gone, or a send buffer past ``limits.send_buffer_bytes``, ends the
stream instead. A close (token expiry, drain, slow consumer, ...) is a last
``event: close`` with the WebSocket close code, then the end of the response.

Commands arrive as ``POST <sse_path>/commands`` (``tidings.transport.sse_commands``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiohttp import web
from aiohttp.http_writer import StreamWriter

from tidings.codes import ErrorCode
from tidings.errors import (
    InvalidRequest,
    PersonalChannelUnavailable,
    TooManyConnections,
    Unauthorized,
)
from tidings.ports import ConnectionHost, new_connection_id
from tidings.protocol import CloseCode, Recover, Subscribe, parse_channel
from tidings.session import Effect, Session, StartSubscribe
from tidings.transport.sse_format import (
    BadResumeToken,
    ParseCache,
    SseEncoder,
    close_event,
    decode_token,
)
from tidings.transport.websocket import CLOSE_TIMEOUT, origin_allowed, token_from_request

__all__ = ["SsePeer", "cors_headers", "json_error", "sse_handler"]

logger = logging.getLogger(__name__)

#: Commands of one SSE session waiting for the one being handled; more are refused 429.
MAX_QUEUED_COMMANDS = 16

_PING = b": ping\n\n"


def json_error(
    status: int, code: ErrorCode, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    response = web.json_response({"error": {"code": code, "message": message}}, status=status)
    response.headers.update(headers or {})
    return response


def cors_headers(request: web.BaseRequest, allowed: tuple[str, ...]) -> dict[str, str]:
    """The CORS headers for a request whose origin passed ``origin_allowed``: the origin
    echoed (with ``Vary``) when an allow-list is set, ``*`` when none is."""
    origin = request.headers.get("Origin")
    if origin is None:
        return {}
    if not allowed:
        return {"Access-Control-Allow-Origin": "*"}
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}


def _chunk(body: bytes) -> bytes:
    """``body`` as one HTTP/1.1 chunk (the response is ``Transfer-Encoding: chunked``)."""
    return b"%x\r\n%b\r\n" % (len(body), body)


class SsePeer:
    """One SSE stream: the ``Peer`` the gateway and hub write to.

    Until ``start`` the response is not prepared (the connection can still be refused
    with a JSON error): what is sent is kept, bounded by the send buffer limit. After
    ``close`` nothing more is written but the close event, which ``finish`` writes.
    """

    __slots__ = (
        "_buffered",
        "_closing",
        "_gateway",
        "_limit",
        "_transport",
        "close_request",
        "commands",
        "done",
        "encoder",
        "queued",
        "session",
    )

    def __init__(
        self, session: Session, gateway: ConnectionHost, cache: ParseCache | None = None
    ) -> None:
        self.session = session
        self._gateway = gateway
        self._limit = gateway.settings.limits.send_buffer_bytes
        self._transport: asyncio.Transport | None = None
        self._buffered: list[bytes] | None = []
        self._closing = False
        self.encoder = SseEncoder(cache)
        self.close_request: tuple[CloseCode, str] | None = None
        #: Set once the stream is to end (a close requested, or the socket gone).
        self.done = asyncio.Event()
        #: Serialises this session's commands, which arrive on concurrent POSTs.
        self.commands = asyncio.Lock()
        self.queued = 0

    @property
    def conn_id(self) -> str:
        return self.session.conn_id

    @property
    def user_id(self) -> str:
        return self.session.identity.user_id

    def start(self, transport: asyncio.Transport) -> None:
        """The response's headers are out: write what was kept, then write directly."""
        self._transport = transport
        buffered, self._buffered = self._buffered, None
        if buffered:
            self._write(b"".join(buffered))

    @property
    def deflate(self) -> bool:
        """SSE never carries WebSocket compression: the hub hands it plain frames."""
        return False

    def send(self, data: bytes) -> None:
        if self._closing:
            return
        self._write(self.encoder.encode(data))

    def send_encoded(self, data: bytes) -> None:
        # Without deflate, "encoded for this connection" means plain WebSocket frames.
        self.send(data)

    def send_ping(self) -> None:
        if self._closing:
            return
        # No pong over SSE: a socket that still takes bytes counts as alive; one that
        # is gone ends the stream here, within a heartbeat interval.
        self.session.saw_frame(self._gateway.clock())
        self._write(_PING)

    def _write(self, body: bytes) -> None:
        transport = self._transport
        if transport is None:
            if self._buffered is not None:
                self._buffered.append(body)
                if sum(map(len, self._buffered)) > self._limit:
                    self._slow()
            return
        if transport.is_closing():
            self.gone()
            return
        transport.write(_chunk(body))
        if transport.get_write_buffer_size() > self._limit:
            self._slow()

    def _slow(self) -> None:
        self._gateway.metrics.slow_consumer_closes.inc()
        logger.warning(
            "closing slow SSE consumer %s (user %s) with 1013: more than %d "
            "bytes queued (limits.send_buffer_bytes)",
            self.conn_id,
            self.user_id,
            self._limit,
        )
        self.close(CloseCode.TRY_AGAIN_LATER, "send buffer full: client reads too slowly")

    def gone(self) -> None:
        """The client went away: end without a close event (nobody would read it)."""
        self._closing = True
        self.done.set()

    def close(self, code: CloseCode, reason: str) -> None:
        if self._closing:
            return
        self._closing = True
        self._gateway.metrics.closed(int(code))
        self.close_request = (code, reason)
        self.done.set()

    async def finish(self, response: web.StreamResponse) -> None:
        """End the response: the close event behind what is queued, the last chunk, and
        within ``CLOSE_TIMEOUT`` the client must have read it all, or the socket is
        aborted and its buffer freed."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self.close_request is not None:
            code, reason = self.close_request
            transport.write(_chunk(close_event(int(code), reason)))
        # The drain in write_eof then waits for an empty buffer, not the low-water mark.
        transport.set_write_buffer_limits(high=0)
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await response.write_eof()
        except (TimeoutError, ConnectionError):
            pass
        if transport.get_write_buffer_size():
            transport.abort()


def _query_channels(request: web.Request, limit: int) -> list[str]:
    """The ``channel`` query parameters, validated; raises ``InvalidRequest``."""
    channels: list[str] = []
    for value in request.query.getall("channel", ()):
        namespace, name = parse_channel(value)
        channel = f"{namespace}:{name}"
        if channel not in channels:
            channels.append(channel)
    if len(channels) > limit:
        raise InvalidRequest(f"too many channels (at most {limit})")
    return channels


def _resume_effects(
    peer: SsePeer, positions: dict[str, tuple[int, str]], channels: list[str]
) -> list[Effect]:
    """Subscribe every resumed channel with ``recover`` (the personal channel first, so
    that its recover takes over the connect-time hold), then the new ``channels``."""
    personal = peer.session.personal
    ordered = sorted(positions, key=lambda channel: channel != personal)
    effects: list[Effect] = []
    for channel in ordered:
        offset, epoch = positions[channel]
        peer.encoder.seed(channel, offset, epoch)
        effects.append(StartSubscribe(Subscribe(None, channel, Recover(offset, epoch))))
    effects += [
        StartSubscribe(Subscribe(None, channel)) for channel in channels if channel not in positions
    ]
    return effects


def sse_handler(gateway: ConnectionHost, node: str | None) -> Any:
    """The aiohttp handler for ``GET <sse_path>``; ``node`` (the broker's node id, when
    nodes can relay commands) is appended to session ids so that any node can find the
    session's node."""
    settings = gateway.settings
    server, limits = settings.server, settings.limits
    max_channels = limits.max_subscriptions + 1  # the personal channel does not count
    # One parse per fan-out flush, shared by this server's SSE connections.
    cache = ParseCache()

    async def handle(request: web.Request) -> web.StreamResponse:
        if gateway.draining:
            return json_error(503, ErrorCode.UNAVAILABLE, "server is shutting down")
        if server.allowed_origins and not origin_allowed(
            request.headers.get("Origin"), server.allowed_origins
        ):
            logger.info("SSE connection refused: origin not allowed")
            return json_error(403, ErrorCode.FORBIDDEN, "origin not allowed")
        cors = cors_headers(request, server.allowed_origins)
        last_id = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
        try:
            positions = decode_token(last_id or "", max_channels)
            channels = _query_channels(request, limits.max_subscriptions)
            if len(positions.keys() | set(channels)) > max_channels:
                raise InvalidRequest(f"too many channels (at most {max_channels})")
        except BadResumeToken as exc:
            return json_error(400, ErrorCode.INVALID_REQUEST, str(exc), cors)
        except InvalidRequest as exc:
            return json_error(400, ErrorCode.INVALID_REQUEST, exc.message, cors)
        try:
            async with asyncio.timeout(server.handshake_timeout):
                identity = await gateway.authenticate(token_from_request(request))
        except Unauthorized as exc:
            gateway.metrics.handshake_unauthorized.inc()
            logger.info("SSE connection rejected: %s", exc.message)
            return json_error(401, ErrorCode.UNAUTHORIZED, exc.message, cors)
        except TimeoutError:
            logger.warning("authentication timed out")
            return json_error(503, ErrorCode.UNAVAILABLE, "try again later", cors)
        conn_id = new_connection_id()
        session = gateway.new_session(identity, f"{conn_id}.{node}" if node else conn_id)
        peer = SsePeer(session, gateway, cache)
        try:
            await gateway.connect(peer)
        except TooManyConnections as exc:
            gateway.metrics.handshakes.labels("too_many").inc()
            return json_error(429, ErrorCode.RATE_LIMITED, exc.message, cors)
        except PersonalChannelUnavailable as exc:
            gateway.metrics.handshakes.labels("unavailable").inc()
            return json_error(503, ErrorCode.UNAVAILABLE, exc.message, cors)
        gateway.metrics.handshake_ok.inc()
        try:
            return await _stream(request, peer, gateway, positions, channels, cors)
        finally:
            gateway.disconnect(peer)

    return handle


async def _stream(
    request: web.Request,
    peer: SsePeer,
    gateway: ConnectionHost,
    positions: dict[str, tuple[int, str]],
    channels: list[str],
    cors: dict[str, str],
) -> web.StreamResponse:
    """Send the response's headers, resume or subscribe, then wait for the end."""
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            **cors,
        }
    )
    response.enable_chunked_encoding()
    await response.prepare(request)
    writer = request.writer
    transport = request.transport
    if transport is None or not isinstance(writer, StreamWriter):
        peer.gone()
        return response
    # Headers out now: from here on events are written straight into the transport.
    writer.send_headers()
    peer.start(transport)
    announce = gateway.settings.dev_mode
    if announce:
        logger.info("SSE %s connected: user %s from %s", peer.conn_id, peer.user_id, request.remote)
    try:
        effects = _resume_effects(peer, positions, channels)
        if effects:
            async with peer.commands:
                await gateway.handle(peer, effects)
        await peer.done.wait()
    except Exception:
        logger.exception("SSE stream failed")
        peer.close(CloseCode.INTERNAL_ERROR, "internal server error")
    finally:
        gateway.disconnect(peer)
    with contextlib.suppress(ConnectionError):
        await peer.finish(response)
    if announce:
        code = peer.close_request[0] if peer.close_request is not None else None
        logger.info(
            "SSE %s disconnected: user %s, close code %s",
            peer.conn_id,
            peer.user_id,
            int(code) if code is not None else "none",
        )
    return response
