"""Minting HS* tokens and reading durations, with the standard library only.

Kept apart from ``tidings.auth`` (which verifies tokens with PyJWT and ``cryptography``)
so that ``tidings token`` and ``tidings listen`` start without importing either:
a command-line call should cost tens of milliseconds, not most of a second.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["HMAC_ALGORITHMS", "mint_token", "parse_duration"]

#: The algorithms ``mint_token`` signs with, and their digests.
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
_DIGESTS = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd]?)")


def _segment(raw: bytes) -> str:
    """Base64url without padding: the canonical spelling the server insists on."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _json(value: Mapping[str, Any]) -> bytes:
    # The compact form PyJWT writes, so tokens look the same whichever minted them.
    return json.dumps(value, separators=(",", ":")).encode()


def mint_token(
    secret: str,
    sub: str,
    *,
    channels: Sequence[str] = (),
    ttl: float = 3600,
    algorithm: str = "HS256",
    now: float | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Sign an HS* token, for development mode, the ``tidings token`` command and tests.

    Claims: ``sub``, ``iat`` (``now``, default the wall clock), ``exp`` (``iat + ttl``),
    ``channels`` when non-empty, then ``extra`` merged last (it may override the others;
    its values must be JSON). A ttl of zero or less mints an already-expired token, which
    tests use. Raises ``ValueError`` for an empty secret or sub, a non-HMAC algorithm, a
    non-finite ttl, or a bare string passed as ``channels``.
    """
    if algorithm not in HMAC_ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(HMAC_ALGORITHMS)}")
    if not secret or not sub:
        raise ValueError("secret and sub must not be empty")
    if isinstance(channels, str):
        raise ValueError("channels must be a sequence of channel names, not one string")
    if not math.isfinite(ttl):
        raise ValueError("ttl must be a finite number of seconds")
    issued = time.time() if now is None else now
    claims: dict[str, Any] = {"sub": sub, "iat": int(issued), "exp": int(issued + ttl)}
    if channels:
        claims["channels"] = list(channels)
    claims.update(extra or {})
    signing_input = (
        _segment(_json({"alg": algorithm, "typ": "JWT"})) + "." + _segment(_json(claims))
    )
    signature = hmac.new(
        secret.encode(), signing_input.encode("ascii"), _DIGESTS[algorithm]
    ).digest()
    return signing_input + "." + _segment(signature)


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``"3600"``, ``"90s"``, ``"15m"``, ``"1h"``, ``"2d"`` (decimals allowed).

    Raises ``ValueError`` naming the expected forms for anything else.
    """
    match = _DURATION.fullmatch(text.strip().lower())
    seconds = float(match.group(1)) if match else math.nan
    if match is None or not math.isfinite(seconds):
        raise ValueError(
            f"invalid duration {text[:40]!r}: use seconds or a number followed by "
            "s, m, h or d (for example 90s, 15m, 1h, 2d)"
        )
    return seconds * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
