"""The client's token: the current JWT, its expiry, the provider, and refresh timing.

Everything here is pure except ``fetch`` (which calls the application's provider).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from datetime import datetime

from tidings.client.errors import AuthenticationFailed

__all__ = ["TokenProvider", "TokenSource", "parse_expiry"]

TokenProvider = Callable[[], Awaitable[str] | str]


def parse_expiry(value: object) -> float | None:
    """``expires_at`` (RFC 3339) as epoch seconds; None when absent or malformed."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


class TokenSource:
    """The token to connect with and when to replace it.

    ``expires_at`` is the expiry the server reported for the current token (``connected``
    or ``refreshed``), in epoch seconds; None while unknown.
    """

    def __init__(
        self,
        token: str | None,
        provider: TokenProvider | None,
        *,
        refresh_margin: float,
        wall_clock: Callable[[], float],
    ) -> None:
        if token is None and provider is None:
            raise ValueError("give a token or a token_provider")
        self.token = token
        self.provider = provider
        self.expires_at: float | None = None
        self._margin = refresh_margin
        self._wall = wall_clock

    @property
    def has_provider(self) -> bool:
        return self.provider is not None

    def needs_new(self) -> bool:
        """Before connecting: ask the provider (no token yet, or the known one expired)."""
        expired = self.expires_at is not None and self._wall() >= self.expires_at
        return self.provider is not None and (self.token is None or expired)

    def rejected(self) -> None:
        """The server refused the token (4401): the next connection asks the provider."""
        self.token = None
        self.expires_at = None

    def accepted(self, expires_at: object) -> None:
        """``connected`` reported the current token's expiry."""
        self.expires_at = parse_expiry(expires_at)

    def refresh_delay(self) -> float | None:
        """Seconds until the token should be refreshed (``refresh_margin`` before expiry,
        at most half the remaining lifetime); None when there is nothing to refresh."""
        if self.provider is None or self.expires_at is None:
            return None
        remaining = self.expires_at - self._wall()
        return max(0.0, remaining - min(self._margin, max(remaining, 0.0) / 2))

    def retry_delay(self, expires_at: float) -> float:
        """Pause before retrying a failed provider call during a refresh."""
        return max(0.5, min(5.0, (expires_at - self._wall()) / 4))

    def refreshed(self, token: str, expires_at: object) -> bool:
        """``refreshed`` accepted ``token``; False when it expires no later than the one it
        replaced (refreshing again would not help, so the caller stops refreshing)."""
        previous = self.expires_at
        self.token = token
        self.expires_at = parse_expiry(expires_at)
        return self.expires_at is not None and (previous is None or self.expires_at > previous)

    async def fetch(self) -> str:
        """Call the provider; raise ``AuthenticationFailed`` when it fails."""
        if self.provider is None:
            raise AuthenticationFailed(None, "no token provider")
        try:
            result = self.provider()
            token = await result if inspect.isawaitable(result) else result
        except Exception as exc:
            raise AuthenticationFailed(None, f"the token provider failed: {exc!r}") from exc
        if not isinstance(token, str) or not token:
            raise AuthenticationFailed(None, "the token provider returned no token")
        return token

    async def for_connection(self) -> str:
        """The token to connect with, from the provider when needed."""
        if self.needs_new():
            self.token = await self.fetch()
            self.expires_at = None
        if self.token is None:
            raise AuthenticationFailed(None, "no token")
        return self.token
