"""The browser client at ``/client/tidings.js`` and the live console at ``/console``.

Both are static files packaged in ``tidings/static``, read once when the routes are
added. The console page carries a small JSON configuration (the WebSocket path and, in
development mode only, the generated API key so that its publish form works at once) and
its icon inline; the same icon answers ``/favicon.ico`` (an SVG: browsers take it).
"""

from __future__ import annotations

import hashlib
import json
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

from tidings import __version__
from tidings.config import Settings

__all__ = [
    "CLIENT_PATH",
    "CONSOLE_PATH",
    "FAVICON_PATH",
    "add_client_route",
    "add_console_routes",
    "client_script",
]

CLIENT_PATH = "/client/tidings.js"
CONSOLE_PATH = "/console"
FAVICON_PATH = "/favicon.ico"

_JS = "text/javascript"
_CSS = "text/css"
_HTML = "text/html"
_SVG = "image/svg+xml"

#: The console needs its own scripts and styles, and WebSockets to any server the user
#: points it at; nothing else, and it is never framed.
_CONSOLE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss: http: https:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


@dataclass(frozen=True, slots=True)
class _Asset:
    body: bytes
    content_type: str
    etag: str
    headers: tuple[tuple[str, str], ...] = ()


def _static(name: str) -> bytes:
    return resources.files("tidings").joinpath("static", name).read_bytes()


def client_script() -> bytes:
    """The packaged copy of ``tidings.js``."""
    return _static("tidings.js")


def _asset(body: bytes, content_type: str, *headers: tuple[str, str]) -> _Asset:
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    return _Asset(body, content_type, etag, headers)


def _config_json(settings: Settings, dev_api_key: str | None) -> str:
    config: dict[str, object] = {
        "wsPath": settings.server.path,
        "devMode": settings.dev_mode,
        "version": __version__,
    }
    if dev_api_key:
        config["devApiKey"] = dev_api_key
    # Safe inside a <script> element: no "<", ">" or "&" survive as such.
    text = json.dumps(config, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _handler(asset: _Asset) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        headers = {
            "ETag": asset.etag,
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
            **dict(asset.headers),
        }
        if asset.etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        return web.Response(
            body=asset.body, content_type=asset.content_type, charset="utf-8", headers=headers
        )

    return handle


def add_client_route(app: web.Application) -> None:
    """Serve the browser client at ``/client/tidings.js`` (always on: pages load it)."""
    client = _asset(client_script(), _JS, ("Access-Control-Allow-Origin", "*"))
    app.router.add_get(CLIENT_PATH, _handler(client))


def add_console_routes(
    app: web.Application, settings: Settings, *, dev_api_key: str | None
) -> None:
    """Serve the live console (``/console`` and its assets)."""
    icon = _static("favicon.svg")
    # A data: URL (the page's CSP allows data: images): no request for the icon.
    icon_url = "data:image/svg+xml," + urllib.parse.quote(icon.decode().strip(), safe=":/=,")
    page = (
        _static("console.html")
        .decode()
        .replace("{{config}}", _config_json(settings, dev_api_key))
        .replace("{{favicon}}", icon_url)
    )
    html = _asset(
        page.encode(),
        _HTML,
        ("Content-Security-Policy", _CONSOLE_CSP),
        ("Referrer-Policy", "no-referrer"),
        ("X-Frame-Options", "DENY"),
        # The page may hold the development API key: never keep it in a cache.
        ("Cache-Control", "no-store"),
    )
    script = _asset(_static("console.js"), _JS)
    style = _asset(_static("console.css"), _CSS)
    favicon = _asset(icon, _SVG, ("Content-Security-Policy", "default-src 'none'"))
    app.router.add_get(CONSOLE_PATH, _handler(html))
    app.router.add_get(CONSOLE_PATH + "/console.js", _handler(script))
    app.router.add_get(CONSOLE_PATH + "/console.css", _handler(style))
    app.router.add_get(FAVICON_PATH, _handler(favicon))
