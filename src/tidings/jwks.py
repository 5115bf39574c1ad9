"""The JWKS behind ``auth.jwks_url``: fetching it, parsing its keys and choosing one.

Kept apart from ``tidings.auth`` (which verifies tokens): this module owns the one piece
of I/O verification may need, the HTTP fetch of the key set, with its cache, its in-flight
fetch shared by every waiter and the hold-off that bounds refetches.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from tidings.errors import InvalidRequest, Unauthorized
from tidings.logs import redact_url
from tidings.protocol.wire import loads

__all__ = [
    "JWKS_REFETCH_INTERVAL",
    "PUBLIC_KEY_TYPES",
    "FetchJwks",
    "JwksKeys",
    "PublicKey",
    "fits",
]

# The log lines keep the logger they had before this module was split out of auth.py.
_log = logging.getLogger("tidings.auth")

#: Minimum seconds between JWKS refetches caused by unknown key ids (or by a failed fetch).
JWKS_REFETCH_INTERVAL = 30.0

PublicKey: TypeAlias = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)
PUBLIC_KEY_TYPES = (
    rsa.RSAPublicKey,
    ec.EllipticCurvePublicKey,
    ed25519.Ed25519PublicKey,
    ed448.Ed448PublicKey,
)

#: ``fetch(url, timeout)``: the JWKS document at ``url``, within ``timeout`` seconds.
FetchJwks = Callable[[str, float], Awaitable[Mapping[str, Any]]]


@dataclass(frozen=True, slots=True)
class _Jwk:
    """One usable verification key of a JWKS."""

    kid: str | None
    alg: str | None
    key: PublicKey


class _FetchError(Exception):
    """A JWKS fetch problem whose message is safe to log (no URL, no body)."""


class JwksKeys:
    """The cached key set of ``url``, refetched when a token names a key it lacks.

    ``fetch`` defaults to an aiohttp GET on a lazily created session, released by
    ``close()``. A failed fetch keeps the cached keys; refetches (failed or caused by an
    unknown key id, which is unauthenticated input) happen at most once per
    ``JWKS_REFETCH_INTERVAL`` seconds of ``clock``. Concurrent waiters share one fetch.
    """

    def __init__(
        self,
        url: str,
        timeout: float,
        *,
        clock: Callable[[], float],
        fetch: FetchJwks | None = None,
    ) -> None:
        self._url = url
        self._timeout = timeout
        self._clock = clock
        self._fetch = fetch if fetch is not None else self._default_fetch
        self._jwks: tuple[_Jwk, ...] | None = None
        self._holdoff_until = -math.inf
        self._inflight: asyncio.Task[None] | None = None
        #: The default fetcher's HTTP session, None until its first fetch.
        self.session: aiohttp.ClientSession | None = None

    def cached(self, alg: str, kid: str | None) -> PublicKey | None:
        """The cached key for ``alg``/``kid``; None when the set must be (re)fetched first."""
        return _select(self._jwks, alg, kid) if self._jwks is not None else None

    async def close(self) -> None:
        """Stop a fetch in flight and close the HTTP session this object created."""
        if (task := self._inflight) is not None:
            task.cancel()
            await asyncio.wait({task})
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def key(self, alg: str, kid: str | None) -> PublicKey:
        """A JWKS key for ``alg``/``kid`` that ``cached`` did not find in the cached set:
        refetch the set when allowed, or wait for the fetch in flight."""
        if self._inflight is None:
            now = self._clock()
            if now < self._holdoff_until:
                raise Unauthorized("unknown signing key")
            if self._jwks is not None:
                # Key ids come from unauthenticated input: bound the refetches they can cause.
                self._holdoff_until = now + JWKS_REFETCH_INTERVAL
            self._inflight = asyncio.create_task(self._refresh())
        # Shielded: a waiter that goes away must not cancel the fetch the others share.
        await asyncio.shield(self._inflight)
        found = _select(self._jwks or (), alg, kid)
        if found is None:
            raise Unauthorized("unknown signing key")
        return found

    async def _refresh(self) -> None:
        """Fetch and parse the JWKS; on failure keep the cached set and log a warning."""
        url, timeout = self._url, self._timeout
        try:
            # Also bounds an injected fetcher that ignores its timeout argument.
            async with asyncio.timeout(timeout):
                document = await self._fetch(url, timeout)
            self._jwks = _parse_jwks(document)
        except Exception as exc:  # any failure: the cached keys stay valid
            self._holdoff_until = self._clock() + JWKS_REFETCH_INTERVAL
            reason = str(exc) if isinstance(exc, _FetchError) else type(exc).__name__
            _log.warning(
                "JWKS fetch from %s failed (%s); %s",
                redact_url(url),
                reason,
                "keeping the cached keys" if self._jwks else "no keys available",
            )
        finally:
            self._inflight = None

    # The timeout is part of the fetch_jwks contract (an aiohttp.ClientTimeout here).
    async def _default_fetch(self, url: str, timeout: float) -> Mapping[str, Any]:  # noqa: ASYNC109
        """GET ``url`` and return its JSON object, on one lazily created session."""
        if self.session is None or self.session.closed:
            self.session = aiohttp.ClientSession()
        client_timeout = aiohttp.ClientTimeout(total=timeout)
        async with self.session.get(url, timeout=client_timeout) as response:
            if response.status != 200:
                # Not raise_for_status(): its message carries the URL, query string included.
                raise _FetchError(f"HTTP status {response.status}")
            body = await response.read()
        try:
            # Not response.json(): json.loads recurses per nesting level, and a deep
            # document would surface as RecursionError rather than as a bad reply.
            document = loads(body)
        except InvalidRequest as exc:
            raise _FetchError(f"the response is not usable JSON: {exc.message}") from None
        if not isinstance(document, Mapping):
            raise _FetchError("the response is not a JSON object")
        return document


def fits(alg: str, key: PublicKey) -> bool:
    """Whether ``key`` can verify ``alg`` signatures: key type, and the curve for ES*."""
    if alg.startswith(("RS", "PS")):
        return isinstance(key, rsa.RSAPublicKey)
    if alg == "EdDSA":
        return isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
    curve = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}.get(alg)
    return (
        curve is not None
        and isinstance(key, ec.EllipticCurvePublicKey)
        and isinstance(key.curve, curve)
    )


def _select(keys: Sequence[_Jwk], alg: str, kid: str | None) -> PublicKey | None:
    """The key for ``kid``; without a kid, the only key that fits ``alg``, if exactly one."""
    fitting = [jwk for jwk in keys if jwk.alg in (None, alg) and fits(alg, jwk.key)]
    if kid is None:
        return fitting[0].key if len(fitting) == 1 else None
    return next((jwk.key for jwk in fitting if jwk.kid == kid), None)


def _parse_jwks(document: Mapping[str, Any]) -> tuple[_Jwk, ...]:
    """The usable signature-verification keys of a JWKS document; ``_FetchError`` if none."""
    raw = document.get("keys") if isinstance(document, Mapping) else None
    if not isinstance(raw, list):
        raise _FetchError("the JWKS has no keys list")
    keys = tuple(jwk for jwk in map(_parse_jwk, raw) if jwk is not None)
    if not keys:
        raise _FetchError("the JWKS has no usable signature keys")
    return keys


def _parse_jwk(item: Any) -> _Jwk | None:
    """One JWKS member as a public verification key, or None when it cannot be one."""
    # Symmetric keys never come from a URL; encryption keys never verify signatures.
    if not isinstance(item, dict) or item.get("kty") == "oct" or item.get("use", "sig") != "sig":
        return None
    ops = item.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return None
    try:
        # PyJWK infers no algorithm for Ed448; EdDSA covers both Edwards curves.
        algorithm = "EdDSA" if item.get("kty") == "OKP" and "alg" not in item else None
        key = jwt.PyJWK(item, algorithm).key
    except Exception:  # untrusted remote data: any parsing failure only skips this key
        return None
    if not isinstance(key, PUBLIC_KEY_TYPES):
        return None  # private keys have no business in a published JWKS
    kid, alg = item.get("kid"), item.get("alg")
    return _Jwk(kid if isinstance(kid, str) else None, alg if isinstance(alg, str) else None, key)
