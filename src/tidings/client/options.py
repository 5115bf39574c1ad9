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
    """Keyword options of ``connect`` and ``Client``:

    * ``token`` / ``token_provider``: a JWT, and/or a callable (sync or async) returning a
      fresh one. With a provider the client refreshes the token before it expires and
      asks for a new one after a 4401 close.
    * ``backoff``: a ``Backoff`` (defaults: 0.5 s initial, 20 s cap, reset after 10 s up).
    * ``liveness_timeout`` (10 s): a connection with no frame for the server's
      ``heartbeat_interval`` plus this is treated as dead and replaced.
    * ``connect_timeout`` (10 s): limit for the handshake and the ``connected`` message.
    * ``close_timeout`` (5 s), ``command_timeout`` (10 s, ``ping``/``unsubscribe``/refresh).
    * ``refresh_margin`` (30 s): refresh this long before expiry (at most half the
      remaining lifetime).
    * ``queue_size`` (1000): default bound of each subscription's queue.
    * ``token_in_query`` (False): send the token as ``?token=`` instead of an
      ``Authorization: Bearer`` header; ``headers``: extra handshake headers.
    * ``transport`` ("websocket"): "sse" reads events from the Server-Sent Events
      endpoint (``sse_path``, default "/sse", on the server of ``url``) and sends
      commands as POSTs; everything else, recovery included, works the same.
    * ``on_state``: a listener for ``StateChange``; ``session``: an aiohttp session to use.
    * ``resubscribe_burst`` (50) / ``resubscribe_rate`` (25/s): pacing of the subscribe
      commands sent after a reconnect, to stay under the server's command rate limit.
    * ``max_auth_failures`` (3): consecutive rejected tokens (4401 before ``connected``)
      tolerated from the provider before giving up.
    * ``clock``/``wall_clock``/``sleep``: injectable for tests (monotonic seconds, epoch
      seconds, the backoff sleep).
    """

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
