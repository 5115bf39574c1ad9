"""No token, API key or secret reaches the logs of a real server, whatever path logs it."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from deploy_support import config_text, free_port, tidings_process, until
from helpers import API_KEY, SECRET, TIMEOUT, api, connect, serve, token, ws_until_close
from redis_support import REDIS_URL
from tidings import jwks
from tidings.brokers.redis import urls
from tidings.logs import Redactor, configure_logging, redact_url
from tidings.server import RunningServer

#: Claim value inside the good tokens: the decoded claims must not be logged either.
CLAIM_MARK = "zqCLAIMMARKzq"


@contextlib.contextmanager
def captured_logs(fmt: str) -> Iterator[io.StringIO]:
    """Route every log record through Tidings' redacting handler into a string buffer,
    restoring the root logger's handlers and level afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    stream = io.StringIO()
    handler = configure_logging("debug", fmt, secrets=[SECRET, API_KEY], stream=stream)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        for old in saved_handlers:
            root.addHandler(old)
        root.setLevel(saved_level)


@contextlib.asynccontextmanager
async def webhook_answering(status: int) -> AsyncIterator[str]:
    """A real HTTP authorizer answering ``status`` to every request; yields its base URL."""

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=status)

    app = web.Application()
    app.router.add_post("/authorize", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def _raw_http(server: RunningServer, request: bytes) -> bytes:
    """Send raw bytes to the server and read its whole answer."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), TIMEOUT)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _rejected_ws(
    server: RunningServer, *, query: str = "", headers: dict[str, str] | None = None
) -> int | None:
    """Connect with a token the server must refuse; return the close code it sent."""
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(server.ws_url + query, headers=headers or {}) as ws,
    ):
        messages, code = await ws_until_close(ws)
        assert [m["data"]["code"] for m in messages] == ["unauthorized"]
        return code


async def _too_long_for_aiohttp(
    server: RunningServer, *, query: str = "", headers: dict[str, str] | None = None
) -> None:
    """A request line or header over aiohttp's 8190-byte limit is refused with 400."""
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as raised:
            async with session.ws_connect(server.ws_url + query, headers=headers or {}):
                pass
        assert raised.value.status == 400


@pytest.mark.parametrize("fmt", ["json", "text"])
async def test_no_secret_reaches_the_logs(fmt: str) -> None:
    """Tokens (good, bad, huge, in URL or header), API keys and the secret never appear
    in the log output, while the requests that carried them are logged."""
    good_query = token("redact-query", ("orders:*",), note=CLAIM_MARK)
    good_header = token("redact-header", note=CLAIM_MARK)
    refresh_bad = "eyJREFRESHMARK." + "r" * 30 + ".sig"
    bad_jwtish = "eyJMARKERBAD" + "b" * 40 + ".e30.c2ln"
    bad_plain = "PLAINBADMARK-" + "p" * 20
    header_bad = "HEADERBADMARK_" + "h" * 20
    mid_long = "eyJMIDLONGMARK" + "m" * 7900  # fits aiohttp, refused by auth
    huge_query = "HUGEQUERYMARK" + "q" * 20000  # request line over 8190 bytes
    huge_jwtish = "eyJHUGEJWTMARK" + "j" * 20000
    huge_header = "HUGEHEADERMARK" + "h" * 20000  # header field over 8190 bytes
    wrong_key = "WRONGKEYMARK-0123456789"
    raw_bad = "RAWLINEMARK" + "w" * 9000
    markers = [
        CLAIM_MARK,
        "REFRESHMARK",
        "MARKERBAD",
        "PLAINBADMARK",
        "HEADERBADMARK",
        "MIDLONGMARK",
        "HUGEQUERYMARK",
        "HUGEJWTMARK",
        "HUGEHEADERMARK",
        "WRONGKEYMARK",
        "RAWLINEMARK",
        "HOOKURLMARK",
        SECRET,
        API_KEY,
    ]
    secrets = [
        good_query,
        good_header,
        refresh_bad,
        bad_jwtish,
        bad_plain,
        header_bad,
        mid_long,
        huge_query,
        huge_jwtish,
        huge_header,
        wrong_key,
        raw_bad,
    ]

    with captured_logs(fmt) as stream:
        async with webhook_answering(500) as hook:
            namespaces = {
                "default": {"rule": "claims"},
                "orders": {"rule": "webhook", "url": f"{hook}/authorize?sig=HOOKURLMARK"},
            }
            async with serve({"namespaces": namespaces}) as server:
                # Good tokens, in the query and in the header; a failing webhook; a bad
                # refresh that closes the connection.
                async with connect(server, good_header, query=False) as client:
                    await client.send("ping", id="p")
                    assert (await client.recv())["type"] == "pong"
                async with connect(server, good_query) as client:
                    reply = await client.subscribe("orders:42")
                    assert reply["type"] == "error", reply
                    assert reply["data"]["code"] == "subscription_failed"
                    await client.send("refresh", {"token": refresh_bad}, id="r")
                    messages, code = await ws_until_close(client.ws)
                    assert code == 4401, messages
                # Refused tokens: JWT-like, plain, in the header, long but acceptable
                # to aiohttp.
                assert await _rejected_ws(server, query=f"?token={bad_jwtish}") == 4401
                assert await _rejected_ws(server, query=f"?x=1&token={bad_plain}") == 4401
                assert (
                    await _rejected_ws(server, headers={"Authorization": f"Bearer {header_bad}"})
                    == 4401
                )
                assert await _rejected_ws(server, query=f"?token={mid_long}") == 4401
                # Requests aiohttp itself refuses: it logs the start of the bad line.
                await _too_long_for_aiohttp(server, query=f"?token={huge_query}")
                await _too_long_for_aiohttp(server, query=f"?token={huge_jwtish}")
                await _too_long_for_aiohttp(
                    server, headers={"Authorization": f"Bearer {huge_header}"}
                )
                answer = await _raw_http(
                    server, f"GET /ws?token={raw_bad} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                )
                assert answer.startswith(b"HTTP/1.") and b" 400 " in answer[:20]
                # The server API: a wrong key, the right key, and both secrets in a URL.
                status, _ = await api(server, "GET", "/api/channels", key=wrong_key)
                assert status == 401
                status, _ = await api(
                    server,
                    "POST",
                    "/api/publish",
                    {
                        "channel": "news:a",
                        "type": "notification",
                        "data": {"message": "m", "level": "info"},
                    },
                )
                assert status == 200
                status, _ = await api(server, "GET", f"/healthz?key={API_KEY}&s={SECRET}", key=None)
                assert status == 200
        text = stream.getvalue()

    lines = text.splitlines()
    assert len(lines) > 10, text
    for marker in markers:
        assert marker not in text, f"{marker[:40]!r} leaked into the logs"
    for secret in secrets:
        for part in secret.split("."):
            assert part not in text, f"part of a token leaked: {part[:40]!r}"
    # The capture really covered every path that handled a token.
    assert "token=[redacted]" in text
    assert text.count("aiohttp.access") >= 10
    assert text.count("bad request from") == 4  # the requests aiohttp cannot parse
    assert "Error handling request" not in text
    assert "Traceback" not in text
    assert "webhook authorizer failed" in text
    assert "connection rejected" in text
    assert "refresh rejected" in text
    if fmt == "json":
        records = [json.loads(line) for line in lines if line.startswith("{")]
        assert len(records) == len([line for line in lines if line.startswith("{")])
        loggers = {record["logger"] for record in records}
        assert {"aiohttp.access", "tidings.server", "tidings.channels"} <= loggers


def test_library_loggers_reach_the_redacting_handler() -> None:
    """No logger that can see a token writes anywhere but through the root handler."""
    with captured_logs("json"):
        names = [
            "aiohttp",
            "aiohttp.access",
            "aiohttp.server",
            "aiohttp.web",
            "aiohttp.websocket",
            "aiohttp.client",
            "asyncio",
            "tidings",
            "tidings.transport.websocket",
            "tidings.channels",
            "tidings.api.http",
            "tidings.auth",
            "tidings.gateway",
        ]
        for name in names:
            logger: logging.Logger | None = logging.getLogger(name)
            while logger is not None and logger is not logging.getLogger():
                assert logger.propagate, f"{logger.name} does not propagate"
                assert not logger.handlers, f"{logger.name} has its own handlers"
                logger = logger.parent
        assert len(logging.getLogger().handlers) == 1


def _percent_encoded(text: str) -> str:
    """Every character of ``text`` as a %XX escape (what ``unquote_plus`` undoes)."""
    return "".join(f"%{byte:02X}" for byte in text.encode())


@pytest.mark.parametrize(
    "spelling",
    [
        "tok%65n",
        "%74oken",
        "%74%6F%6B%65%6E",
        "TOKEN",
        "T%6fKeN",
        "tok%2565n",
        "refresh_token",
        "access%5Ftoken",
    ],
)
def test_redactor_decodes_parameter_names(spelling: str) -> None:
    """A query parameter whose name decodes to a token name, in any case or encoding,
    loses its value, however the value is encoded; the other parameters stay."""
    value = _percent_encoded("VALUEMARK.abc.def")
    out = Redactor()(f"GET /ws?a=1&{spelling}={value}&b=2 HTTP/1.1")
    assert out == f"GET /ws?a=1&{spelling}=[redacted]&b=2 HTTP/1.1"


@pytest.mark.parametrize(
    "text",
    [
        "GET /ws?tokens=3&toke=4&broken=5 HTTP/1.1",
        "level=info user=u-1 count=2",
        "a+b=c&%41=%42",
    ],
)
def test_redactor_keeps_other_parameters(text: str) -> None:
    """Parameters whose names do not decode to a token name are left as they are."""
    assert Redactor()(text) == text


async def test_percent_encoded_token_names_stay_out_of_the_access_log() -> None:
    """Tokens under percent-encoded parameter names authenticate, and neither they nor
    their encoded forms reach the access log: not from the request line and not from a
    page URL in the Referer header, which is logged as received."""
    plain = token("encoded-name", note=CLAIM_MARK)
    encoded = _percent_encoded(plain)
    dotted = "%65" + plain[1:].replace(".", "%2E")
    queries = [f"?tok%65n={encoded}", f"?x=1&%74oken={dotted}", f"?%74%6F%6B%65%6E={plain}"]
    with captured_logs("json") as stream:
        async with serve() as server:
            for query in queries:
                async with (
                    aiohttp.ClientSession() as session,
                    session.ws_connect(
                        server.ws_url + query, headers={"Referer": f"https://app.test/{query}"}
                    ) as ws,
                ):
                    hello = json.loads((await ws.receive(timeout=TIMEOUT)).data)
                    assert hello["type"] == "connected", hello
                    assert hello["data"]["user_id"] == "encoded-name"
        text = stream.getvalue()
    access = [json.loads(line)["msg"] for line in text.splitlines() if '"aiohttp.access"' in line]
    assert len([line for line in access if "app.test" in line]) == len(queries)
    for leaked in (plain, encoded, dotted, *plain.split("."), encoded[:60], dotted[:60]):
        assert leaked not in text, f"{leaked[:40]!r} leaked into the logs"
    assert text.count("=[redacted]") >= 2 * len(queries)


async def test_unparsable_requests_log_one_line_without_their_bytes() -> None:
    """A bad request line, an oversized request line, an oversized header and a bad
    header each log one line naming the problem, with no traceback and none of the
    request's bytes; each is answered 400."""
    bad = [
        b"G\x01T /ws?token=RAWMETHODMARK HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /ws?token=LONGLINEMARK" + b"q" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Big: LONGHEADERMARK" + b"h" * 9000 + b"\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: x\r\nBAD HEADERMARK: v\r\n\r\n",
    ]
    with captured_logs("json") as stream:
        async with serve() as server:
            for request in bad:
                answer = await _raw_http(server, request)
                assert answer.startswith(b"HTTP/1.") and b" 400 " in answer[:20], answer[:80]
        text = stream.getvalue()
    records = [json.loads(line) for line in text.splitlines()]
    failures = [r for r in records if r["msg"].startswith("bad request from")]
    assert len(failures) == len(bad), text
    assert {r["logger"] for r in failures} == {"tidings.server"}
    assert not any("exc" in r for r in records), text
    assert "Traceback" not in text and "Error handling request" not in text
    for marker in ("RAWMETHODMARK", "LONGLINEMARK", "LONGHEADERMARK", "HEADERMARK", "qqqq", "hhhh"):
        assert marker not in text, f"{marker} leaked into the logs"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "https://u:pw@keys.example/jwks.json?tenant=t-secret#frag",
            "https://u:***@keys.example/jwks.json",
        ),
        ("redis+cluster://u:a/b,c:d@h1:1,h2:2", "redis+cluster://u:***@h1:1,h2:2"),
        (
            "redis+sentinel://:p?w#d@s1:26380,s2/mymaster?db=4",
            "redis+sentinel://:***@s1:26380,s2/mymaster",
        ),
        ("redis://user@h:6379/0", "redis://user@h:6379/0"),
        ("http://[::1", "http://[::1"),
    ],
)
def test_one_url_redactor_masks_passwords_and_drops_queries(url: str, expected: str) -> None:
    """The single URL redactor, used for JWKS and broker URLs alike, masks the password and
    drops the query string and fragment, also for URLs that do not parse."""
    assert getattr(jwks, "redact_url") is urls.redact_url is redact_url  # noqa: B009
    assert redact_url(url) == expected


