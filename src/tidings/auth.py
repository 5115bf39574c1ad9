"""Token verification: a JWT becomes an ``Identity`` or an ``Unauthorized`` error.

Only compact JWS tokens signed with a configured algorithm are accepted. The key comes from
configuration alone: the HMAC secret for HS*, a PEM public key file or a JWKS URL for the
asymmetric algorithms. Token headers that point at keys (``jku``, ``x5u``, ``jwk``, ``x5c``)
are never consulted. Every failure is ``Unauthorized`` with a short reason that never
contains the token, any part of it, or the secret.
"""

from __future__ import annotations

import logging
import math
import time
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.exceptions import InvalidSubjectError

from tidings.config import AuthSettings
from tidings.errors import ConfigError, Unauthorized
from tidings.jwks import (
    JWKS_REFETCH_INTERVAL,
    PUBLIC_KEY_TYPES,
    FetchJwks,
    JwksKeys,
    PublicKey,
    fits,
)
from tidings.jws import (
    HmacKey,
    MalformedToken,
    check_compact,
    decode_claims,
    decode_segment,
    json_segment,
    parse_header,
)
from tidings.minting import HMAC_ALGORITHMS, mint_token, parse_duration

__all__ = [
    "JWKS_REFETCH_INTERVAL",
    "MAX_TOKEN_BYTES",
    "Authenticator",
    "Identity",
    "mint_token",
    "parse_duration",
]

_log = logging.getLogger(__name__)

#: Longer tokens are refused before any decoding work is spent on them.
MAX_TOKEN_BYTES = 8192
_MAX_SUB_CHARS = 256
_HMAC_ALGORITHMS = HMAC_ALGORITHMS


# Most specific first (InvalidSignatureError is a DecodeError); the rest is "malformed token".
# No time-claim errors: PyJWT's time checks are off (see Authenticator._decode).
_REASONS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.InvalidSignatureError, "invalid token signature"),
    (jwt.InvalidAudienceError, "token audience not accepted"),
    (jwt.InvalidIssuerError, "token issuer not accepted"),
    (jwt.InvalidAlgorithmError, "token algorithm not allowed"),
    (jwt.InvalidKeyError, "token cannot be verified"),
    (InvalidSubjectError, "token has no usable sub claim"),  # not re-exported by jwt
)


_NO_CLAIMS: Mapping[str, Any] = types.MappingProxyType({})


class Identity(NamedTuple):
    """Who a verified token speaks for; immutable.

    A named tuple rather than a frozen dataclass: one is built per handshake, and a frozen
    dataclass's ``__init__`` costs several times more (it sets each field through
    ``object.__setattr__``).
    """

    user_id: str
    expires_at: float
    #: Channel names and prefix patterns (ending in ``*``) from the channels claim.
    channels: tuple[str, ...] = ()
    #: The verified claims, as decoded (empty unless the Authenticator keeps them).
    claims: Mapping[str, Any] = _NO_CLAIMS


