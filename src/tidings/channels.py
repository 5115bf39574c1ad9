"""Channel authorization (protocol section 4): may this identity subscribe to this channel?

``ChannelPolicy.authorize`` returns only when the subscription is allowed and raises
otherwise, so a caller that subscribes after it returns can never deliver an event on a
denied channel. Rules, per namespace:

* ``user`` is hard-wired: ``user:<sub>`` is open to the user with that ``sub`` only; no
  configuration rule or callable can open another user's personal channel.
* A Python callable registered for the namespace (embedding programs) takes precedence.
* Otherwise the namespace's configured rule, else the ``default`` namespace's rule:
  ``claims``, ``public``, ``webhook`` or ``deny``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeAlias

import aiohttp

from tidings.auth import Identity
from tidings.config import NamespaceSettings
from tidings.errors import AuthorizerUnavailable, ConfigError, SubscriptionFailed, Unauthorized
from tidings.protocol.names import parse_channel

__all__ = ["Authorizer", "ChannelPolicy", "PostJson", "matches_claim"]

logger = logging.getLogger(__name__)

#: A rule for embedding programs: True allows, False denies; raising is "unavailable".
Authorizer: TypeAlias = Callable[[Identity, str], Awaitable[bool] | bool]
#: ``post_json(url, body, timeout) -> HTTP status``; raises on timeout or connection error.
PostJson: TypeAlias = Callable[[str, Mapping[str, Any], float], Awaitable[int]]

_PERSONAL_NAMESPACE = "user"
_DEFAULT_NAMESPACE = "default"
_DENIED = "not allowed to subscribe to this channel"
_UNAVAILABLE = "authorizer unavailable"

_CacheKey: TypeAlias = tuple[str, str, str]


def matches_claim(channel: str, patterns: Iterable[str]) -> bool:
    """True when ``channel`` equals one of ``patterns`` or matches a prefix pattern.

    A prefix pattern ends in ``*`` and matches every channel that starts with the text
    before the ``*`` (``"task:task-7*"`` matches ``task:task-7`` and ``task:task-77``).
    The text before the ``*`` must contain a non-empty namespace and its colon, so a
    bare ``"*"`` or ``"conv*"`` matches nothing: one careless claim must not open every
    namespace, nor namespaces that merely share a prefix (``conversation`` and
    ``conversations``). Non-string entries are ignored.
    """
    for pattern in patterns:
        if not isinstance(pattern, str):
            continue
        if pattern == channel:
            return True
        if pattern.endswith("*"):
            prefix = pattern[:-1]
            if prefix.find(":") > 0 and channel.startswith(prefix):
                return True
    return False


def _json_safe(value: Mapping[str, Any]) -> dict[str, Any]:
    """A plain-JSON copy of ``value``; anything exotic an embedder put in becomes a string."""
    # Decoded JWT claims are JSON already; the round trip only guards hand-made identities.
    safe: dict[str, Any] = json.loads(json.dumps(dict(value), default=str))
    return safe


class ChannelPolicy:
    """Decides subscriptions; owns the webhook answer cache and HTTP session.

    ``namespaces`` maps namespace names (and ``default``) to their rule. ``callables``
    maps namespace names to ``Authorizer`` callables, which win over ``namespaces``.
    Webhook answers, allow and deny alike, are cached per (namespace, user_id, channel)
    for the namespace's ``cache_ttl`` seconds measured on ``clock``; at most
    ``cache_size`` answers are kept (oldest evicted first, 0 disables caching). The
    identity's claims are not part of the key, so a refreshed token sees a cached
    answer until it expires. Failures are never cached. Identical concurrent webhook
    requests share one HTTP request. ``post_json`` replaces the HTTP client (tests).
    """

    def __init__(
        self,
        namespaces: Mapping[str, NamespaceSettings],
        *,
        callables: Mapping[str, Authorizer] | None = None,
        clock: Callable[[], float] = time.monotonic,
        post_json: PostJson | None = None,
        cache_size: int = 10000,
    ) -> None:
        """Raise ``ConfigError`` or ``ValueError`` for rules that could never work."""
        callables = dict(callables or {})
        if _PERSONAL_NAMESPACE in namespaces:
            raise ConfigError("namespaces.user", "the personal namespace cannot have a rule")
        if _PERSONAL_NAMESPACE in callables:
            raise ValueError("the personal namespace 'user' cannot have a callable rule")
        for name, settings in namespaces.items():
            if settings.rule == "webhook" and not settings.url.startswith(("http://", "https://")):
                raise ConfigError(f"namespaces.{name}.url", "a webhook rule needs an http(s) URL")
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        self._namespaces = dict(namespaces)
        self._callables = callables
        self._clock = clock
        self._post_json: PostJson = post_json or self._aiohttp_post_json
        self._cache_size = cache_size
        #: key -> (expires_at, allowed); insertion order is eviction order.
        self._cache: OrderedDict[_CacheKey, tuple[float, bool]] = OrderedDict()
        # Bounded by the number of concurrent subscribes: entries leave when done.
        self._inflight: dict[_CacheKey, asyncio.Task[bool | None]] = {}
        self._session: aiohttp.ClientSession | None = None

    async def authorize(self, identity: Identity, channel: str) -> None:
        """Return only when ``identity`` may subscribe to ``channel``; raise otherwise.

        Raises ``InvalidRequest`` for a malformed channel, ``Unauthorized`` when the
        rule denies, ``SubscriptionFailed`` for a namespace with no rule and no default,
        and ``AuthorizerUnavailable`` when a webhook or callable cannot answer.
        """
        namespace, name = parse_channel(channel)
        if namespace == _PERSONAL_NAMESPACE:
            if name != identity.user_id:
                raise Unauthorized(_DENIED, channel=channel)
            return
        custom = self._callables.get(namespace)
        if custom is not None:
            allowed = await self._call(custom, identity, channel)
        else:
            settings = self._namespaces.get(namespace) or self._namespaces.get(_DEFAULT_NAMESPACE)
            if settings is None:
                raise SubscriptionFailed(f"unknown namespace '{namespace}'", channel=channel)
            if settings.rule == "public":
                allowed = True
            elif settings.rule == "claims":
                allowed = matches_claim(channel, identity.channels)
            elif settings.rule == "webhook":
                allowed = await self._webhook(namespace, settings, identity, channel)
            else:
                # "deny" and any rule this code does not know: fail closed.
                allowed = False
        if not allowed:
            raise Unauthorized(_DENIED, channel=channel)

    async def close(self) -> None:
        """Cancel in-flight webhook requests and close the HTTP session; idempotent."""
        for task in list(self._inflight.values()):
            task.cancel()
        self._inflight.clear()
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def _call(self, custom: Authorizer, identity: Identity, channel: str) -> bool:
        try:
            result = custom(identity, channel)
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            logger.warning("channel authorizer failed: %s", type(exc).__name__)
            raise AuthorizerUnavailable(_UNAVAILABLE, channel=channel) from None
        if not isinstance(result, bool):
            # Truthy junk (a forgotten return, a string) must not open a channel.
            logger.warning("channel authorizer returned %s, not bool", type(result).__name__)
            raise AuthorizerUnavailable(_UNAVAILABLE, channel=channel)
        return result

    async def _webhook(
        self, namespace: str, settings: NamespaceSettings, identity: Identity, channel: str
    ) -> bool:
        key = (namespace, identity.user_id, channel)
        cached = self._cache.get(key)
        if cached is not None:
            if cached[0] > self._clock():
                return cached[1]
            del self._cache[key]
        task = self._inflight.get(key)
        if task is None:
            try:
                claims = _json_safe(identity.claims)
            except (ValueError, TypeError, RecursionError) as exc:
                # Token claims are bounded in depth (MAX_JSON_DEPTH); only a hand-made
                # identity (circular, too deep) gets here: no answer, not a crash.
                logger.warning(
                    "webhook authorizer failed: namespace=%s reason=claims not encodable (%s)",
                    namespace,
                    type(exc).__name__,
                )
                raise AuthorizerUnavailable(_UNAVAILABLE, channel=channel) from None
            body = {"user_id": identity.user_id, "channel": channel, "claims": claims}
            task = asyncio.create_task(self._ask(key, settings, body))
            self._inflight[key] = task
        try:
            # Shielded: one subscriber giving up must not cancel the others' request.
            answer = await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and (current is None or current.cancelling() == 0):
                raise AuthorizerUnavailable(_UNAVAILABLE, channel=channel) from None
            raise
        if answer is None:
            raise AuthorizerUnavailable(_UNAVAILABLE, channel=channel)
        return answer

    async def _ask(
        self, key: _CacheKey, settings: NamespaceSettings, body: Mapping[str, Any]
    ) -> bool | None:
        """One webhook request: True/False is an answer, None a failure (never raises)."""
        namespace = key[0]
        try:
            try:
                # Our own deadline too, so an injected post_json cannot hang a subscribe.
                async with asyncio.timeout(settings.timeout):
                    status = await self._post_json(settings.url, body, settings.timeout)
            except TimeoutError:
                logger.warning("webhook authorizer failed: namespace=%s reason=timeout", namespace)
                return None
            except Exception as exc:
                # Never the body (claims may hold tokens or PII) nor the URL (secrets).
                logger.warning(
                    "webhook authorizer failed: namespace=%s reason=%s",
                    namespace,
                    type(exc).__name__,
                )
                return None
            if 200 <= status < 300:
                answer = True
            elif status in (401, 403):
                answer = False
            else:
                logger.warning(
                    "webhook authorizer failed: namespace=%s status=%d reason=unexpected status",
                    namespace,
                    status,
                )
                return None
            self._remember(key, answer, settings.cache_ttl)
            return answer
        finally:
            if self._inflight.get(key) is asyncio.current_task():
                del self._inflight[key]

    def _remember(self, key: _CacheKey, answer: bool, ttl: float) -> None:
        if ttl <= 0 or self._cache_size == 0:
            return
        self._cache.pop(key, None)
        self._cache[key] = (self._clock() + ttl, answer)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def _aiohttp_post_json(self, url: str, body: Mapping[str, Any], seconds: float) -> int:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        # No redirects at all: a 3xx must not carry the claims to another host.
        async with self._session.post(
            url,
            json=dict(body),
            timeout=aiohttp.ClientTimeout(total=seconds),
            allow_redirects=False,
        ) as response:
            return response.status
