"""Request bodies a client breaks end in a 400 or a quiet close, never in a 500, a hang or
a traceback in the log: a body that does not decode from its ``Content-Encoding``, chunked
framing that breaks after the head, a client that leaves in the middle of its body.

Raw sockets against a real server, as an HTTP library would refuse to send such bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiohttp import web

from helpers import API_KEY, TIMEOUT, serve, token
from tidings.api import http as api_http
from tidings.server import RunningServer

pytestmark = pytest.mark.timeout(30)

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Capture every record; after the test, none may be an error or carry a traceback."""
    caplog.set_level(logging.DEBUG)
    yield caplog
    # get_records: after the yield, caplog.records holds the teardown's records only.
    bad = [r for r in caplog.get_records("call") if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [f"{r.name}: {r.getMessage()}" for r in bad]


@contextlib.asynccontextmanager
async def raw(server: RunningServer) -> AsyncIterator[Stream]:
    """A plain TCP connection to the server, closed on exit."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, Any]]:
    """One HTTP response with a Content-Length and a JSON body: its status and body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    status = int(head.split(b" ", 2)[1])
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    assert length is not None, head
    assert re.search(rb"(?i)\r\ncontent-type: *application/json", head), head
    body = await asyncio.wait_for(reader.readexactly(int(length.group(1))), TIMEOUT)
    return status, json.loads(body)


def head(path: str, credential: str, fields: str) -> bytes:
    """A POST request head to ``path`` with a bearer credential and extra ``fields``."""
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {credential}\r\n"
        f"Content-Type: application/json\r\n{fields}\r\n"
    ).encode()


def reading_body(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """An event set when a server API handler starts reading its request body: the head
    has been parsed, so bytes sent from then on arrive after it."""
    started = asyncio.Event()
    original: Callable[[Any, web.Request], Awaitable[Any]] = api_http._Api._body

    async def body(self: Any, request: web.Request) -> Any:
        started.set()
        return await original(self, request)

    monkeypatch.setattr(api_http._Api, "_body", body)
    return started


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
@pytest.mark.parametrize("route", ["/api/publish", "/sse/commands"])
async def test_body_that_does_not_decode_is_400(
    records: pytest.LogCaptureFixture, route: str, encoding: str
) -> None:
    """A body that is not in its ``Content-Encoding`` is 400 ``invalid_request`` (JSON)
    and the connection is closed, with one log line and no traceback."""
    credential = API_KEY if route.startswith("/api") else token("u1")
    body = b"this is not compressed"
    async with serve() as server, raw(server) as (reader, writer):
        writer.write(
            head(
                route,
                credential,
                f"Content-Encoding: {encoding}\r\nContent-Length: {len(body)}\r\n",
            )
            + body
        )
        status, answer = await read_response(reader)
        assert status == 400, answer
        assert answer["error"]["code"] == "invalid_request"
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    assert [
        r
        for r in records.records
        if "could not be read" in r.getMessage() and r.name == "tidings.api.http"
    ]


async def test_chunked_framing_broken_after_the_head_is_400(
    records: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk size that is not hex, arriving after the head has been handled, is
    answered 400 ``invalid_request`` at once instead of leaving the request waiting on
    its body until the client gives up."""
    started = reading_body(monkeypatch)
    async with serve() as server, raw(server) as (reader, writer):
        writer.write(head("/api/publish", API_KEY, "Transfer-Encoding: chunked\r\n"))
        await asyncio.wait_for(started.wait(), TIMEOUT)
        writer.write(b"zz\r\n{}\r\n0\r\n\r\n")
        status, answer = await read_response(reader)
        assert status == 400, answer
        assert answer["error"]["code"] == "invalid_request"
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""


class _Watch(logging.Handler):
    """Sets ``seen`` on the first record of the logger it is attached to."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen = asyncio.Event()
        self.first: logging.LogRecord | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.first is None:
            self.first = record
        self.seen.set()


async def test_client_leaving_in_the_middle_of_its_body_is_not_an_error(
    records: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that closes its connection before its body is complete leaves a debug
    line, not an error with a traceback, and the server goes on serving."""
    started = reading_body(monkeypatch)
    watch = _Watch()
    api_logger = logging.getLogger("tidings.api.http")
    api_logger.addHandler(watch)
    try:
        async with serve() as server:
            async with raw(server) as (_, writer):
                writer.write(
                    head("/api/publish", API_KEY, "Content-Length: 100\r\n") + b'{"channel":'
                )
                await asyncio.wait_for(started.wait(), TIMEOUT)
            await asyncio.wait_for(watch.seen.wait(), TIMEOUT)
            assert watch.first is not None
            assert watch.first.levelno == logging.DEBUG, watch.first.getMessage()
            assert "closed the connection" in watch.first.getMessage()
            async with raw(server) as (reader, writer):
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                status, _ = await read_response(reader)
                assert status == 200
    finally:
        api_logger.removeHandler(watch)
