"""HTTP routes of the server API, health, readiness and metrics (protocol section 9)."""

from __future__ import annotations

import functools
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from tidings.api.service import ApiService
from tidings.codes import ErrorCode
from tidings.errors import (
    MethodNotAllowed,
    NotFound,
    TidingsError,
    Unauthorized,
    http_error_code,
)
from tidings.ports import HealthHost
from tidings.protocol.wire import dumps, loads
from tidings.telemetry import Telemetry

__all__ = [
    "add_api_routes",
    "add_not_found_route",
    "json_errors",
    "json_response",
    "method_not_allowed",
]

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=dumps(body), status=status, content_type="application/json")


def _error(status: int, code: ErrorCode, message: str) -> web.Response:
    return json_response({"error": {"code": code, "message": message}}, status)


#: ``warn(kind, reason)``: a rate-limited warning (``Gateway.outages``).
Warn = Callable[[str, str], None]


def json_errors(handler: Handler, warn: Warn | None = None) -> Handler:
    """Wrap a route handler: every failure as ``{"error": {"code", "message"}}`` with a
    fitting status.

    A server-side failure (5xx: the broker away) is logged through ``warn`` as one line
    per route and interval, since during an outage every request fails alike; without
    ``warn``, one line per request.

    A per-route wrapper rather than an aiohttp middleware: a middleware would wrap the
    WebSocket handler too, and its suspended frames would cost every idle connection
    about 1 KB.
    """

    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except TidingsError as exc:
            return _tidings_error(request, exc, warn)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _error(exc.status, http_error_code(exc.status), exc.reason)
        except web.RequestPayloadError:
            # The client's body broke its own framing (chunked encoding) or encoding
            # (Content-Encoding): a bad request, not a fault of ours. Not aiohttp's
            # message: it may quote the body.
            logger.info(
                "%s %s from %s answered 400: request body could not be read",
                request.method,
                request.path,
                request.remote,
            )
            response = _error(
                400,
                ErrorCode.INVALID_REQUEST,
                "request body could not be read (broken chunked encoding or Content-Encoding)",
            )
            # What follows on the connection cannot be parsed reliably.
            response.force_close()
            return response
        except ConnectionError:
            if not _client_gone(request):
                logger.exception("unexpected error in %s %s", request.method, request.path)
                return _error(500, ErrorCode.INTERNAL_ERROR, "internal server error")
            # The client closed the connection before its request was complete: there
            # is no one to answer, and nothing went wrong here.
            logger.debug(
                "%s %s: the client closed the connection before its request was complete",
                request.method,
                request.path,
            )
            return _error(400, ErrorCode.INVALID_REQUEST, "connection closed by the client")
        except Exception:
            logger.exception("unexpected error in %s %s", request.method, request.path)
            return _error(500, ErrorCode.INTERNAL_ERROR, "internal server error")

    return guarded


def _client_gone(request: web.Request) -> bool:
    """Whether the client's connection is closed (or closing) under this request."""
    transport = request.transport
    return transport is None or transport.is_closing()


async def not_found(request: web.Request) -> web.StreamResponse:
    """The JSON answer for a path no route serves."""
    return _error(NotFound.http_status, NotFound.code, "Not Found")


async def method_not_allowed(request: web.Request) -> web.StreamResponse:
    """The JSON answer for a known path asked with a method it does not serve."""
    return _error(MethodNotAllowed.http_status, MethodNotAllowed.code, "Method Not Allowed")


def _tidings_error(request: web.Request, exc: TidingsError, warn: Warn | None) -> web.Response:
    if exc.http_status >= 500:
        if warn is None:
            logger.warning("%s %s failed: %s", request.method, request.path, exc.message)
        else:
            # The route's pattern, not the path: kinds are a fixed set (no channel names).
            resource = request.match_info.route.resource
            path = resource.canonical if resource is not None else request.path
            warn(f"{request.method} {path} failed", exc.message)
    return _error(exc.http_status, exc.code, exc.message)


class _Api:
    def __init__(self, gateway: HealthHost, service: ApiService, keys: tuple[str, ...]) -> None:
        self._gateway = gateway
        self._service = service
        self._keys = tuple(key.encode() for key in keys)

    def _authorize(self, request: web.Request) -> None:
        if not self._keys:
            raise Unauthorized("the server API is disabled: configure api.keys")
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        presented = value.strip().encode()
        # Compare against every key, always, so timing reveals nothing.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(presented, key)
        if scheme.lower() != "bearer" or not matched:
            raise Unauthorized("missing or invalid API key")

    async def _body(self, request: web.Request) -> Any:
        self._authorize(request)
        return loads(await request.read())

    async def publish(self, request: web.Request) -> web.Response:
        return json_response(await self._service.publish(await self._body(request)))

    async def batch(self, request: web.Request) -> web.Response:
        return json_response(await self._service.batch(await self._body(request)))

    async def disconnect(self, request: web.Request) -> web.Response:
        return json_response(await self._service.disconnect(await self._body(request)))

    async def channels(self, request: web.Request) -> web.Response:
        self._authorize(request)
        return json_response(await self._service.channels(request.query.get("prefix", "")))

    async def history(self, request: web.Request) -> web.Response:
        self._authorize(request)
        query = request.query
        body = await self._service.history(
            request.match_info["channel"], query.get("since"), query.get("limit")
        )
        return json_response(body)

    async def presence(self, request: web.Request) -> web.Response:
        self._authorize(request)
        return json_response(await self._service.presence(request.match_info["channel"]))

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        if self._gateway.draining:
            return json_response({"status": "draining"}, 503)
        if not self._gateway.healthy:
            # The heartbeat/expiry sweep is down until its restart: take no new clients.
            return json_response({"status": "background loop down"}, 503)
        if not await self._gateway.check_broker():
            return json_response({"status": "broker unavailable"}, 503)
        return json_response({"status": "ready"})

    async def metrics(self, request: web.Request) -> web.Response:
        # tidings_broker_up as of now, not as of the last periodic check.
        await self._gateway.check_broker()
        body = self._gateway.metrics.render()
        response = web.Response(body=body)
        response.headers["Content-Type"] = self._gateway.metrics.content_type
        return response


def add_api_routes(
    app: web.Application,
    gateway: HealthHost,
    service: ApiService,
    keys: tuple[str, ...],
    telemetry: Telemetry | None = None,
) -> None:
    """Register the server API, health, readiness and metrics routes; ``telemetry``
    traces the server API's (``/api/...``), not the probes' nor the scrapes'."""
    api = _Api(gateway, service, keys)
    tracer = telemetry or Telemetry()

    def warn(kind: str, reason: str) -> None:
        gateway.outages.warn(kind, reason)

    posts = {
        "/api/publish": api.publish,
        "/api/batch": api.batch,
        "/api/disconnect": api.disconnect,
    }
    gets = {
        "/api/channels": api.channels,
        "/api/channels/{channel}/history": api.history,
        "/api/channels/{channel}/presence": api.presence,
        "/healthz": api.healthz,
        "/readyz": api.readyz,
        "/metrics": api.metrics,
    }
    for routes, add in ((posts, app.router.add_post), (gets, app.router.add_get)):
        for path, handler in routes.items():
            guarded = json_errors(handler, warn)
            add(path, tracer.api_route(path, guarded) if path.startswith("/api/") else guarded)
            app.router.add_route("*", path, method_not_allowed)


def add_not_found_route(app: web.Application) -> None:
    """Answer every path no other route serves with a JSON 404; register it last."""
    app.router.add_route("*", "/{tail:.*}", not_found)
