"""Unit tests for tidings.jws: strict compact form, canonical base64url, JSON, HMAC."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidings.jws import (
    HmacKey,
    MalformedToken,
    check_compact,
    decode_claims,
    decode_json,
    decode_segment,
    parse_header,
)
from tidings.protocol import MAX_JSON_DEPTH

ALGORITHMS = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.mark.parametrize("alg", sorted(ALGORITHMS))
@pytest.mark.parametrize("key_length", [0, 1, 31, 32, 63, 64, 65, 127, 128, 129, 300])
def test_hmac_key_matches_the_standard_library(alg: str, key_length: int) -> None:
    """Precomputed inner/outer states give hmac's result for keys shorter, equal to and
    longer than the hash's block size."""
    secret = (bytes(range(256)) * 2)[:key_length]
    key = HmacKey(secret)
    for message in (b"", b"a", b"header.payload" * 20):
        expected = hmac.new(secret, message, ALGORITHMS[alg]).digest()
        assert key.sign(alg, message) == expected
        assert key.verify(alg, message, expected)
        assert not key.verify(alg, message, expected[:-1] + bytes([expected[-1] ^ 1]))


@given(
    secret=st.binary(max_size=200),
    message=st.binary(max_size=300),
    alg=st.sampled_from(sorted(ALGORITHMS)),
)
def test_hmac_key_agrees_with_hmac_for_any_input(secret: bytes, message: bytes, alg: str) -> None:
    """For any secret and message, HmacKey signs exactly like hmac.digest."""
    assert HmacKey(secret).sign(alg, message) == hmac.digest(secret, message, ALGORITHMS[alg])


def test_hmac_key_reuses_its_states_across_signatures() -> None:
    """Signing twice with one key gives the same MAC (copied states are never consumed)."""
    key = HmacKey(b"secret")
    assert key.sign("HS256", b"m") == key.sign("HS256", b"m")
    assert key.sign("HS512", b"m") == hmac.digest(b"secret", b"m", "sha512")


@pytest.mark.parametrize("token", ["a.b.c", "..c", "eyJ.e30.x-_9", "A" * 10 + ".B.C"])
def test_check_compact_accepts_three_base64url_segments(token: str) -> None:
    """Three base64url segments, the last one not empty, are the compact form."""
    assert check_compact(token) == token.split(".")


@pytest.mark.parametrize(
    "token",
    [
        "",
        "a.b",
        "a.b.c.d",
        "a.b.",
        "a.b.c=",
        "a+.b.c",
        "a.b/.c",
        "a.b.c\n",
        " a.b.c",
        "a.b.cé",
        "a..b.c",
    ],
)
def test_check_compact_rejects_everything_else(token: str) -> None:
    """Padding, the standard alphabet, other separators or characters are malformed."""
    with pytest.raises(MalformedToken):
        check_compact(token)


@given(st.binary(max_size=80))
def test_decode_segment_round_trips_canonical_base64url(data: bytes) -> None:
    """Whatever bytes, their unpadded base64url decodes back to them."""
    assert decode_segment(b64(data)) == data


@pytest.mark.parametrize(
    ("canonical", "variant"), [("AQ", "AR"), ("AQ", "AZ"), ("AAE", "AAF"), ("AAE", "AAH")]
)
def test_decode_segment_rejects_non_canonical_trailing_bits(canonical: str, variant: str) -> None:
    """Unused low bits of the last character must be zero: one token, one spelling."""
    assert decode_segment(canonical)
    assert base64.urlsafe_b64decode(variant + "=" * (-len(variant) % 4)) == decode_segment(
        canonical
    )  # a lenient decoder would accept the variant as the same bytes
    with pytest.raises(MalformedToken):
        decode_segment(variant)