@pytest.mark.parametrize("workers", [1, 2])
async def test_every_process_redacts_every_configured_secret(
    workers: int, redis_prefix: str, tmp_path: Path
) -> None:
    """A real ``tidings serve`` (and each of its ``--workers`` processes) redacts the
    signing secret, the API keys and the webhook secret from its access lines."""
    webhook_secret = "webhook-secret-zq0123456789abcdefzq"
    port = free_port()
    config = (
        f"workers = {workers}\n"
        + config_text(port, broker=REDIS_URL).replace(
            "[broker]\n", f'[broker]\nprefix = "{redis_prefix}"\n'
        )
        + (f'[webhooks]\nurl = "http://127.0.0.1:9/hook"\nsecret = "{webhook_secret}"\n')
    )
    secrets = (SECRET, API_KEY, webhook_secret)
    async with tidings_process(tmp_path, config, port=port) as tidings:
        async with aiohttp.ClientSession() as http:
            for value in secrets:
                async with http.get(f"{tidings.http_url}/x-{value}") as answer:
                    assert answer.status == 404

        async def logged() -> bool:
            return sum("GET /x-" in str(line["msg"]) for line in tidings.log()) == 3

        await until(logged, TIMEOUT, "the three access lines")
        assert await tidings.terminate() == 0
    for value in secrets:
        assert value not in tidings.stderr(), value
    assert tidings.stderr().count("GET /x-[redacted]") == 3
