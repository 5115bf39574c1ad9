"""The browser client and console routes: content, types, caching, configuration, switch."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from helpers import API_KEY, serve
from tidings.config import load_settings
from tidings.console import client_script
from tidings.server import prepare_dev, running

REPO = Path(__file__).resolve().parent.parent
CLIENT_SOURCE = REPO / "clients" / "js" / "tidings.js"
STATIC = REPO / "src" / "tidings" / "static"
CONSOLE_ON = {"console": {"enabled": "on"}}


async def _get(url: str, headers: dict[str, str] | None = None
               ) -> tuple[int, Mapping[str, str], bytes]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        return response.status, response.headers, await response.read()


def _page_config(html: bytes) -> dict[str, Any]:
    pattern = rb'<script type="application/json" id="tidings-console-config">(.*?)</script>'
    match = re.search(pattern, html, re.S)
    assert match is not None, html[:500]
    config: dict[str, Any] = json.loads(match.group(1))
    return config


def test_packaged_client_is_identical_to_the_repository_copy() -> None:
    """The copy shipped in the package is byte-for-byte clients/js/tidings.js (no drift)."""
    assert client_script() == CLIENT_SOURCE.read_bytes(), (
        "src/tidings/static/tidings.js differs from clients/js/tidings.js: "
        "cp clients/js/tidings.js src/tidings/static/tidings.js"
    )


async def test_client_script_is_served_as_javascript() -> None:
    """GET /client/tidings.js answers the packaged module with a JavaScript type and CORS."""
    async with serve(CONSOLE_ON) as server:
        status, headers, body = await _get(server.http_url + "/client/tidings.js")
    assert status == 200
    assert headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert body == CLIENT_SOURCE.read_bytes()


async def test_client_script_revalidates_with_its_etag() -> None:
    """A request with the current ETag gets 304 and no body; a stale one gets the file."""
    async with serve(CONSOLE_ON) as server:
        url = server.http_url + "/client/tidings.js"
        _, headers, _ = await _get(url)
        etag = headers["ETag"]
        status, _, body = await _get(url, {"If-None-Match": etag})
        stale, _, full = await _get(url, {"If-None-Match": '"other"'})
    assert (status, body) == (304, b"")
    assert stale == 200 and full == CLIENT_SOURCE.read_bytes()


async def test_console_page_and_assets() -> None:
    """The console page, its script and its style are served with fitting types and headers."""
    async with serve(CONSOLE_ON) as server:
        status, headers, html = await _get(server.http_url + "/console")
        js_status, js_headers, script = await _get(server.http_url + "/console/console.js")
        css_status, css_headers, style = await _get(server.http_url + "/console/console.css")
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Cache-Control"] == "no-store"
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert headers["Referrer-Policy"] == "no-referrer"
    assert b'src="console/console.js"' in html
    assert js_status == 200 and js_headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert script == (STATIC / "console.js").read_bytes()
    assert b'from "../client/tidings.js"' in script
    assert css_status == 200 and css_headers["Content-Type"] == "text/css; charset=utf-8"
    assert style == (STATIC / "console.css").read_bytes()


async def test_console_config_in_production_has_no_api_key() -> None:
    """Outside development mode the page names the WebSocket path and carries no API key."""
    async with serve({**CONSOLE_ON, "server": {"path": "/realtime"}}) as server:
        _, _, html = await _get(server.http_url + "/console")
    config = _page_config(html)
    assert config["wsPath"] == "/realtime"
    assert config["devMode"] is False
    assert "devApiKey" not in config
    assert API_KEY.encode() not in html


async def test_console_in_development_mode_prefills_the_api_key() -> None:
    """In development mode the console is on by default and carries the generated API key."""
    async with serve({"server": {"mode": "development"}}) as server:
        status, _, html = await _get(server.http_url + "/console")
        client_status, _, _ = await _get(server.http_url + "/client/tidings.js")
    assert status == 200 and client_status == 200
    config = _page_config(html)
    assert config["devMode"] is True
    assert config["devApiKey"] == API_KEY


async def test_unconfigured_server_serves_the_console_with_its_generated_key() -> None:
    """`tidings serve` with no configuration (prepare_dev) keeps development mode: the
    console is on and pre-filled with the generated API key."""
    settings, dev = prepare_dev(load_settings(None, {"server": {"port": 0}}, environ={}))
    assert dev is not None
    assert settings.dev_mode and settings.console_enabled
    async with running(settings) as server:
        status, _, html = await _get(server.http_url + "/console")
    assert status == 200
    assert _page_config(html)["devApiKey"] == dev.api_key


async def test_console_config_cannot_break_out_of_its_script_element() -> None:
    """A path holding "</script>" is escaped inside the page's JSON configuration."""
    async with serve({**CONSOLE_ON, "server": {"path": "/ws</script><b>&"}}) as server:
        _, _, html = await _get(server.http_url + "/console")
    assert b"</script><b>" not in html
    assert _page_config(html)["wsPath"] == "/ws</script><b>&"


@pytest.mark.parametrize("setting", ["auto", "off"])
async def test_console_is_off_outside_development_mode_unless_switched_on(setting: str) -> None:
    """In production mode, with the console auto or off, the console is 404 while the
    client script stays served (applications load it from here)."""
    async with serve({"console": {"enabled": setting}}) as server:
        console, _, _ = await _get(server.http_url + "/console")
        client, _, _ = await _get(server.http_url + "/client/tidings.js")
    assert (console, client) == (404, 200)


async def test_console_off_wins_over_development_mode() -> None:
    """console.enabled = off hides the console even in development mode."""
    async with serve({"server": {"mode": "development"}, "console": {"enabled": "off"}}) as server:
        status, _, _ = await _get(server.http_url + "/console")
    assert status == 404


async def test_head_requests_are_answered() -> None:
    """HEAD on the client script answers 200 with its length and no body."""
    async with serve(CONSOLE_ON) as server, aiohttp.ClientSession() as session, \
            session.head(server.http_url + "/client/tidings.js") as response:
        assert response.status == 200
        assert int(response.headers["Content-Length"]) == len(CLIENT_SOURCE.read_bytes())
        assert await response.read() == b""
