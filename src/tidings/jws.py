"""Compact JWS pieces for the handshake's hot path: strict form checks, segment decoding
and HS256/384/512 signatures with precomputed key states.

Pure functions and one small class, no I/O. ``tidings.auth`` decides what a token means;
this module only answers "is it well formed" and "is the MAC right", as fast as Python
allows: every WebSocket handshake passes through here.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import json
from typing import Any

import msgspec

from tidings.protocol.wire import json_too_deep

__all__ = [
    "HmacKey",
    "MalformedToken",
    "check_compact",
    "decode_claims",
    "decode_json",
    "decode_segment",
    "json_segment",
    "parse_header",
]

_URLSAFE = bytes.maketrans(b"-_", b"+/")
_FAST_DECODER = msgspec.json.Decoder()
# Strict base64url without padding. PyJWT tolerates '=' padding; the compact JWS form does not.
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_ALPHABET_BYTES = _ALPHABET.encode("ascii")
# Allowed last characters by segment length mod 4: with 2 (3) characters in the last
# group, the final one carries 4 (2) unused bits. A length of 1 mod 4 is never valid.
_CANONICAL_LAST = {1: "", 2: _ALPHABET[::16], 3: _ALPHABET[::4]}

#: hashlib names and block sizes of the HS* algorithms.
_DIGESTS = {"HS256": ("sha256", 64), "HS384": ("sha384", 128), "HS512": ("sha512", 128)}


class MalformedToken(ValueError):
    """The token is not a strict compact JWS, or a segment does not decode."""


def check_compact(token: str) -> list[str]:
    """The three segments of a strict compact JWS (the signature not empty)."""
    try:
        raw = token.encode("ascii")
    except UnicodeEncodeError:
        raise MalformedToken from None
    # Deleting the alphabet must leave exactly the two separators: one C loop, where a
    # regular expression costs several times more per handshake.
    if raw.translate(None, _ALPHABET_BYTES) != b".." or raw.endswith(b"."):
        raise MalformedToken
    return token.split(".")


def decode_segment(segment: str) -> bytes:
    """A base64url segment (already checked by ``check_compact``) as bytes.

    Only the canonical encoding is accepted: unused low bits of the last character must
    be zero, or one token would have several spellings (as PyJWT also rules).
    """
    tail = len(segment) % 4
    if tail and segment[-1] not in _CANONICAL_LAST[tail]:
        raise MalformedToken
    try:
        return binascii.a2b_base64(
            (segment + "=" * (-len(segment) % 4)).encode("ascii").translate(_URLSAFE)
        )
    except (binascii.Error, UnicodeEncodeError):
        raise MalformedToken from None


def decode_json(raw: bytes) -> Any:
    """``json.loads(raw)``, exactly, at msgspec's speed in the common case.

    msgspec decodes strict UTF-8 JSON; whatever it accepts, ``json.loads`` reads the same
    way. What it refuses (NaN, lone surrogates, huge exponents, other encodings) gets a
    second chance with ``json.loads``, so the outcome never differs from PyJWT's.
    """
    try:
        return _FAST_DECODER.decode(raw)
    except (msgspec.MsgspecError, ValueError, RecursionError):  # UnicodeDecodeError too
        pass
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError included
        raise MalformedToken from None


def json_segment(segment: str) -> bytes:
    """A JSON segment's bytes (header or payload, checked by ``check_compact``): only in
    canonical base64url (see ``decode_segment``), and nesting no deeper than
    ``protocol.MAX_JSON_DEPTH``, else ``MalformedToken``.

    The depth limit holds because JSON decoders recurse per level, and decoded claims
    travel on (webhook bodies): a token cannot carry what no other message may.
    """
    raw = decode_segment(segment)
    text: bytes | str = raw
    # json.loads (the fallback, as in PyJWT) also reads UTF-16 and UTF-32, whose bytes
    # say nothing about the nesting: measure their text. A JSON object in UTF-8, the
    # only form seen in practice, starts with '{' and no NUL.
    if raw[:1] != b"{" or raw[1:2] == b"\0":
        encoding = json.detect_encoding(raw)
        if encoding not in ("utf-8", "utf-8-sig"):
            try:
                text = raw.decode(encoding, "surrogatepass")
            except UnicodeDecodeError:
                raise MalformedToken from None
    if json_too_deep(text):
        raise MalformedToken
    return raw


def decode_claims(segment: str) -> Any:
    """A JSON segment decoded: ``decode_json(json_segment(segment))``."""
    return decode_json(json_segment(segment))


def parse_header(token: str) -> dict[str, Any]:
    """The JOSE header (a JSON object) of a strict compact JWS."""
    header = decode_claims(check_compact(token)[0])
    if not isinstance(header, dict):
        raise MalformedToken
    return header


class HmacKey:
    """One HMAC secret, ready for HS256/384/512 (RFC 2104).

    The keyed inner and outer hash states are computed once per algorithm and copied for
    each signature: a third of the cost of ``hmac.digest`` with the same result.
    """

    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        self._states: dict[str, tuple[Any, Any]] = {}

    def sign(self, alg: str, message: bytes) -> bytes:
        states = self._states.get(alg)
        if states is None:
            states = self._states[alg] = self._prepare(alg)
        inner, outer = states[0].copy(), states[1].copy()
        inner.update(message)
        outer.update(inner.digest())
        return outer.digest()  # type: ignore[no-any-return]

    def verify(self, alg: str, message: bytes, signature: bytes) -> bool:
        """Constant-time comparison of ``signature`` with the MAC of ``message``."""
        return hmac.compare_digest(self.sign(alg, message), signature)

    def _prepare(self, alg: str) -> tuple[Any, Any]:
        name, block = _DIGESTS[alg]
        key = self._secret
        if len(key) > block:
            key = hashlib.new(name, key).digest()
        key = key.ljust(block, b"\0")
        return (hashlib.new(name, key.translate(_IPAD)), hashlib.new(name, key.translate(_OPAD)))


_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))