@pytest.mark.parametrize("segment", ["A", "AAAAA"])
def test_decode_segment_rejects_impossible_lengths(segment: str) -> None:
    """A length of 1 mod 4 cannot be base64."""
    with pytest.raises(MalformedToken):
        decode_segment(segment)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a":1}',
        b'{"a":"\xc3\xa9"}',
        b"[1,2]",
        b"1",
        b'"x"',
        b"{}",
        b"{ }",
        '{"a":1}'.encode("utf-16"),
        '{"a":1}'.encode("utf-16-le"),
        '{"a":1}'.encode("utf-32"),
        b'\xef\xbb\xbf{"a":1}',
        b'{"a":NaN}',
        b'{"a":1,"a":2}',
        b'{"\\ud800":1}',
    ],
)
def test_decode_json_is_exactly_json_loads(raw: bytes) -> None:
    """Same result as json.loads on bytes, encodings and oddities included."""
    # Compared as JSON text: NaN is not equal to itself.
    assert json.dumps(decode_json(raw)) == json.dumps(json.loads(raw))


@pytest.mark.parametrize(
    "raw", [b"", b"{", b'{"a":1}x', b"\xff\xfe", b'{"a":"\xff"}', b"[" * 100_000]
)
def test_decode_json_failures_are_malformed(raw: bytes) -> None:
    """Whatever json.loads rejects (or recurses too deep on) is MalformedToken."""
    with pytest.raises(MalformedToken):
        decode_json(raw)


def claims_of_depth(depth: int) -> str:
    """A claims object ``depth`` levels deep whose strings hold bytes 0x22 and 0x5B
    (quote, bracket) in their UTF-16 and UTF-32 forms."""
    inner = "[" * (depth - 1) + "]" * (depth - 1)
    return '{"sub":"\u2222\u5b5b","exp":1,"x":' + inner + "}"


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32"])
def test_decode_claims_limits_the_depth_in_every_encoding(encoding: str) -> None:
    """Claims decode up to MAX_JSON_DEPTH levels in every encoding json.loads reads;
    one level more, or 900 (under every recursion limit), is malformed."""
    within = claims_of_depth(MAX_JSON_DEPTH)
    assert decode_claims(b64(within.encode(encoding))) == json.loads(within)
    for depth in (MAX_JSON_DEPTH + 1, 900, 3000):
        with pytest.raises(MalformedToken):
            decode_claims(b64(claims_of_depth(depth).encode(encoding)))


def test_decode_claims_wants_canonical_base64url() -> None:
    """Claims segments obey decode_segment's canonical spelling."""
    segment = b64(b'{"a":1}')  # 10 characters: the last one has 4 unused bits
    decode_claims(segment)
    twin = segment[:-1] + chr(ord(segment[-1]) + 1)
    with pytest.raises(MalformedToken):
        decode_claims(twin)


def test_parse_header_refuses_deep_headers() -> None:
    """A header nested deeper than MAX_JSON_DEPTH is malformed, not a RecursionError."""
    for depth in (MAX_JSON_DEPTH + 1, 2000):
        header = b64(b'{"alg":"HS256","x":' + b"[" * depth + b"]" * depth + b"}")
        with pytest.raises(MalformedToken):
            parse_header(f"{header}.e30.c2ln")


def test_parse_header_needs_a_json_object() -> None:
    """The header is the first segment's JSON object; anything else is malformed."""
    header = b64(b'{"alg":"HS256"}')
    assert parse_header(f"{header}.e30.c2ln") == {"alg": "HS256"}
    for raw in (b"[]", b'"HS256"', b"null"):
        with pytest.raises(MalformedToken):
            parse_header(f"{b64(raw)}.e30.c2ln")


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(
    value=_JSON_VALUES,
    position=st.integers(min_value=0, max_value=200),
    byte=st.binary(min_size=0, max_size=2),
)
def test_decode_json_agrees_with_json_loads_on_mutated_documents(
    value: object, position: int, byte: bytes
) -> None:
    """On valid documents and on documents with bytes spliced in, decode_json either
    returns what json.loads returns or fails where json.loads fails."""
    text = json.dumps(value, ensure_ascii=bool(position % 2)).encode()
    index = position % (len(text) + 1)
    for raw in (text, text[:index] + byte + text[index:], text[:index] + byte + text[index + 1 :]):
        try:
            expected = json.dumps(json.loads(raw))
        except (ValueError, RecursionError):
            with pytest.raises(MalformedToken):
                decode_json(raw)
        else:
            assert json.dumps(decode_json(raw)) == expected
