"""``server.internal_port``: the server API, probes, metrics and console on a second
listener, and only the WebSocket path and the browser client on the public one."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
import pytest

from helpers import API_KEY, SECRET, connect, make_settings, serve, token
from tidings.config import load_settings
from tidings.errors import ConfigError
from tidings.server import RunningServer, running
from timeouts import TIMEOUT

pytestmark = pytest.mark.timeout(30)

INTERNAL = {"server": {"internal_port": 0}, "console": {"enabled": "on"}}
PUBLISH = {
    "channel": "news:internal",
    "type": "notification",
    "data": {"message": "hi", "level": "info"},
}
#: Paths the internal listener takes away from the public port.
INTERNAL_PATHS = [
    ("POST", "/api/publish"),
    ("POST", "/api/batch"),
    ("POST", "/api/disconnect"),
    ("GET", "/api/channels"),
    ("GET", "/api/channels/news:x/history"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/console"),
]


async def _request(url: str, method: str = "GET", body: Any = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with (
        aiohttp.ClientSession() as http,
        http.request(
            method, url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=5)
        ) as response,
    ):
        return response.status, await response.text()


async def test_public_port_serves_only_the_websocket_path_and_the_client() -> None:
    """With an internal port, the public port answers 404 for the API, probes, metrics
    and console, and still serves /ws and /client/tidings.js."""
    async with serve(INTERNAL) as server:
        assert server.internal_port is not None and server.internal_port != server.port
        for method, path in INTERNAL_PATHS:
            status, _ = await _request(
                server.http_url + path, method, PUBLISH if method == "POST" else None
            )
            assert status == 404, (method, path, status)
        status, body = await _request(server.http_url + "/client/tidings.js")
        assert status == 200 and "Tidings" in body
        async with connect(server, token("u1", ("news:*",))) as client:
            reply = await client.subscribe("news:internal")
            assert reply["type"] == "subscribed", reply


async def test_internal_port_serves_the_api_probes_metrics_and_console() -> None:
    """The internal port answers the probes, metrics, console and a publish, and the
    event reaches a client connected on the public port."""
    async with serve(INTERNAL) as server, connect(server, token("u1", ("news:*",))) as client:
        assert server.api_url == f"http://127.0.0.1:{server.internal_port}"
        await client.subscribe("news:internal")
        for path in ("/healthz", "/readyz", "/metrics", "/console", "/client/tidings.js"):
            status, _ = await _request(server.api_url + path)
            assert status == 200, (path, status)
        status, body = await _request(server.api_url + "/api/publish", "POST", PUBLISH)
        assert status == 200, body
        event = await client.recv()
        assert event["type"] == "notification" and event["channel"] == "news:internal"
        status, text = await _request(server.api_url + "/metrics")
        assert "tidings_connections 1.0" in text


async def test_without_an_internal_port_one_port_serves_everything() -> None:
    """No internal port (the default): the API and probes stay on the public port."""
    async with serve() as server:
        assert server.internal_port is None and server.api_url == server.http_url
        for path in ("/healthz", "/readyz", "/metrics"):
            status, _ = await _request(server.http_url + path)
            assert status == 200, path


async def test_internal_readiness_fails_during_the_drain() -> None:
    """On shutdown the internal /readyz answers 503 during drain_delay, before the
    public client is closed with 1001."""
    settings = make_settings(
        {**INTERNAL, "server": {"internal_port": 0, "drain_delay": 1.0, "shutdown_timeout": 3}}
    )
    stack = contextlib.AsyncExitStack()
    server: RunningServer = await stack.enter_async_context(running(settings))
    stopping: asyncio.Task[Any] | None = None
    try:
        async with connect(server, token("u1")) as client:
            stopping = asyncio.create_task(stack.aclose())
            async with asyncio.timeout(TIMEOUT):
                while (await _request(server.api_url + "/readyz"))[0] != 503:
                    await asyncio.sleep(0.02)
            assert not client.ws.closed  # still open: drain_delay has not passed yet
            assert await client.expect_close() == 1001
        await asyncio.wait_for(stopping, TIMEOUT)
    finally:
        if stopping is None:
            await stack.aclose()


def test_internal_port_settings() -> None:
    """internal_port is optional, read from TOML keys or TIDINGS_SERVER__INTERNAL_PORT,
    and may not equal the public port."""
    base = {"server": {"mode": "production"}, "auth": {"secret": SECRET}}
    assert load_settings(None, base, environ={}).server.internal_port is None
    settings = load_settings(
        None,
        base,
        environ={
            "TIDINGS_SERVER__INTERNAL_PORT": "9000",
            "TIDINGS_SERVER__INTERNAL_HOST": "0.0.0.0",
        },
    )
    assert settings.server.internal_port == 9000
    assert settings.server.internal_host == "0.0.0.0"
    with pytest.raises(ConfigError) as error:
        load_settings(
            None,
            {**base, "server": {"mode": "production", "port": 8000, "internal_port": 8000}},
            environ={},
        )
    assert error.value.key == "server.internal_port"
    with pytest.raises(ConfigError) as error:
        load_settings(
            None, {**base, "server": {"mode": "production", "internal_port": 70000}}, environ={}
        )
    assert error.value.key == "server.internal_port"
