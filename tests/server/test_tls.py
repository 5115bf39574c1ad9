"""TLS: wss:// and https:// with a self-signed certificate for 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from helpers import TIMEOUT, connect, make_settings, serve, token
from tidings.errors import ConfigError
from tls_support import https_api, self_signed


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    return self_signed(tmp_path)


@pytest.fixture
def client_context(tls_files: tuple[Path, Path]) -> ssl.SSLContext:
    """A client context that trusts exactly the test certificate and checks the host."""
    context = ssl.create_default_context(cafile=str(tls_files[0]))
    assert context.check_hostname and context.verify_mode is ssl.CERT_REQUIRED
    return context


def _tls(files: tuple[Path, Path]) -> dict[str, Any]:
    return {"server": {"tls_cert": str(files[0]), "tls_key": str(files[1])}}


async def test_wss_connect_subscribe_and_receive(
    tls_files: tuple[Path, Path], client_context: ssl.SSLContext
) -> None:
    """Over wss:// a client is welcomed, subscribes and gets an event published over https."""
    async with serve(_tls(tls_files)) as server:
        assert server.tls
        assert server.ws_url.startswith("wss://127.0.0.1:")
        assert server.http_url.startswith("https://127.0.0.1:")
        async with connect(server, token("u1", ("news:*",)), ssl=client_context) as client:
            reply = await client.subscribe("news:tls")
            assert reply["type"] == "subscribed"
            status, answer = await https_api(
                server,
                client_context,
                "POST",
                "/api/publish",
                {
                    "channel": "news:tls",
                    "type": "notification",
                    "data": {"message": "secure", "level": "success"},
                },
            )
            assert status == 200, answer
            event = await client.recv()
            assert event["type"] == "notification"
            assert event["channel"] == "news:tls"
            assert event["data"] == {"message": "secure", "level": "success"}
            assert event["id"] == answer["results"][0]["id"]
        status, answer = await https_api(server, client_context, "GET", "/healthz")
        assert status == 200, answer


async def test_token_in_header_over_wss(
    tls_files: tuple[Path, Path], client_context: ssl.SSLContext
) -> None:
    """The Authorization header works over wss:// as well."""
    async with (
        serve(_tls(tls_files)) as server,
        connect(server, token("u2"), query=False, welcome=False, ssl=client_context) as client,
    ):
        hello = await client.recv()
        assert hello["type"] == "connected"
        assert hello["data"]["user_id"] == "u2"


async def test_plain_ws_client_fails_against_tls(tls_files: tuple[Path, Path]) -> None:
    """A ws:// (plain text) client cannot talk to a TLS server."""
    async with serve(_tls(tls_files)) as server:
        plain = server.ws_url.replace("wss://", "ws://", 1) + f"?token={token('u1')}"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session:
            with pytest.raises(aiohttp.ClientError):
                async with session.ws_connect(plain):
                    pass
        # The server is unharmed.
        assert server.gateway.hub.connection_count() == 0


async def test_untrusted_certificate_is_refused(tls_files: tuple[Path, Path]) -> None:
    """A client with default trust rejects the self-signed certificate."""
    async with (
        serve(_tls(tls_files)) as server,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session,
    ):
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            async with session.ws_connect(server.ws_url + f"?token={token('u1')}"):
                pass


def test_cert_without_key_names_tls_key(tls_files: tuple[Path, Path]) -> None:
    """server.tls_cert without server.tls_key is a ConfigError naming server.tls_key."""
    with pytest.raises(ConfigError) as raised:
        make_settings({"server": {"tls_cert": str(tls_files[0])}})
    assert raised.value.key == "server.tls_key"


def test_key_without_cert_names_tls_key(tls_files: tuple[Path, Path]) -> None:
    """server.tls_key without server.tls_cert is also refused."""
    with pytest.raises(ConfigError) as raised:
        make_settings({"server": {"tls_key": str(tls_files[1])}})
    assert raised.value.key.startswith("server.tls_")


def test_missing_certificate_file_is_named(tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    """A tls_cert path that does not exist is a ConfigError naming server.tls_cert."""
    with pytest.raises(ConfigError) as raised:
        make_settings(
            {"server": {"tls_cert": str(tmp_path / "missing.pem"), "tls_key": str(tls_files[1])}}
        )
    assert raised.value.key == "server.tls_cert"


async def test_unusable_certificate_is_config_error(
    tmp_path: Path, tls_files: tuple[Path, Path]
) -> None:
    """A certificate file that is not PEM stops start-up with a ConfigError."""
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError) as raised:
        async with serve({"server": {"tls_cert": str(junk), "tls_key": str(tls_files[1])}}):
            pass
    assert raised.value.key.startswith("server.tls_")


async def test_a_stalled_tls_handshake_is_cut_at_the_handshake_timeout(
    tls_files: tuple[Path, Path],
) -> None:
    """A client that opens a TCP connection to the TLS port and never sends its
    ClientHello is disconnected after server.handshake_timeout, not asyncio's 60 s."""
    settings = _tls(tls_files)
    settings["server"]["handshake_timeout"] = 0.5
    async with serve(settings) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            # EOF (or a reset) well before the pytest timeout; asyncio's default is 60 s.
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        finally:
            writer.close()