class Authenticator:
    """Verifies tokens against the configured algorithms and keys.

    ``clock`` is the time source for ``exp``/``nbf``/``iat`` and for the JWKS refetch
    interval. ``fetch_jwks(url, timeout)`` returns a JWKS document; by default it is an
    aiohttp GET on a lazily created session, released by ``close()``. ``dev_mode`` is
    informational: in development mode the caller fills ``settings.secret`` in, and the
    verification rules stay the same. With ``keep_claims`` false, ``Identity.claims`` is
    empty (saves memory per connection when nothing reads the claims).

    Raises ``ConfigError`` when ``auth.public_key_file`` cannot be used.
    """

    def __init__(
        self,
        settings: AuthSettings,
        *,
        dev_mode: bool = False,
        clock: Callable[[], float] = time.time,
        fetch_jwks: FetchJwks | None = None,
        keep_claims: bool = True,
    ) -> None:
        self.dev_mode = dev_mode
        self._keep_claims = keep_claims
        self._settings = settings
        self._algorithms = frozenset(settings.algorithms)
        # Prepared once: PyJWT re-checks the key's format on every call (see _decode_hmac).
        self._hmac = HmacKey(settings.secret.encode("utf-8"))
        self._hmac_fast = not (settings.issuer or settings.audience)
        # Read per handshake: plain attributes, not lookups on the settings model.
        self._leeway = settings.leeway
        self._channels_claim = settings.channels_claim
        self._clock = clock
        self._pem = _load_pem(settings) if settings.public_key_file else None
        if settings.jwks_url and not settings.jwks_url.startswith(("http://", "https://")):
            raise ConfigError("auth.jwks_url", "must be an http(s) URL")
        self._jwks = JwksKeys(
            settings.jwks_url, settings.jwks_timeout, clock=clock, fetch=fetch_jwks
        )
        self._headers: dict[str, Mapping[str, Any]] = {}

    async def authenticate(self, token: str | None) -> Identity:
        """Verify ``token`` and return its ``Identity``; raise ``Unauthorized`` otherwise.

        Never raises anything else for any input string, however crafted.
        """
        header, alg, kid = self._precheck(token)
        key = self._key_now(alg, kid)
        if key is None:
            key = await self._jwks.key(alg, kid)
        return self._verify(token or "", header, alg, key)

    def verify_now(self, token: str | None) -> Identity | None:
        """Like ``authenticate`` without waiting on anything: the ``Identity``, or None
        when the token's key must first be fetched from the JWKS URL (then call
        ``authenticate``). Raises ``Unauthorized`` like ``authenticate``.

        HS* tokens, PEM keys and JWKS keys already cached never wait: the handshake's
        hot path verifies them without a coroutine or a timeout.
        """
        header, alg, kid = self._precheck(token)
        key = self._key_now(alg, kid)
        if key is None:
            return None
        return self._verify(token or "", header, alg, key)

    def _precheck(self, token: str | None) -> tuple[Mapping[str, Any], str, str | None]:
        """Size, compact form and header checks: the header, its ``alg`` and ``kid``."""
        if not token:
            raise Unauthorized("token missing")
        size = len(token) if token.isascii() else len(token.encode("utf-8", "surrogatepass"))
        if size > MAX_TOKEN_BYTES:
            raise Unauthorized("token too large")
        header = self._header(token)
        alg = header.get("alg")
        # The header's alg only selects among the configured ones; it is never trusted beyond.
        if not isinstance(alg, str) or alg.lower() == "none" or alg not in self._algorithms:
            raise Unauthorized("token algorithm not allowed")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise Unauthorized("malformed token")
        return header, alg, kid

    def _header(self, token: str) -> Mapping[str, Any]:
        """``jws.parse_header`` with a small cache: a deployment signs with one or a few
        distinct headers, so most handshakes skip decoding it. Cached headers are
        never mutated; the cache is bounded and starts over when full."""
        first = token.partition(".")[0]
        header = self._headers.get(first)
        try:
            if header is None:
                header = parse_header(token)
                if len(self._headers) >= _HEADER_CACHE_SIZE:
                    self._headers.clear()
                self._headers[first] = header
            else:
                check_compact(token)
        except MalformedToken:
            raise Unauthorized("malformed token") from None
        return header

    def _verify(
        self, token: str, header: Mapping[str, Any], alg: str, key: str | PublicKey
    ) -> Identity:
        if alg in _HMAC_ALGORITHMS and self._hmac_fast and not _HEADER_EXTENSIONS & header.keys():
            return self._identity(self._decode_hmac(token, alg))
        return self._identity(self._decode(token, key, alg))

    async def close(self) -> None:
        """Stop a JWKS fetch in flight and close the HTTP session this object created."""
        await self._jwks.close()

    def _key_now(self, alg: str, kid: str | None) -> str | PublicKey | None:
        """The verification key for ``alg``: the secret, the PEM key or a cached JWKS key;
        None when the JWKS must be (re)fetched first.

        A token with a ``kid`` is looked up in the JWKS when one is configured; otherwise
        the PEM key verifies, provided its type fits the algorithm.
        """
        if alg in _HMAC_ALGORITHMS:
            if not self._settings.secret:
                raise Unauthorized("token cannot be verified")
            return self._settings.secret
        jwks_url = self._settings.jwks_url
        if self._pem is not None and (kid is None or not jwks_url) and fits(alg, self._pem):
            return self._pem
        if jwks_url:
            return self._jwks.cached(alg, kid)
        raise Unauthorized("unknown signing key")

    def _decode(self, token: str, key: str | PublicKey, alg: str) -> dict[str, Any]:
        """Signature, required claims, issuer and audience checks by PyJWT.

        The payload and signature segments first pass the checks the HS* fast path
        applies, so both paths refuse the same spellings: canonical base64url (no '='
        padding, which ``check_compact`` already refused and PyJWT would accept; no
        stray trailing bits), and a payload no deeper than ``MAX_JSON_DEPTH``
        (PyJWT's json.loads recurses per level).
        """
        _, payload, signature = token.split(".")  # check_compact has passed
        try:
            decode_segment(signature)
            # Only spelling and depth: what else the payload holds is PyJWT's to judge,
            # after the signature, as on the fast path.
            json_segment(payload)
        except MalformedToken:
            raise Unauthorized("malformed token") from None
        settings = self._settings
        try:
            return jwt.decode(
                token,
                key,
                algorithms=[alg],
                leeway=settings.leeway,
                issuer=settings.issuer or None,
                audience=settings.audience or None,
                options={
                    "require": ["sub", "exp"],
                    # _identity checks times against the injected clock: PyJWT reads the
                    # wall clock and accepts numeric strings and booleans as times.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    # Without a configured audience, tokens that carry one still pass.
                    "verify_aud": bool(settings.audience),
                },
            )
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"token has no usable {exc.claim} claim") from None
        except jwt.PyJWTError as exc:
            reason = next((text for kind, text in _REASONS if isinstance(exc, kind)), None)
            raise Unauthorized(reason or "malformed token") from None
        except Exception:
            # A crafted token must never crash the caller (ValueError, TypeError,
            # OverflowError, RecursionError... from the decoders).
            raise Unauthorized("malformed token") from None

    def _decode_hmac(self, token: str, alg: str) -> dict[str, Any]:
        """HS256/384/512 verification without PyJWT, for the common case (no issuer or
        audience to check, no ``crit``/``b64`` header): the handshake's hot path.

        Same checks and outcomes as ``_decode``: constant-time signature comparison over
        the strict compact form ``_header`` has already checked, a JSON-object
        payload, ``sub`` and ``exp`` present; ``_identity`` then checks types and times.
        """
        signing_input, _, signature_b64 = token.rpartition(".")
        try:
            signature = decode_segment(signature_b64)
        except MalformedToken:
            raise Unauthorized("malformed token") from None
        # ASCII: check_compact allows nothing else.
        if not self._hmac.verify(alg, signing_input.encode("ascii"), signature):
            raise Unauthorized("invalid token signature")
        try:
            claims = decode_claims(signing_input.partition(".")[2])
        except MalformedToken:
            raise Unauthorized("malformed token") from None
        if not isinstance(claims, dict):
            raise Unauthorized("malformed token")
        for required in ("sub", "exp"):
            if required not in claims:
                raise Unauthorized(f"token has no usable {required} claim")
        return claims

    def _identity(self, claims: dict[str, Any]) -> Identity:
        """Check claim types and times (with leeway) and build the ``Identity``."""
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > _MAX_SUB_CHARS:
            raise Unauthorized("token has no usable sub claim")
        exp = _number(claims.get("exp"))
        if exp is None:
            raise Unauthorized("token has no usable exp claim")
        now, leeway = self._clock(), self._leeway
        for name in ("nbf", "iat"):
            if name in claims:
                value = _number(claims[name])
                if value is None:
                    raise Unauthorized(f"token has an invalid {name} claim")
                if value > now + leeway:
                    raise Unauthorized("token not yet valid")
        if exp <= now - leeway:
            raise Unauthorized("token expired")
        raw = claims.get(self._channels_claim)
        # A list first: tuple() of a generator preallocates and shrinks, even for none.
        channels = (
            tuple([item for item in raw if isinstance(item, str)])
            if isinstance(raw, list) and raw
            else ()
        )
        # Claims are kept only for consumers that read them (webhook rules, Python
        # authorizers): every idle connection holds its Identity.
        kept = claims if self._keep_claims else _NO_CLAIMS
        return Identity(user_id=sub, expires_at=exp, channels=channels, claims=kept)


