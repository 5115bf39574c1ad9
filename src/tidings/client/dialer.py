"""One connection attempt of the client: open the transport and serve it until it ends.

A ``Dialer`` asks the session's token source for a token, opens a WebSocket (or, with
``transport="sse"``, the Server-Sent Events stream of ``tidings.client.sse``) within
``connect_timeout``, serves it as a ``tidings.client.link.Link`` and closes it, and
returns the ``Outcome`` the session decides the next step from. A failure to connect is
an outcome too, never an exception. ``link`` is the connection being served, if any: the
``Client`` sends its commands through it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping

import aiohttp

from tidings.client.effects import AppEffect, Outcome
from tidings.client.link import Link, describe, handshake
from tidings.client.session import Session
from tidings.client.sse import SseRefused, SseSocket

__all__ = ["Dialer"]


class Dialer:
    """See the module docstring; ``sse_url`` is None for the WebSocket transport."""

    def __init__(
        self,
        url: str,
        core: Session,
        on_effect: Callable[[AppEffect], None],
        *,
        headers: Mapping[str, str],
        token_in_query: bool,
        sse_url: str | None,
        connect_timeout: float,
        close_timeout: float,
        command_timeout: float,
        sleep: Callable[[float], Awaitable[None]],
    ) -> None:
        self._url = url
        self._core = core
        self._on_effect = on_effect
        self._headers = dict(headers)
        self._token_in_query = token_in_query
        self._sse_url = sse_url
        self._connect_timeout = connect_timeout
        self._close_timeout = close_timeout
        self._command_timeout = command_timeout
        self._sleep = sleep
        #: The connection being served, if any.
        self.link: Link | None = None

    async def attempt(self, http: aiohttp.ClientSession) -> Outcome:
        """Connect once, serve the connection until it ends, and say how it ended."""
        token = await self._core.tokens.for_connection()
        url, headers = handshake(
            self._url, token, self._headers, token_in_query=self._token_in_query
        )
        if self._sse_url is not None:
            return await self._attempt_sse(http, self._sse_url, token)
        try:
            async with asyncio.timeout(self._connect_timeout):
                ws = await http.ws_connect(
                    url,
                    headers=headers,
                    autoping=False,
                    autoclose=True,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=self._close_timeout),
                )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return Outcome(None, f"cannot connect: {describe(exc)}", False)
        link = self.link = Link(
            ws,
            self._core,
            on_effect=self._on_effect,
            command_timeout=self._command_timeout,
            sleep=self._sleep,
        )
        try:
            return await link.serve()
        finally:
            self.link = None
            link.lost()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._close_timeout):
                    await ws.close()

    async def _attempt_sse(self, http: aiohttp.ClientSession, url: str, token: str) -> Outcome:
        """``attempt`` over Server-Sent Events (``tidings.client.sse``)."""
        try:
            async with asyncio.timeout(self._connect_timeout):
                stream = await SseSocket.connect(http, url, token, self._headers)
        except SseRefused as exc:
            return Outcome(exc.code, exc.message, False)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return Outcome(None, f"cannot connect: {describe(exc)}", False)
        link = self.link = Link(
            stream,  # type: ignore[arg-type]
            self._core,
            on_effect=self._on_effect,
            command_timeout=self._command_timeout,
            sleep=self._sleep,
        )
        try:
            return await link.serve()
        finally:
            self.link = None
            link.lost()
            await stream.close()
