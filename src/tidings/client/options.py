"""The keyword options of ``tidings.client.connect`` and ``Client``, as a TypedDict."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Literal, TypedDict

import aiohttp

from tidings.client.backoff import Backoff
from tidings.client.models import StateChange
from tidings.client.tokens import TokenProvider

__all__ = ["ClientOptions", "StateListener"]

StateListener = Callable[[StateChange], None]


class ClientOptions(TypedDict, total=False):
    """Keyword options of ``connect`` and ``Client`` (see ``Client``)."""

    token: str | None
    token_provider: TokenProvider | None
    backoff: Backoff | None
    liveness_timeout: float
    connect_timeout: float
    close_timeout: float
    command_timeout: float
    refresh_margin: float
    queue_size: int
    token_in_query: bool
    transport: Literal["websocket", "sse"]
    sse_path: str
    headers: Mapping[str, str] | None
    on_state: StateListener | None
    session: aiohttp.ClientSession | None
    resubscribe_burst: int
    resubscribe_rate: float
    max_auth_failures: int
    clock: Callable[[], float]
    wall_clock: Callable[[], float]
    sleep: Callable[[float], Awaitable[None]]
