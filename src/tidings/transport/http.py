"""aiohttp's HTTP/1 server with four additions: a deadline on every request head; one
log line without a traceback (nor any of the request's bytes) for a request it cannot
parse or a body it cannot read; a request whose body's chunked framing breaks after its
head fails at once (the handler answers 400) instead of waiting on that body; and no
access line for a probe or a metrics scrape that succeeded.

aiohttp has no option for its protocol class, so ``AppRunner`` rebuilds its server
around the same handler and options; this extends private parts of aiohttp, which is why
pyproject.toml takes aiohttp minor versions only once the tests pass on them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import StreamReader, web
from aiohttp.http_exceptions import (
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
)
from aiohttp.web_log import AccessLogger
from aiohttp.web_protocol import _ErrInfo

__all__ = ["AppRunner", "HttpProtocol", "HttpServer", "QuietProbesAccessLogger", "TCPSite"]

logger = logging.getLogger("tidings.server")

#: Asked every few seconds by orchestrators, load balancers and Prometheus.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class QuietProbesAccessLogger(AccessLogger):
    """aiohttp's access lines, less those of probes and scrapes that succeeded.

    A readiness probe every 2 s and a scrape every 15 s would be most of a quiet node's
    lines, burying the ones an operator reads; a failing probe (503 while draining or
    without the broker) is still logged.
    """

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if response.status < 400 and request.path in PROBE_PATHS:
            return
        super().log(request, response, time)


def _describe(exc: HttpProcessingError) -> str:
    """What is wrong with a request aiohttp could not parse, without any of its bytes.

    The exceptions' own messages quote the raw line or header, which may hold a token.
    """
    if isinstance(exc, LineTooLong):
        return "request line or header too long"
    if isinstance(exc, BadHttpMethod):
        return "invalid method"
    if isinstance(exc, BadStatusLine):
        return "invalid request line"
    if isinstance(exc, InvalidHeader):
        return "invalid header"
    if isinstance(exc, InvalidURLError):
        return "invalid URL"
    return "malformed request"


class HttpProtocol(web.RequestHandler):
    """aiohttp's HTTP/1 protocol with a deadline on every request head, one log line
    without a traceback for a request it cannot parse, and a body whose framing breaks
    failed with ``RequestPayloadError``.

    A head must be complete ``head_timeout`` seconds after the connection is accepted
    (the first request) or after its own first byte arrived (keep-alive and pipelined
    requests); otherwise ``on_head_timeout`` is called and the socket is closed. Idle
    keep-alive time (aiohttp's ``keepalive_timeout``), request bodies, handlers and
    upgraded (WebSocket) connections are not timed here.
    """

    __slots__ = ("_body", "_head_timeout", "_head_timer", "_on_head_timeout")

    def __init__(
        self,
        manager: web.Server,
        *,
        head_timeout: float,
        on_head_timeout: Callable[[], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout = head_timeout
        self._on_head_timeout = on_head_timeout
        self._head_timer: asyncio.TimerHandle | None = None
        #: The last request's body while it is still arriving; None between requests.
        self._body: StreamReader | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # From the accept on: a client that connects and sends nothing, or too little,
        # holds a socket as surely as one that drips its head.
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._payload_parser is not None or self._upgraded:
            # WebSocket frames, or bytes queued behind an upgrade request: no head here.
            super().data_received(data)
            return
        body = self._body
        if body is not None and body.is_eof():
            body = self._body = None
        if body is None and self._head_timer is None and data:
            # Between requests, these bytes start the next head.
            self._arm()
        parsed = self._request_count
        super().data_received(data)
        if self._request_count != parsed:
            self._disarm()
            # aiohttp appends each parsed request in this call; the handler task has not
            # run since, so the last one is still queued.
            message, last = self._messages[-1] if self._messages else (None, None)
            if body is not None and not body.is_eof() and isinstance(message, _ErrInfo):
                # The bytes after a head broke the body's framing (a bad chunk size):
                # aiohttp queues its 400 behind the request whose body this was, and
                # that request's handler would wait on the body until the client left.
                body.set_exception(web.RequestPayloadError("malformed request body"))
            self._body = None if last is None or last.is_eof() else last

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        if isinstance(kwargs.get("exc_info"), web.RequestPayloadError):
            # aiohttp reading the rest of a body whose framing or encoding the client
            # broke, after its answer (api.http.json_errors has logged the request).
            logger.debug("the rest of a request body could not be read: connection closed")
            return
        super().log_exception(*args, **kwargs)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        # A client's malformed request, not a server fault: aiohttp would log it with a
        # traceback and the offending line; the answer is the same as aiohttp's. Like
        # aiohttp, a bad method opening a connection (TLS or another protocol sent to
        # this port, as scanners do) is only worth a debug line.
        level = (
            logging.DEBUG
            if isinstance(exc, BadHttpMethod) and self._request_count == 1
            else logging.INFO
        )
        logger.log(
            level, "bad request from %s answered %d: %s", request.remote, status, _describe(exc)
        )
        if request.writer.output_size > 0:
            raise ConnectionError("response already started, cannot send the error")
        response = web.Response(status=status, text=message, content_type="text/plain")
        response.force_close()
        return response

    def _arm(self) -> None:
        self._head_timer = self._loop.call_later(self._head_timeout, self._head_expired)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if self.transport is None:
            return
        self._on_head_timeout()
        logger.debug("request head not complete within %ss: connection closed", self._head_timeout)
        self.force_close()


class HttpServer(web.Server):
    """aiohttp's protocol factory, making ``HttpProtocol`` connections."""

    def __init__(
        self, base: web.Server, head_timeout: float, on_head_timeout: Callable[[], None]
    ) -> None:
        super().__init__(
            base.request_handler,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            loop=base._loop,
            **base._kwargs,
        )
        self._head_timeout = head_timeout
        self._on_head_timeout = on_head_timeout

    def __call__(self) -> web.RequestHandler:
        return HttpProtocol(
            self,
            loop=self._loop,
            head_timeout=self._head_timeout,
            on_head_timeout=self._on_head_timeout,
            **self._kwargs,
        )


class AppRunner(web.AppRunner):
    """An ``AppRunner`` serving with ``HttpProtocol``.

    aiohttp has no option for the protocol class, so its server is rebuilt around the
    same handler, request factory and options.
    """

    __slots__ = ("_head_timeout", "_on_head_timeout")

    def __init__(
        self,
        app: web.Application,
        *,
        head_timeout: float,
        on_head_timeout: Callable[[], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self._head_timeout = head_timeout
        self._on_head_timeout = on_head_timeout

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()
        return HttpServer(base, self._head_timeout, self._on_head_timeout)


class TCPSite(web.TCPSite):
    """aiohttp's TCP site with a deadline on the TLS handshake.

    asyncio's default gives a client 60 s to finish the handshake, and the request-head
    deadline only starts once it is done (the HTTP protocol sees no bytes before), so a
    client that opens TLS connections and stalls would hold each one for a minute.
    ``handshake_timeout`` (``server.handshake_timeout``) bounds the handshake as well.
    """

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str | None,
        port: int | None,
        *,
        handshake_timeout: float,
        **options: Any,
    ) -> None:
        super().__init__(runner, host, port, **options)
        self._handshake_timeout = handshake_timeout

    async def start(self) -> None:
        # Mirrors web.TCPSite.start, adding ssl_handshake_timeout (aiohttp has no option).
        await web.BaseSite.start(self)
        server = self._runner.server
        if server is None:
            raise RuntimeError("the runner is not set up")
        loop = asyncio.get_running_loop()
        # asyncio refuses a handshake timeout without TLS.
        handshake = self._handshake_timeout if self._ssl_context is not None else None
        listening = await loop.create_server(
            server,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
            ssl_handshake_timeout=handshake,
        )
        self._server = listening
        sockets = listening.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port
