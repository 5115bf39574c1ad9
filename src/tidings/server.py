"""Build a Tidings server from settings and run it: the edge where parts are wired."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from aiohttp import web
from aiohttp.log import access_logger

from tidings.api import ApiService, add_api_routes, add_not_found_route, method_not_allowed
from tidings.api.http import json_errors
from tidings.auth import Authenticator
from tidings.brokers.base import Broker, NodeRelay
from tidings.brokers.memory import MemoryBroker
from tidings.brokers.redis.urls import is_redis_url, redact_url
from tidings.channels import Authorizer, ChannelPolicy
from tidings.config import Settings
from tidings.console import add_client_route, add_console_routes
from tidings.errors import ConfigError
from tidings.gateway import Gateway
from tidings.metrics import Metrics
from tidings.telemetry import Telemetry, make_telemetry
from tidings.transport import websocket_handler
from tidings.transport.http import AppRunner, QuietProbesAccessLogger, TCPSite
from tidings.transport.sse import sse_handler
from tidings.transport.sse_commands import SseCommands

__all__ = [
    "DevCredentials",
    "ListenError",
    "RunningServer",
    "add_sse_routes",
    "build_app",
    "make_broker",
    "prepare_dev",
    "running",
    "tune_gc",
]

logger = logging.getLogger(__name__)


class ListenError(OSError):
    """A listener could not be opened; ``address`` and ``keys`` name which one (the public
    or the internal listener), so that the error points at the setting to change."""

    def __init__(self, cause: OSError, host: str, port: int, keys: str) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.address = f"{host}:{port}"
        self.keys = keys

    def __str__(self) -> str:
        return f"cannot listen on {self.address} ({self.keys}): {self.strerror}"


async def _start(site: TCPSite, host: str, port: int, keys: str) -> None:
    try:
        await site.start()
    except OSError as exc:
        raise ListenError(exc, host, port, keys) from exc


@dataclass(frozen=True, slots=True)
class DevCredentials:
    """What development mode generated for this run."""

    secret: str
    api_key: str


def prepare_dev(settings: Settings) -> tuple[Settings, DevCredentials | None]:
    """In development mode, fill in a generated secret and API key where none is set."""
    if not settings.dev_mode:
        return settings, None
    secret = settings.auth.secret or secrets.token_urlsafe(32)
    api_key = settings.api.keys[0] if settings.api.keys else "dev_" + secrets.token_urlsafe(24)
    updated = settings.model_copy(
        update={
            # Pinned: settings not made by load_settings may still say "auto", which outside
            # load_settings means production.
            "server": settings.server.model_copy(update={"mode": "development"}),
            "auth": settings.auth.model_copy(update={"secret": secret}),
            "api": settings.api.model_copy(update={"keys": settings.api.keys or (api_key,)}),
        }
    )
    return updated, DevCredentials(secret, api_key)


def tune_gc() -> None:
    """Garbage-collector settings for a long-running server process (call once started).

    Every handshake allocates many short-lived objects, and with the default gen-0
    threshold (700) the collector ran about every 8 handshakes and re-scanned everything
    the server had built at start-up: about a fifth of a handshake's CPU in profiles.
    Freezing moves start-up objects out of future scans; the higher thresholds keep
    collecting cycles, less often.
    """
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


def make_broker(settings: Settings) -> Broker:
    """The broker named by ``broker.url``."""
    url = settings.broker.url
    if url.startswith("memory://"):
        return MemoryBroker(
            history_size=settings.history.size,
            history_ttl=settings.history.ttl,
            idempotency_window=settings.api.idempotency_window,
        )
    if is_redis_url(url):
        from tidings.brokers.redis import RedisBroker  # imported only when used

        try:
            return RedisBroker.from_settings(settings)
        except ValueError as exc:  # a malformed URL (port, query options)
            raise ConfigError("broker.url", f"invalid Redis URL: {exc}") from None
    raise ConfigError("broker.url", f"unsupported broker URL scheme in {url.split('://')[0]}://")


def build_app(
    settings: Settings,
    *,
    broker: Broker | None = None,
    authorizers: Mapping[str, Authorizer] | None = None,
    metrics: Metrics | None = None,
    telemetry: Telemetry | None = None,
) -> tuple[web.Application, Gateway]:
    """The aiohttp application serving the WebSocket path, the server API and probes.

    ``metrics``: the worker's shared-mode metrics under ``--workers``; default, its own.
    ``telemetry``: default, ``make_telemetry(settings)``, closed with the application
    (one given is the caller's to close).
    """
    owned = telemetry is None
    telemetry = make_telemetry(settings) if telemetry is None else telemetry
    gateway = Gateway(
        settings,
        broker=broker or make_broker(settings),
        metrics=metrics,
        telemetry=telemetry,
        authenticator=Authenticator(
            settings.auth,
            dev_mode=settings.dev_mode,
            # Only webhook rules and Python authorizers read the claims.
            keep_claims=bool(authorizers)
            or any(ns.rule == "webhook" for ns in settings.namespaces.values()),
        ),
        policy=ChannelPolicy(settings.namespaces, callables=authorizers),
    )
    app = web.Application(client_max_size=settings.api.max_body_bytes)
    # No middleware, on purpose: it would add suspended frames to every idle WebSocket
    # connection. API routes carry their own JSON error handling (api.http.json_errors).
    app.router.add_get(settings.server.path, websocket_handler(gateway))
    app.router.add_route("*", settings.server.path, method_not_allowed)
    add_sse_routes(app, gateway, serve_relay=True)
    add_api_routes(
        app,
        gateway,
        ApiService(settings, gateway.broker, gateway.metrics, telemetry),
        settings.api.keys,
        telemetry,
    )
    add_client_route(app)
    if settings.console_enabled:
        dev_key = settings.api.keys[0] if settings.dev_mode and settings.api.keys else None
        add_console_routes(app, settings, dev_api_key=dev_key)
    add_not_found_route(app)

    async def start(_: web.Application) -> None:
        await gateway.start()

    async def stop(_: web.Application) -> None:
        await gateway.close()
        if owned:
            await telemetry.close()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app, gateway


def add_sse_routes(app: web.Application, gateway: Gateway, *, serve_relay: bool) -> None:
    """The SSE stream and its commands (unless ``server.sse_path`` is empty); with
    ``serve_relay`` this app's handler also answers commands relayed by other nodes."""
    path = gateway.settings.server.sse_path
    if not path:
        return
    relay = getattr(gateway.broker, "relay", None)
    relay = relay if isinstance(relay, NodeRelay) else None
    commands = SseCommands(gateway, relay)
    if serve_relay and relay is not None:
        relay.serve(commands.answer)
    app.router.add_get(path, sse_handler(gateway, relay.node_id if relay else None))
    app.router.add_route("*", path, method_not_allowed)
    app.router.add_post(
        path + "/commands",
        json_errors(commands.post, lambda kind, reason: gateway.outages.warn(kind, reason)),
    )
    app.router.add_route("OPTIONS", path + "/commands", commands.preflight)
    app.router.add_route("*", path + "/commands", method_not_allowed)


def _public_app(settings: Settings, gateway: Gateway) -> web.Application:
    """The public listener's application when ``server.internal_port`` is set: the
    WebSocket path and the browser client only (every other path answers 404)."""
    app = web.Application(client_max_size=settings.api.max_body_bytes)
    app.router.add_get(settings.server.path, websocket_handler(gateway))
    app.router.add_route("*", settings.server.path, method_not_allowed)
    add_sse_routes(app, gateway, serve_relay=False)
    add_client_route(app)
    add_not_found_route(app)
    return app


def _ssl_context(settings: Settings) -> ssl.SSLContext | None:
    server = settings.server
    if not server.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(server.tls_cert, server.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("server.tls_cert", f"cannot load certificate and key: {exc}") from None
    return context


@dataclass(slots=True)
class RunningServer:
    """A started server: where it listens and its gateway."""

    settings: Settings
    gateway: Gateway
    host: str
    port: int
    tls: bool
    #: The internal listener's port (``server.internal_port``), or None when there is none.
    internal_port: int | None = None

    @property
    def http_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        """Where the server API, probes, metrics and console are: the internal listener
        when there is one, else the public one."""
        if self.internal_port is None:
            return self.http_url
        host = self.settings.server.internal_host
        return f"{'https' if self.tls else 'http'}://{host}:{self.internal_port}"

    @property
    def ws_url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://{self.host}:{self.port}{self.settings.server.path}"


@contextlib.asynccontextmanager
async def running(
    settings: Settings,
    *,
    broker: Broker | None = None,
    authorizers: Mapping[str, Authorizer] | None = None,
    reuse_port: bool = False,
    metrics: Metrics | None = None,
    telemetry: Telemetry | None = None,
) -> AsyncIterator[RunningServer]:
    """Serve until the block exits, then drain: readiness fails, clients get 1001.

    ``telemetry`` as in ``build_app``."""
    context = _ssl_context(settings)
    app, gateway = build_app(
        settings, broker=broker, authorizers=authorizers, metrics=metrics, telemetry=telemetry
    )
    # Access lines are logged at info: below that level, skip the per-request logger.
    quiet = settings.logging.level in ("warning", "error")

    def runner_for(application: web.Application) -> AppRunner:
        return AppRunner(
            application,
            handle_signals=False,
            shutdown_timeout=settings.server.shutdown_timeout,
            access_log=None if quiet else access_logger,
            access_log_class=QuietProbesAccessLogger,
            # Request heads share the WebSocket handshake's deadline.
            head_timeout=settings.server.handshake_timeout,
            on_head_timeout=gateway.metrics.request_head_timeouts.inc,
        )

    server_settings = settings.server
    # With an internal listener, the full application (the console needs /ws next to the
    # API) serves it, and the public port gets one with /ws and the browser client only.
    # Two runners, both the head-timing AppRunner; the full app's own (which starts and
    # stops the gateway) is set up first and cleaned up last.
    runner = runner_for(app)
    public = (
        runner
        if server_settings.internal_port is None
        else runner_for(_public_app(settings, gateway))
    )
    listening, drain_started = False, 0.0
    async with contextlib.AsyncExitStack() as stack:
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        if public is not runner:
            await public.setup()
            stack.push_async_callback(public.cleanup)
        handshake = server_settings.handshake_timeout
        site = TCPSite(
            public,
            server_settings.host,
            server_settings.port,
            ssl_context=context,
            reuse_port=reuse_port or None,
            handshake_timeout=handshake,
        )
        await _start(site, server_settings.host, server_settings.port, "server.host, server.port")
        internal_port: int | None = None
        if public is not runner:
            internal = TCPSite(
                runner,
                server_settings.internal_host,
                server_settings.internal_port,
                ssl_context=context,
                reuse_port=reuse_port or None,
                handshake_timeout=handshake,
            )
            await _start(
                internal,
                server_settings.internal_host,
                server_settings.internal_port or 0,
                "server.internal_host, server.internal_port",
            )
            internal_port = int(runner.addresses[0][1])
        port = public.addresses[0][1]
        server = RunningServer(
            settings, gateway, server_settings.host, int(port), context is not None, internal_port
        )
        _log_listening(server)
        listening = True
        yield server
        gateway.draining = True
        drain_started = time.monotonic()
        logger.info(
            "draining %d connections%s",
            gateway.hub.connection_count(),
            f" (readiness fails {server_settings.drain_delay:g} s before they are closed with 1001)"
            if server_settings.drain_delay
            else " (closing them with 1001)",
        )
        if server_settings.drain_delay:
            await asyncio.sleep(server_settings.drain_delay)
        gateway.close_all()
        if not await gateway.wait_idle(server_settings.shutdown_timeout):
            logger.warning(
                "%d connections still open after the shutdown timeout (%g s)",
                gateway.hub.connection_count(),
                server_settings.shutdown_timeout,
            )
    if listening:
        logger.info("stopped (%.1f s after draining began)", time.monotonic() - drain_started)


def _log_listening(server: RunningServer) -> None:
    """The operator's start-up line: where, in which mode, on which broker."""
    settings = server.settings
    internal = (
        f", server API, probes and metrics on {server.api_url}"
        if server.internal_port is not None
        else ""
    )
    logger.info(
        "listening on %s (WebSocket path %s)%s; %s mode; broker %s",
        server.http_url,
        settings.server.path,
        internal,
        "development" if settings.dev_mode else "production",
        redact_url(settings.broker.url),
    )
