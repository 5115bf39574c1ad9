"""Build a Tidings server from settings and run it: the edge where parts are wired."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import secrets
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from aiohttp import web
from aiohttp.log import access_logger

from tidings.api import ApiService, add_api_routes, add_not_found_route, method_not_allowed
from tidings.auth import Authenticator
from tidings.brokers.base import Broker
from tidings.brokers.memory import MemoryBroker
from tidings.brokers.redis.urls import is_redis_url
from tidings.channels import Authorizer, ChannelPolicy
from tidings.config import Settings
from tidings.console import add_client_route, add_console_routes
from tidings.errors import ConfigError
from tidings.gateway import Gateway
from tidings.transport import websocket_handler
from tidings.transport.http import AppRunner

__all__ = [
    "DevCredentials",
    "RunningServer",
    "build_app",
    "make_broker",
    "prepare_dev",
    "running",
    "tune_gc",
]

logger = logging.getLogger(__name__)


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
    updated = settings.model_copy(update={
        # Pinned: with a generated secret filled in, "auto" would no longer mean development.
        "server": settings.server.model_copy(update={"mode": "development"}),
        "auth": settings.auth.model_copy(update={"secret": secret}),
        "api": settings.api.model_copy(update={"keys": settings.api.keys or (api_key,)}),
    })
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
) -> tuple[web.Application, Gateway]:
    """The aiohttp application serving the WebSocket path, the server API and probes."""
    gateway = Gateway(
        settings,
        broker=broker or make_broker(settings),
        authenticator=Authenticator(
            settings.auth,
            dev_mode=settings.dev_mode,
            # Only webhook rules and Python authorizers read the claims.
            keep_claims=bool(authorizers) or any(
                ns.rule == "webhook" for ns in settings.namespaces.values()),
        ),
        policy=ChannelPolicy(settings.namespaces, callables=authorizers),
    )
    app = web.Application(
        client_max_size=settings.api.max_body_bytes
    )
    # No middleware, on purpose: it would add suspended frames to every idle WebSocket
    # connection. API routes carry their own JSON error handling (api.http.json_errors).
    app.router.add_get(settings.server.path, websocket_handler(gateway))
    app.router.add_route("*", settings.server.path, method_not_allowed)
    add_api_routes(app, gateway, ApiService(settings, gateway.broker, gateway.metrics),
                   settings.api.keys)
    add_client_route(app)
    if settings.console_enabled:
        dev_key = settings.api.keys[0] if settings.dev_mode and settings.api.keys else None
        add_console_routes(app, settings, dev_api_key=dev_key)
    add_not_found_route(app)

    async def start(_: web.Application) -> None:
        await gateway.start()

    async def stop(_: web.Application) -> None:
        await gateway.close()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app, gateway


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

    @property
    def http_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

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
) -> AsyncIterator[RunningServer]:
    """Serve until the block exits, then drain: readiness fails, clients get 1001."""
    context = _ssl_context(settings)
    app, gateway = build_app(settings, broker=broker, authorizers=authorizers)
    # Access lines are logged at info: below that level, skip the per-request logger.
    quiet = settings.logging.level in ("warning", "error")
    runner = AppRunner(app, handle_signals=False,
                       shutdown_timeout=settings.server.shutdown_timeout,
                       access_log=None if quiet else access_logger,
                       # Request heads share the WebSocket handshake's deadline.
                       head_timeout=settings.server.handshake_timeout,
                       on_head_timeout=gateway.metrics.request_head_timeouts.inc)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.server.host, settings.server.port,
                           ssl_context=context, reuse_port=reuse_port or None)
        await site.start()
        port = runner.addresses[0][1]
        yield RunningServer(settings, gateway, settings.server.host, int(port), context is not None)
        gateway.draining = True
        if settings.server.drain_delay:
            await asyncio.sleep(settings.server.drain_delay)
        gateway.close_all()
        if not await gateway.wait_idle(settings.server.shutdown_timeout):
            logger.warning("connections still open after the shutdown timeout")
    finally:
        await runner.cleanup()


async def serve_until(stop: asyncio.Event, settings: Settings,
                      on_ready: object = None) -> None:
    """Run a server until ``stop`` is set (the CLI sets it on SIGTERM/SIGINT)."""
    async with running(settings) as server:
        if callable(on_ready):
            on_ready(server)
        await stop.wait()