#: Distinct token headers remembered by ``Authenticator._header``.
_HEADER_CACHE_SIZE = 64

#: Header parameters that change how a JWS is processed: such tokens go through PyJWT.
_HEADER_EXTENSIONS = frozenset({"crit", "b64"})


def _number(value: Any) -> float | None:
    """``value`` as a finite float when it is a JSON number (bools are not), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _load_pem(settings: AuthSettings) -> PublicKey:
    """The public key (or certificate's key) in ``auth.public_key_file``; else ``ConfigError``."""
    key_name = "auth.public_key_file"
    try:
        data = Path(settings.public_key_file).read_bytes()
    except OSError as exc:
        raise ConfigError(key_name, f"cannot read the file: {exc.strerror}") from None
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: object = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = load_pem_public_key(data)
    except Exception:  # ValueError, UnsupportedAlgorithm, TypeError for private keys...
        raise ConfigError(key_name, "not a PEM public key or certificate") from None
    if not isinstance(key, PUBLIC_KEY_TYPES):
        raise ConfigError(key_name, "unsupported key type (use RSA, EC P-256/384/521 or Ed25519)")
    asymmetric = [alg for alg in settings.algorithms if alg not in _HMAC_ALGORITHMS]
    if asymmetric and not any(fits(alg, key) for alg in asymmetric):
        raise ConfigError(key_name, f"the key fits none of auth.algorithms {asymmetric}")
    return key
