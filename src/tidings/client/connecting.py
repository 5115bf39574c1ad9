"""``connect``: a client that starts when awaited or entered."""

from __future__ import annotations

from collections.abc import Generator
from types import TracebackType
from typing import Any, Unpack

from tidings.client.connection import Client
from tidings.client.options import ClientOptions

__all__ = ["Connecting", "connect"]


class Connecting:
    """What ``connect`` returns: ``async with connect(...) as client`` or
    ``client = await connect(...)`` (then ``await client.close()``)."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def __await__(self) -> Generator[Any, None, Client]:
        return self.client.start().__await__()

    async def __aenter__(self) -> Client:
        return await self.client.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.client.close()


def connect(url: str, **options: Unpack[ClientOptions]) -> Connecting:
    """Connect to a Tidings server at ``url`` (``ws://host:port/ws``); see ``Client``."""
    return Connecting(Client(url, **options))
