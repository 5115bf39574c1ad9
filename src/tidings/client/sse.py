"""The SSE transport of the Python client: an event stream that reads like a WebSocket.

``SseSocket`` gives ``Link`` the four calls it makes on a WebSocket (``receive``,
``send_str``, ``pong``, ``close``): each SSE ``message`` is a text message, a ``: ping``
comment counts as a frame (as a WebSocket ping would), the ``close`` event is the close
frame, and what the client sends goes as ``POST <sse path>/commands`` with the session
id from ``connected`` and the current token. Recovery is the client core's, as over the
WebSocket: after ``connected`` it subscribes again with ``recover``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

__all__ = ["SseRefused", "SseSocket", "sse_url"]

#: The close code a refused SSE request stands for (as the WebSocket would close).
_REFUSALS = {401: 4401, 403: 4403, 429: 4429, 503: 1013}


def sse_url(ws_url: str, path: str = "/sse") -> str:
    """The SSE URL of the server of ``ws_url`` (``ws``/``wss`` become ``http``/``https``,
    the path becomes ``path``, the query is kept)."""
    parts = urlsplit(ws_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urlunsplit(parts._replace(scheme=scheme, path=path))


class SseRefused(Exception):
    """The server answered the SSE request with an error: ``code`` is the close code the
    WebSocket would have used (None: none fits)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"SSE refused (HTTP {status}): {message}")
        self.code = _REFUSALS.get(status)
        self.message = message


class _Message:
    """What ``Link`` reads of an aiohttp ``WSMessage``."""

    __slots__ = ("data", "extra", "type")

    def __init__(self, kind: aiohttp.WSMsgType, data: Any = None, extra: Any = None) -> None:
        self.type, self.data, self.extra = kind, data, extra


class SseSocket:
    """One SSE stream; open with ``connect``."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        response: aiohttp.ClientResponse,
        commands_url: str,
        token: str,
    ) -> None:
        self._http = http
        self._response = response
        self._commands_url = commands_url
        self._token = token
        self.session_id: str | None = None

    @classmethod
    async def connect(
        cls, http: aiohttp.ClientSession, url: str, token: str, headers: dict[str, str]
    ) -> SseSocket:
        """Open the stream at ``url``; raises ``SseRefused`` or ``aiohttp.ClientError``."""
        sent = {**headers, "Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
        response = await http.get(url, headers=sent)
        if response.status != 200:
            try:
                body = await response.json()
                message = str(body["error"]["message"])
            except (ValueError, KeyError, TypeError, aiohttp.ClientError):
                message = response.reason or ""
            response.release()
            raise SseRefused(response.status, message)
        parts = urlsplit(url)
        commands = urlunsplit(parts._replace(path=parts.path + "/commands", query=""))
        return cls(http, response, commands, token)

    async def receive(
        self,
        timeout: float | None = None,  # noqa: ASYNC109 (aiohttp's call)
    ) -> _Message:
        """The next message; raises ``TimeoutError`` when none came in ``timeout``."""
        async with asyncio.timeout(timeout):
            return await self._next()

    async def _next(self) -> _Message:
        fields: dict[str, str] = {}
        content = self._response.content
        while True:
            try:
                raw = await content.readline()
            except aiohttp.ClientError as exc:
                return _Message(aiohttp.WSMsgType.ERROR, exc)
            if not raw:
                return _Message(aiohttp.WSMsgType.CLOSED)
            line = raw.decode().rstrip("\r\n")
            if line.startswith(":"):
                return _Message(aiohttp.WSMsgType.PONG)  # a heartbeat: the stream lives
            if line:
                name, _, value = line.partition(":")
                fields[name] = value[1:] if value.startswith(" ") else value
                continue
            if "data" not in fields:
                continue
            if fields.get("event", "message") == "close":
                ended = json.loads(fields["data"])
                return _Message(aiohttp.WSMsgType.CLOSE, ended.get("code"), ended.get("reason"))
            data = fields["data"]
            if self.session_id is None and data.startswith('{"type":"connected"'):
                self.session_id = json.loads(data)["data"]["connection_id"]
            return _Message(aiohttp.WSMsgType.TEXT, data)

    async def send_str(self, text: str) -> None:
        """Send one command (``POST .../commands``); raises ``ConnectionError`` when the
        server did not accept it."""
        if self.session_id is None:
            raise ConnectionError("no session yet")
        command = json.loads(text)
        if command.get("type") == "refresh":
            # The new token is the session's credential from now on.
            self._token = str(command.get("data", {}).get("token", self._token))
        try:
            async with self._http.post(
                self._commands_url,
                json={"session": self.session_id, "command": command},
                headers={"Authorization": f"Bearer {self._token}"},
            ) as response:
                if response.status >= 300:
                    raise ConnectionError(f"command refused (HTTP {response.status})")
        except aiohttp.ClientError as exc:
            raise ConnectionError(str(exc)) from exc

    async def pong(self, data: bytes = b"") -> None:
        """Nothing: SSE heartbeats are not answered."""

    @property
    def closed(self) -> bool:
        return self._response.closed

    async def close(self, *, code: int = 1000, message: bytes = b"") -> None:
        """End the stream (``code`` and ``message``: as for a WebSocket, unused)."""
        self._response.close()
