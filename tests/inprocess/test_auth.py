"""Tests for tidings.auth: token verification, JWKS keys, minting and durations."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from paths import DATA
from tidings.auth import (
    JWKS_REFETCH_INTERVAL,
    MAX_TOKEN_BYTES,
    Authenticator,
    Identity,
    mint_token,
    parse_duration,
)
from tidings.config import AuthSettings
from tidings.errors import ConfigError, Unauthorized
from timeouts import TIMEOUT

SECRET = "tidings-test-secret-7f3a9c0d-51be-4e0a-9d77-c2b8e1f04a6d-0123456789abcdef"
NOW = 1_700_000_000.0
WYCHEPROOF_FILE = DATA / "wycheproof_jws_subset.json"
WYCHEPROOF = json.loads(WYCHEPROOF_FILE.read_text())
MISSING = object()
#: Every reason the module may give: fixed texts, so none can carry token or secret bytes.
REASONS = frozenset(
    {
        "token missing",
        "token too large",
        "malformed token",
        "token algorithm not allowed",
        "token cannot be verified",
        "unknown signing key",
        "invalid token signature",
        "token expired",
        "token not yet valid",
        "token issuer not accepted",
        "token audience not accepted",
        "token has an invalid nbf claim",
        "token has an invalid iat claim",
    }
    | {f"token has no usable {claim} claim" for claim in ("sub", "exp", "iss", "aud")}
)

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
MakeAuth = Callable[..., Authenticator]


class Clock:
    """A settable time source."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid claims at NOW; an override of MISSING removes that claim."""
    base: dict[str, Any] = {"sub": "user-1", "iat": int(NOW), "exp": int(NOW) + 3600}
    base.update(overrides)
    return {name: value for name, value in base.items() if value is not MISSING}


def craft(
    payload: Mapping[str, Any] | bytes,
    header: Mapping[str, Any] | bytes | None = None,
    *,
    secret: str | bytes = SECRET,
) -> str:
    """HS256-sign hand-made header and payload bytes (JSON that json.dumps would refuse)."""
    head = header if isinstance(header, bytes) else json.dumps(header or {"alg": "HS256"}).encode()
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = f"{b64(head)}.{b64(body)}"
    key = secret.encode() if isinstance(secret, str) else secret
    return f"{signing_input}.{b64(hmac.new(key, signing_input.encode(), hashlib.sha256).digest())}"


def public_pem(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def write_pem(tmp_path: Path, key: PrivateKey) -> str:
    path = tmp_path / "public.pem"
    path.write_bytes(public_pem(key))
    return str(path)


def public_jwk(key: PrivateKey, kid: str | None, **fields: Any) -> dict[str, Any]:
    """The public JWK of ``key`` with an optional kid and extra members."""
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
    if kid is not None:
        jwk["kid"] = kid
    jwk.update(fields)
    return dict(jwk)


def signed(key: PrivateKey, alg: str, kid: str | None = None, **overrides: Any) -> str:
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims(**overrides), key, algorithm=alg, headers=headers)


async def rejected(auth: Authenticator, token: str | None, reason: str | None = None) -> str:
    """Assert ``token`` is refused with a message that leaks neither token nor secret."""
    with pytest.raises(Unauthorized) as info:
        await auth.authenticate(token)
    message = info.value.message
    assert message == str(info.value)
    assert message in REASONS
    assert SECRET not in message
    if token:
        assert token not in message
        assert all(part not in message for part in token.split(".") if len(part) >= 8)
    if reason is not None:
        assert message == reason
    return message


@pytest.fixture
async def make_auth() -> AsyncIterator[MakeAuth]:
    """Build Authenticators (secret SECRET, clock at NOW by default) and close them after."""
    made: list[Authenticator] = []

    def make(
        *,
        clock: Callable[[], float] | None = None,
        fetch_jwks: Any = None,
        dev_mode: bool = False,
        **settings: Any,
    ) -> Authenticator:
        settings.setdefault("secret", SECRET)
        auth = Authenticator(
            AuthSettings(**settings),
            dev_mode=dev_mode,
            clock=clock or Clock(),
            fetch_jwks=fetch_jwks,
        )
        made.append(auth)
        return auth

    yield make
    for auth in made:
        await auth.close()


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def new_ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


class JwksEndpoint:
    """A real JWKS endpoint whose document, status and latency a test controls."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        #: Raw reply bytes, served instead of ``document`` when set.
        self.body: bytes | None = None
        self.status = 200
        self.hits = 0
        self.hold = False
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        self.entered.set()
        if self.hold:
            await self.release.wait()
        if self.body is not None:
            return web.Response(body=self.body, status=self.status, content_type="application/json")
        return web.json_response(self.document, status=self.status)


@pytest.fixture
async def jwks_endpoint() -> AsyncIterator[JwksEndpoint]:
    """Serve a JwksEndpoint over HTTP on 127.0.0.1, on a free port."""
    endpoint = JwksEndpoint()
    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", endpoint.handle)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    endpoint.url = str(server.make_url("/.well-known/jwks.json"))
    yield endpoint
    endpoint.release.set()  # a held handler must finish, or shutdown waits for it
    await server.close()


class StubFetch:
    """A fetch_jwks stand-in that counts calls and can fail or hang."""

    def __init__(self, document: Mapping[str, Any]) -> None:
        self.document = document
        self.calls: list[tuple[str, float]] = []
        self.error: Exception | None = None
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def __call__(self, url: str, timeout: float) -> Mapping[str, Any]:
        self.calls.append((url, timeout))
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return self.document


# --- valid tokens -------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
async def test_hmac_token_is_accepted(make_auth: MakeAuth, alg: str) -> None:
    """A token signed with the configured secret and algorithm yields its identity."""
    auth = make_auth(algorithms=(alg,))
    token = mint_token(SECRET, "user-1", channels=["chat:1"], algorithm=alg, now=NOW)
    identity = await auth.authenticate(token)
    assert identity == Identity(
        user_id="user-1",
        expires_at=NOW + 3600,
        channels=("chat:1",),
        claims={"sub": "user-1", "iat": int(NOW), "exp": int(NOW) + 3600, "channels": ["chat:1"]},
    )
    assert isinstance(identity.expires_at, float)


@pytest.mark.parametrize(
    ("alg", "key_fixture"), [("RS256", "rsa_key"), ("ES256", "ec_key"), ("EdDSA", "ed_key")]
)
async def test_pem_public_key_verifies_asymmetric_tokens(
    make_auth: MakeAuth, tmp_path: Path, request: pytest.FixtureRequest, alg: str, key_fixture: str
) -> None:
    """RS256, ES256 and EdDSA tokens verify against a PEM public key file."""
    key = request.getfixturevalue(key_fixture)
    auth = make_auth(algorithms=(alg,), secret="", public_key_file=write_pem(tmp_path, key))
    assert (await auth.authenticate(signed(key, alg))).user_id == "user-1"


async def test_injected_clock_decides_expiry(make_auth: MakeAuth) -> None:
    """Time checks use the injected clock, not the wall clock (a 2001 token is valid in 2001)."""
    then = 1_000_000_000.0
    auth = make_auth(clock=Clock(then))
    assert (await auth.authenticate(mint_token(SECRET, "u", now=then))).expires_at == then + 3600


async def test_dev_mode_uses_the_filled_in_secret(make_auth: MakeAuth) -> None:
    """In development mode the secret placed in the settings verifies tokens."""
    auth = make_auth(dev_mode=True)
    assert auth.dev_mode
    assert (await auth.authenticate(mint_token(SECRET, "dev", now=NOW))).user_id == "dev"


async def test_empty_secret_cannot_verify_hmac(make_auth: MakeAuth) -> None:
    """Without a secret an HS256 token is refused rather than checked against an empty key."""
    auth = make_auth(secret="")
    await rejected(auth, mint_token(SECRET, "u", now=NOW), "token cannot be verified")


# --- time claims --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"exp": int(NOW) - 31}, "token expired"),
        ({"exp": int(NOW) - 30}, "token expired"),
        ({"exp": int(NOW) - 29}, None),
        ({"nbf": int(NOW) + 31}, "token not yet valid"),
        ({"nbf": int(NOW) + 29}, None),
        ({"iat": int(NOW) + 31}, "token not yet valid"),
        ({"iat": int(NOW) + 29}, None),
    ],
)
async def test_time_claims_with_leeway(
    make_auth: MakeAuth, overrides: dict[str, Any], reason: str | None
) -> None:
    """exp, nbf and iat are checked against the clock with the 30 s default leeway."""
    auth = make_auth()
    token = craft(claims(**overrides))
    if reason is None:
        assert (await auth.authenticate(token)).user_id == "user-1"
    else:
        await rejected(auth, token, reason)


async def test_zero_leeway_and_clock_advance(make_auth: MakeAuth) -> None:
    """With no leeway a token expires exactly when the clock reaches exp."""
    clock = Clock()
    auth = make_auth(leeway=0, clock=clock)
    token = mint_token(SECRET, "u", ttl=60, now=NOW)
    await auth.authenticate(token)
    clock.now = NOW + 60
    await rejected(auth, token, "token expired")


# --- signatures and algorithms ------------------------------------------------------------


async def test_wrong_secret_is_invalid_signature(make_auth: MakeAuth) -> None:
    """A token signed with another secret is refused."""
    token = mint_token("another-secret-" + "x" * 40, "u", now=NOW)
    await rejected(make_auth(), token, "invalid token signature")


async def test_tampered_payload_is_invalid_signature(make_auth: MakeAuth) -> None:
    """Changing the payload of a signed token breaks the signature."""
    header, _, signature = mint_token(SECRET, "u", now=NOW).split(".")
    forged = f"{header}.{b64(json.dumps(claims(sub='admin')).encode())}.{signature}"
    await rejected(make_auth(), forged, "invalid token signature")


async def test_algorithm_not_configured_is_refused(make_auth: MakeAuth) -> None:
    """An HS512 token is refused when only HS256 is configured."""
    token = mint_token(SECRET, "u", algorithm="HS512", now=NOW)
    await rejected(make_auth(), token, "token algorithm not allowed")


async def test_hs256_token_refused_when_rs256_configured(
    make_auth: MakeAuth, tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    """A correctly HMAC-signed token does not pass an RS256-only configuration."""
    auth = make_auth(algorithms=("RS256",), public_key_file=write_pem(tmp_path, rsa_key))
    await rejected(auth, mint_token(SECRET, "u", now=NOW), "token algorithm not allowed")


@pytest.mark.parametrize("algorithms", [("RS256",), ("RS256", "HS256")])
async def test_rs256_to_hs256_key_confusion(
    make_auth: MakeAuth, tmp_path: Path, rsa_key: rsa.RSAPrivateKey, algorithms: tuple[str, ...]
) -> None:
    """An HS256 token keyed with the public PEM never verifies, even with HS256 enabled."""
    auth = make_auth(algorithms=algorithms, public_key_file=write_pem(tmp_path, rsa_key))
    forged = craft(claims(), secret=public_pem(rsa_key))
    await rejected(auth, forged)


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "none"},
        {"alg": "None"},
        {"alg": "NONE"},
        {"alg": ""},
        {"alg": 256},
        {"alg": ["HS256"]},
        {"typ": "JWT"},
    ],
)
async def test_alg_none_missing_or_odd_is_refused(
    make_auth: MakeAuth, header: dict[str, Any]
) -> None:
    """alg none (any case), a missing alg and non-string algs are refused."""
    auth = make_auth()
    token = craft(claims(), json.dumps(header).encode())
    await rejected(auth, token, "token algorithm not allowed")
    unsigned = token.rsplit(".", 1)[0] + "."
    await rejected(auth, unsigned, "malformed token")


async def test_es256_token_with_rsa_pem_has_no_key(
    make_auth: MakeAuth,
    tmp_path: Path,
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    """A configured algorithm whose key type the PEM key does not fit finds no key."""
    auth = make_auth(algorithms=("RS256", "ES256"), public_key_file=write_pem(tmp_path, rsa_key))
    await rejected(auth, signed(ec_key, "ES256"), "unknown signing key")


# --- required and typed claims ------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"sub": MISSING}, "token has no usable sub claim"),
        ({"sub": None}, "token has no usable sub claim"),
        ({"sub": 42}, "token has no usable sub claim"),
        ({"sub": ["user-1"]}, "token has no usable sub claim"),
        ({"sub": ""}, "token has no usable sub claim"),
        ({"sub": "u" * 257}, "token has no usable sub claim"),
        ({"exp": MISSING}, "token has no usable exp claim"),
        ({"exp": str(int(NOW) + 3600)}, "token has no usable exp claim"),
        ({"exp": True}, "token has no usable exp claim"),
        ({"exp": [int(NOW) + 3600]}, "token has no usable exp claim"),
        ({"nbf": "0"}, "token has an invalid nbf claim"),
        ({"iat": False}, "token has an invalid iat claim"),
    ],
)
async def test_claims_must_have_the_right_types(
    make_auth: MakeAuth, overrides: dict[str, Any], reason: str
) -> None:
    """sub must be a short non-empty string, exp/nbf/iat real numbers (not strings or bools)."""
    await rejected(make_auth(), craft(claims(**overrides)), reason)


async def test_longest_sub_is_accepted(make_auth: MakeAuth) -> None:
    """A sub of exactly 256 characters is accepted."""
    identity = await make_auth().authenticate(craft(claims(sub="u" * 256)))
    assert identity.user_id == "u" * 256


@pytest.mark.parametrize(
    ("literal", "reason"),
    [
        (b'"exp":NaN', "token has no usable exp claim"),
        (b'"exp":Infinity', "token has no usable exp claim"),
        (b'"exp":-Infinity', "token has no usable exp claim"),
        (b'"exp":1e400', "token has no usable exp claim"),
        (b'"exp":1' + b"0" * 400, "token has no usable exp claim"),
        (b'"exp":1800000000,"nbf":NaN', "token has an invalid nbf claim"),
        (b'"exp":1800000000,"iat":-Infinity', "token has an invalid iat claim"),
    ],
)
async def test_non_finite_numbers_are_refused(
    make_auth: MakeAuth, literal: bytes, reason: str
) -> None:
    """NaN, Infinity and overflowing numbers, which Python's json accepts, are refused."""
    token = craft(b'{"sub":"user-1",' + literal + b"}")
    await rejected(make_auth(), token, reason)


# --- token shape --------------------------------------------------------------------------


def _padded_token() -> str:
    """A correctly signed token whose payload segment carries base64 '=' padding."""
    body = json.dumps(claims(pad="x")).encode()
    while len(body) % 3 == 0:
        body += b" "
    header = b64(b'{"alg":"HS256"}')
    payload = base64.urlsafe_b64encode(body).decode()
    assert payload.endswith("=")
    signing_input = f"{header}.{payload}"
    mac = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


GOOD = mint_token(SECRET, "user-1", now=NOW)


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(_padded_token(), id="padded-payload"),
        pytest.param(GOOD + "=", id="padded-signature"),
        pytest.param(" " + GOOD, id="leading-space"),
        pytest.param(GOOD + "\n", id="trailing-newline"),
        pytest.param(GOOD.replace(".", ". ", 1), id="inner-space"),
        pytest.param(GOOD[:10] + "\t" + GOOD[10:], id="tab"),
        pytest.param(GOOD + ".e30", id="four-segments"),
        pytest.param(GOOD + "..", id="five-segments"),
        pytest.param(GOOD.rsplit(".", 1)[0], id="two-segments"),
        pytest.param(GOOD.rsplit(".", 1)[0] + ".", id="empty-signature"),
        pytest.param("." + GOOD.split(".", 1)[1], id="empty-header"),
        pytest.param(GOOD[:5] + "é" + GOOD[6:], id="non-ascii"),
        pytest.param(GOOD.replace("-", "+").replace("_", "/") + "+/", id="standard-alphabet"),
        pytest.param("not a token", id="junk"),
        pytest.param("...", id="dots"),
    ],
)
async def test_non_compact_shapes_are_malformed(make_auth: MakeAuth, token: str) -> None:
    """Only three unpadded base64url segments with a signature are accepted."""
    await rejected(make_auth(), token, "malformed token")


@pytest.mark.parametrize(
    "header",
    [b"[1, 2]", b'"HS256"', b"42", b"null", b"not json", b"\xff\xfe\x00", b"[" * 5000, b""],
    ids=["array", "string", "number", "null", "not-json", "not-utf8", "deep-nesting", "empty"],
)
async def test_header_must_be_a_json_object(make_auth: MakeAuth, header: bytes) -> None:
    """A header that is not a JSON object is malformed, however it is crafted."""
    await rejected(make_auth(), craft(claims(), header), "malformed token")


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "HS256", "kid": 7},
        {"alg": "HS256", "b64": False, "crit": ["b64"]},
        {"alg": "HS256", "crit": ["exp"], "exp": 1},
    ],
    ids=["kid-not-string", "unencoded-payload", "unknown-crit"],
)
async def test_unsupported_header_parameters(make_auth: MakeAuth, header: dict[str, Any]) -> None:
    """A non-string kid, the b64 extension and unknown critical headers are refused."""
    await rejected(make_auth(), craft(claims(), json.dumps(header).encode()))


async def test_oversized_token_is_refused_before_decoding(make_auth: MakeAuth) -> None:
    """Anything over 8 KiB is refused as too large, garbage or validly signed alike."""
    auth = make_auth()
    await rejected(auth, "!" * (MAX_TOKEN_BYTES + 1), "token too large")
    await rejected(auth, craft(claims(blob="x" * MAX_TOKEN_BYTES)), "token too large")
    await rejected(auth, "é" * (MAX_TOKEN_BYTES // 2 + 1), "token too large")


async def test_token_just_under_the_limit_is_accepted(make_auth: MakeAuth) -> None:
    """A validly signed token of (nearly) 8192 bytes is accepted."""
    pad = 6000
    while len(craft(claims(blob="x" * (pad + 1)))) <= MAX_TOKEN_BYTES:
        pad += 1
    token = craft(claims(blob="x" * pad))
    assert MAX_TOKEN_BYTES - 3 <= len(token) <= MAX_TOKEN_BYTES
    assert (await make_auth().authenticate(token)).user_id == "user-1"


@pytest.mark.parametrize("token", [None, ""])
async def test_missing_token(make_auth: MakeAuth, token: str | None) -> None:
    """No token at all is reported as missing."""
    await rejected(make_auth(), token, "token missing")


# --- issuer, audience, channels -----------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"iss": "https://issuer.example"}, None),
        ({"iss": "https://evil.example"}, "token issuer not accepted"),
        ({}, "token has no usable iss claim"),
    ],
)
async def test_issuer_checked_when_configured(
    make_auth: MakeAuth, overrides: dict[str, Any], reason: str | None
) -> None:
    """With an issuer configured, iss must be present and equal to it."""
    auth = make_auth(issuer="https://issuer.example")
    token = craft(claims(**overrides))
    if reason is None:
        await auth.authenticate(token)
    else:
        await rejected(auth, token, reason)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"aud": "tidings"}, None),
        ({"aud": ["other", "tidings"]}, None),
        ({"aud": "other"}, "token audience not accepted"),
        ({"aud": ["other"]}, "token audience not accepted"),
        ({}, "token has no usable aud claim"),
    ],
)
async def test_audience_checked_when_configured(
    make_auth: MakeAuth, overrides: dict[str, Any], reason: str | None
) -> None:
    """With an audience configured, aud must be present and contain it."""
    auth = make_auth(audience="tidings")
    token = craft(claims(**overrides))
    if reason is None:
        await auth.authenticate(token)
    else:
        await rejected(auth, token, reason)


async def test_audience_ignored_when_not_configured(make_auth: MakeAuth) -> None:
    """Without a configured audience, tokens carrying any aud still pass."""
    identity = await make_auth().authenticate(craft(claims(aud="someone-else")))
    assert identity.claims["aud"] == "someone-else"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (["chat:1", "task:*"], ("chat:1", "task:*")),
        (["chat:1", 7, None, {"x": 1}, "room:2"], ("chat:1", "room:2")),
        ("chat:1", ()),
        ({"chat:1": True}, ()),
        (None, ()),
        (MISSING, ()),
    ],
)
async def test_channels_claim_extraction(
    make_auth: MakeAuth, value: Any, expected: tuple[str, ...]
) -> None:
    """Only string items of a list-valued channels claim become channels."""
    identity = await make_auth().authenticate(craft(claims(channels=value)))
    assert identity.channels == expected


async def test_channels_claim_name_is_configurable(make_auth: MakeAuth) -> None:
    """The channels claim is read from the configured claim name."""
    auth = make_auth(channels_claim="rooms")
    identity = await auth.authenticate(craft(claims(rooms=["a:1"], channels=["b:2"])))
    assert identity.channels == ("a:1",)


# --- PEM configuration --------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b"", b"not a key", b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"],
    ids=["empty", "junk", "bad-base64"],
)
def test_bad_pem_is_a_config_error(tmp_path: Path, content: bytes) -> None:
    """A PEM file that holds no public key fails at construction with the key named."""
    path = tmp_path / "bad.pem"
    path.write_bytes(content)
    settings = AuthSettings(algorithms=("RS256",), public_key_file=str(path))
    with pytest.raises(ConfigError) as info:
        Authenticator(settings)
    assert info.value.key == "auth.public_key_file"


def test_private_key_pem_is_a_config_error(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    """A private key where the public key belongs is refused."""
    path = tmp_path / "private.pem"
    path.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ConfigError, match=r"auth\.public_key_file"):
        Authenticator(AuthSettings(algorithms=("RS256",), public_key_file=str(path)))


def test_pem_key_type_must_fit_an_algorithm(
    tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    """An EC key with only RSA algorithms configured is a configuration error."""
    pem = write_pem(tmp_path, ec_key)
    settings = AuthSettings(algorithms=("RS256", "PS256"), public_key_file=pem)
    with pytest.raises(ConfigError, match=r"auth\.public_key_file"):
        Authenticator(settings)


def test_unreadable_pem_is_a_config_error(tmp_path: Path) -> None:
    """A missing key file is a configuration error naming the key."""
    settings = AuthSettings(algorithms=("RS256",), public_key_file=str(tmp_path / "absent.pem"))
    with pytest.raises(ConfigError, match=r"auth\.public_key_file"):
        Authenticator(settings)


# --- JWKS ---------------------------------------------------------------------------------


async def test_jwks_over_http_verifies_rs256(
    make_auth: MakeAuth, jwks_endpoint: JwksEndpoint, rsa_key: rsa.RSAPrivateKey
) -> None:
    """A token whose kid is in the served JWKS verifies; the set is fetched once and cached."""
    jwks_endpoint.document = {"keys": [public_jwk(rsa_key, "r1", alg="RS256", use="sig")]}
    auth = make_auth(algorithms=("RS256",), jwks_url=jwks_endpoint.url)
    for _ in range(3):
        assert (await auth.authenticate(signed(rsa_key, "RS256", "r1"))).user_id == "user-1"
    assert jwks_endpoint.hits == 1


async def test_jwks_key_rotation_refetch_is_rate_limited(
    make_auth: MakeAuth, jwks_endpoint: JwksEndpoint
) -> None:
    """An unknown kid refetches once; another within 30 s does not; after 30 s it does."""
    k1, k2, k3 = new_ec_key(), new_ec_key(), new_ec_key()
    clock = Clock()
    jwks_endpoint.document = {"keys": [public_jwk(k1, "k1")]}
    auth = make_auth(algorithms=("ES256",), jwks_url=jwks_endpoint.url, clock=clock)
    await auth.authenticate(signed(k1, "ES256", "k1"))
    assert jwks_endpoint.hits == 1

    jwks_endpoint.document = {"keys": [public_jwk(k1, "k1"), public_jwk(k2, "k2")]}
    await auth.authenticate(signed(k2, "ES256", "k2"))
    assert jwks_endpoint.hits == 2

    jwks_endpoint.document = {"keys": [public_jwk(k2, "k2"), public_jwk(k3, "k3")]}
    clock.now += JWKS_REFETCH_INTERVAL - 1
    await rejected(auth, signed(k3, "ES256", "k3"), "unknown signing key")
    await rejected(auth, signed(k3, "ES256", "unheard-of"), "unknown signing key")
    assert jwks_endpoint.hits == 2

    clock.now += 1
    await auth.authenticate(signed(k3, "ES256", "k3"))
    assert jwks_endpoint.hits == 3
    await rejected(auth, signed(k1, "ES256", "k1"), "unknown signing key")  # k1 was retired
    assert jwks_endpoint.hits == 3


async def test_concurrent_authentications_share_one_fetch(
    make_auth: MakeAuth, jwks_endpoint: JwksEndpoint, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    """Many authentications waiting for the JWKS cause a single HTTP request."""
    jwks_endpoint.document = {"keys": [public_jwk(ec_key, "e1")]}
    jwks_endpoint.hold = True
    auth = make_auth(algorithms=("ES256",), jwks_url=jwks_endpoint.url)
    token = signed(ec_key, "ES256", "e1")
    tasks = [asyncio.create_task(auth.authenticate(token)) for _ in range(25)]
    await asyncio.wait_for(jwks_endpoint.entered.wait(), timeout=TIMEOUT)
    jwks_endpoint.release.set()
    identities = await asyncio.wait_for(asyncio.gather(*tasks), timeout=TIMEOUT)
    assert {identity.user_id for identity in identities} == {"user-1"}
    assert jwks_endpoint.hits == 1


async def test_concurrent_refetches_share_one_fetch(ec_key: ec.EllipticCurvePrivateKey) -> None:
    """Authentications with the same new kid share the one refetch, and a cancelled waiter
    does not cancel it for the others."""
    old = new_ec_key()
    fetch = StubFetch({"keys": [public_jwk(old, "old")]})
    settings = AuthSettings(algorithms=("ES256",), jwks_url="https://idp.example/jwks")
    auth = Authenticator(settings, clock=Clock(), fetch_jwks=fetch)
    await auth.authenticate(signed(old, "ES256", "old"))
    fetch.document = {"keys": [public_jwk(old, "old"), public_jwk(ec_key, "new")]}
    fetch.gate = asyncio.Event()
    fetch.entered.clear()
    token = signed(ec_key, "ES256", "new")
    tasks = [asyncio.create_task(auth.authenticate(token)) for _ in range(10)]
    # The fetch task was created by the first waiter, so once it runs every waiter has
    # reached the shared fetch.
    await asyncio.wait_for(fetch.entered.wait(), timeout=TIMEOUT)
    tasks[0].cancel()
    fetch.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert all(isinstance(result, Identity) for result in results[1:])
    assert len(fetch.calls) == 2
    await auth.close()


async def test_jwks_fetch_timeout_is_unauthorized(
    make_auth: MakeAuth, jwks_endpoint: JwksEndpoint, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    """A JWKS endpoint that never answers yields Unauthorized after jwks_timeout, not a hang."""
    jwks_endpoint.hold = True
    auth = make_auth(algorithms=("ES256",), jwks_url=jwks_endpoint.url, jwks_timeout=0.2)
    token = signed(ec_key, "ES256", "e1")
    with pytest.raises(Unauthorized, match="unknown signing key"):
        await asyncio.wait_for(auth.authenticate(token), timeout=TIMEOUT)


async def test_hanging_injected_fetch_is_bounded(ec_key: ec.EllipticCurvePrivateKey) -> None:
    """An injected fetcher that ignores its timeout is still cut off at jwks_timeout."""
    fetch = StubFetch({"keys": []})
    fetch.gate = asyncio.Event()  # never set
    settings = AuthSettings(
        algorithms=("ES256",), jwks_url="https://idp.example/jwks", jwks_timeout=0.1
    )
    auth = Authenticator(settings, fetch_jwks=fetch)
    with pytest.raises(Unauthorized, match="unknown signing key"):
        await asyncio.wait_for(auth.authenticate(signed(ec_key, "ES256", "e1")), timeout=TIMEOUT)
    assert fetch.calls == [("https://idp.example/jwks", 0.1)]


async def test_fetch_failure_keeps_cached_keys_and_logs_safely(
    ec_key: ec.EllipticCurvePrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    """A failed refetch keeps the cached set; the warning masks the password and omits the query."""
    url = "https://user:pw@idp.example/jwks?api_key=hunter2#frag"
    fetch = StubFetch({"keys": [public_jwk(ec_key, "e1")]})
    clock = Clock()
    settings = AuthSettings(algorithms=("ES256",), jwks_url=url)
    auth = Authenticator(settings, clock=clock, fetch_jwks=fetch)
    await auth.authenticate(signed(ec_key, "ES256", "e1"))
    fetch.error = OSError(f"connection to {url} refused")
    caplog.set_level(logging.WARNING, logger="tidings.auth")
    await rejected(auth, signed(new_ec_key(), "ES256", "e2"), "unknown signing key")
    assert (await auth.authenticate(signed(ec_key, "ES256", "e1"))).user_id == "user-1"
    assert len(fetch.calls) == 2
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1
    assert "https://user:***@idp.example/jwks failed" in warnings[0]  # as every logged URL
    assert all(word not in warnings[0] for word in ("hunter2", "api_key", "pw@", "frag"))
    clock.now += JWKS_REFETCH_INTERVAL  # after a failure, the next try waits the interval
    await rejected(auth, signed(new_ec_key(), "ES256", "e3"), "unknown signing key")
    assert len(fetch.calls) == 3


async def test_initial_fetch_failure_then_recovery(ec_key: ec.EllipticCurvePrivateKey) -> None:
    """With nothing cached, a failed fetch refuses tokens; the retry after the interval works."""
    fetch = StubFetch({"keys": [public_jwk(ec_key, "e1")]})
    fetch.error = OSError("down")
    clock = Clock()
    settings = AuthSettings(algorithms=("ES256",), jwks_url="https://idp.example/jwks")
    auth = Authenticator(settings, clock=clock, fetch_jwks=fetch)
    token = signed(ec_key, "ES256", "e1")
    await rejected(auth, token, "unknown signing key")
    await rejected(auth, token, "unknown signing key")
    assert len(fetch.calls) == 1
    fetch.error = None
    clock.now += JWKS_REFETCH_INTERVAL
    assert (await auth.authenticate(token)).user_id == "user-1"


async def test_http_error_status_is_a_fetch_failure(
    make_auth: MakeAuth,
    jwks_endpoint: JwksEndpoint,
    ec_key: ec.EllipticCurvePrivateKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A non-200 JWKS response is logged with its status and yields no key."""
    jwks_endpoint.document = {"keys": [public_jwk(ec_key, "e1")]}
    jwks_endpoint.status = 503
    caplog.set_level(logging.WARNING, logger="tidings.auth")
    auth = make_auth(algorithms=("ES256",), jwks_url=jwks_endpoint.url + "?tenant=secret-tenant")
    await rejected(auth, signed(ec_key, "ES256", "e1"), "unknown signing key")
    message = caplog.records[0].getMessage()
    assert "503" in message
    assert "secret-tenant" not in message


@pytest.mark.parametrize(
    "document",
    [{"keys": []}, {"keys": "nope"}, {}, {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}],
    ids=["empty", "not-a-list", "no-keys", "only-symmetric"],
)
async def test_unusable_jwks_yields_no_key(
    ec_key: ec.EllipticCurvePrivateKey, document: dict[str, Any]
) -> None:
    """A JWKS without usable public signature keys is a fetch failure; tokens are refused."""
    settings = AuthSettings(algorithms=("ES256",), jwks_url="https://idp.example/jwks")
    auth = Authenticator(settings, fetch_jwks=StubFetch(document))
    await rejected(auth, signed(ec_key, "ES256", "e1"), "unknown signing key")


async def test_token_without_kid_needs_exactly_one_fitting_key(
    ec_key: ec.EllipticCurvePrivateKey, rsa_key: rsa.RSAPrivateKey
) -> None:
    """Without kid the single key fitting the algorithm is used; with two, none is."""
    fetch = StubFetch({"keys": [public_jwk(ec_key, "e1"), public_jwk(rsa_key, "r1")]})
    settings = AuthSettings(algorithms=("ES256", "RS256"), jwks_url="https://idp.example/jwks")
    clock = Clock()
    auth = Authenticator(settings, clock=clock, fetch_jwks=fetch)
    assert (await auth.authenticate(signed(ec_key, "ES256"))).user_id == "user-1"
    fetch.document = {"keys": [public_jwk(ec_key, "e1"), public_jwk(new_ec_key(), "e2")]}
    clock.now += JWKS_REFETCH_INTERVAL
    await rejected(auth, signed(new_ec_key(), "ES256", "e9"), "unknown signing key")  # refetch
    assert len(fetch.calls) == 2
    await rejected(auth, signed(ec_key, "ES256"), "unknown signing key")


async def test_jwk_alg_use_and_key_ops_restrict_keys(rsa_key: rsa.RSAPrivateKey) -> None:
    """A JWK's alg pins it (PS256 needs an RSA key without alg or with PS256); enc keys and
    keys without verify in key_ops are skipped."""
    url = "https://idp.example/jwks"

    async def authenticate(jwk: dict[str, Any], alg: str) -> Identity:
        auth = Authenticator(
            AuthSettings(algorithms=(alg,), jwks_url=url),
            clock=Clock(),
            fetch_jwks=StubFetch({"keys": [jwk]}),
        )
        return await auth.authenticate(signed(rsa_key, alg, "r1"))

    assert (await authenticate(public_jwk(rsa_key, "r1"), "PS256")).user_id == "user-1"
    assert (await authenticate(public_jwk(rsa_key, "r1", alg="PS256"), "PS256")).user_id
    assert (await authenticate(public_jwk(rsa_key, "r1", key_ops=["verify"]), "RS256")).user_id
    for jwk, alg in [
        (public_jwk(rsa_key, "r1", alg="RS256"), "PS256"),
        (public_jwk(rsa_key, "r1", use="enc"), "RS256"),
        (public_jwk(rsa_key, "r1", key_ops=["encrypt"]), "RS256"),
    ]:
        with pytest.raises(Unauthorized, match="unknown signing key"):
            await authenticate(jwk, alg)


async def test_key_carrying_headers_are_ignored(ec_key: ec.EllipticCurvePrivateKey) -> None:
    """jku, x5u, jwk and x5c never supply or locate a key: an attacker's embedded key fails."""
    attacker = new_ec_key()
    fetch = StubFetch({"keys": [public_jwk(ec_key, "e1")]})
    settings = AuthSettings(algorithms=("ES256",), jwks_url="https://idp.example/jwks")
    auth = Authenticator(settings, clock=Clock(), fetch_jwks=fetch)
    headers = {
        "kid": "e1",
        "jwk": public_jwk(attacker, "e1"),
        "jku": "https://attacker.example/jwks",
        "x5u": "https://attacker.example/cert.pem",
        "x5c": ["MIIB"],
    }
    forged = jwt.encode(claims(), attacker, algorithm="ES256", headers=headers)
    await rejected(auth, forged, "invalid token signature")
    headers["kid"] = "attacker"
    forged = jwt.encode(claims(), attacker, algorithm="ES256", headers=headers)
    await rejected(auth, forged, "unknown signing key")
    assert {url for url, _ in fetch.calls} == {"https://idp.example/jwks"}


async def test_pem_and_jwks_together(
    make_auth: MakeAuth,
    tmp_path: Path,
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    """With both configured, a kid selects the JWKS and a kid-less token the PEM key."""
    fetch = StubFetch({"keys": [public_jwk(ec_key, "e1")]})
    auth = make_auth(
        algorithms=("RS256", "ES256"),
        public_key_file=write_pem(tmp_path, rsa_key),
        jwks_url="https://idp.example/jwks",
        fetch_jwks=fetch,
    )
    assert (await auth.authenticate(signed(rsa_key, "RS256"))).user_id == "user-1"
    assert fetch.calls == []
    assert (await auth.authenticate(signed(ec_key, "ES256", "e1"))).user_id == "user-1"


def test_jwks_url_must_be_http() -> None:
    """A JWKS URL that is not http(s) is a configuration error."""
    with pytest.raises(ConfigError, match=r"auth\.jwks_url"):
        Authenticator(AuthSettings(algorithms=("RS256",), jwks_url="file:///etc/jwks.json"))


async def test_close_releases_the_http_session(
    jwks_endpoint: JwksEndpoint, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    """close() closes the session the default fetcher created, and may be called twice."""
    jwks_endpoint.document = {"keys": [public_jwk(ec_key, "e1")]}
    settings = AuthSettings(algorithms=("ES256",), jwks_url=jwks_endpoint.url)
    auth = Authenticator(settings, clock=Clock())
    await auth.authenticate(signed(ec_key, "ES256", "e1"))
    session = auth._jwks.session
    assert session is not None and not session.closed
    await auth.close()
    assert session.closed
    await auth.close()


# --- Wycheproof vectors -------------------------------------------------------------------


WYCHEPROOF_VECTORS = [
    pytest.param(group["key"], test["jws"], id=f"{group['comment']}-{test['tcId']}")
    for group in WYCHEPROOF["testGroups"]
    for test in group["tests"]
]


def test_wycheproof_data_keeps_its_provenance() -> None:
    """The copied vector file keeps its source, commit and license fields."""
    assert WYCHEPROOF["license"].startswith("Apache-2.0")
    assert "wycheproof" in WYCHEPROOF["source"]
    assert len(WYCHEPROOF["commit"]) == 40
    assert len(WYCHEPROOF_VECTORS) > 250


def wycheproof_settings(key: dict[str, Any], tmp_path: Path) -> AuthSettings:
    """Settings verifying with the group's key: the oct bytes as secret, else a PEM file."""
    if key["kty"] == "oct":
        raw = base64.urlsafe_b64decode(key["k"] + "=" * (-len(key["k"]) % 4))
        # settings.secret is text that PyJWT encodes as UTF-8: the all-zero key round-trips
        # exactly; the "hs256" group's key is not UTF-8, so latin-1 text stands in for it
        # and only that group's structural vectors (not its modified MACs) keep full force.
        return AuthSettings(algorithms=(key["alg"],), secret=raw.decode("latin-1"))
    public = jwt.PyJWK(key).key
    path = tmp_path / "wycheproof.pem"
    path.write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return AuthSettings(algorithms=(key["alg"],), public_key_file=str(path))


@pytest.mark.parametrize(("key", "jws"), WYCHEPROOF_VECTORS)
async def test_wycheproof_vector_is_rejected(tmp_path: Path, key: dict[str, Any], jws: str) -> None:
    """Every invalid Wycheproof JWS vector is refused by a verifier holding the group's key."""
    auth = Authenticator(wycheproof_settings(key, tmp_path), clock=Clock(NOW))
    await rejected(auth, jws)


async def test_wycheproof_zero_key_control_is_accepted(tmp_path: Path) -> None:
    """The all-zero HS256 group key does verify a good token, so its rejections are meaningful."""
    group = next(g for g in WYCHEPROOF["testGroups"] if g["key"].get("k", "").startswith("AAAA"))
    auth = Authenticator(wycheproof_settings(group["key"], tmp_path), clock=Clock(NOW))
    token = craft(claims(), {"alg": "HS256", "kid": "hs256-key"}, secret=b"\x00" * 32)
    assert (await auth.authenticate(token)).user_id == "user-1"


async def test_wycheproof_asymmetric_vectors_rejected_via_jwks() -> None:
    """The RS256/ES256 vectors are also refused when the group key comes from a JWKS."""
    for group in WYCHEPROOF["testGroups"]:
        key = group["key"]
        if key["kty"] == "oct":
            continue
        settings = AuthSettings(algorithms=(key["alg"],), jwks_url="https://idp.example/jwks")
        auth = Authenticator(settings, clock=Clock(), fetch_jwks=StubFetch({"keys": [key]}))
        for test in group["tests"]:
            await rejected(auth, test["jws"])


# --- robustness ---------------------------------------------------------------------------


def _authenticate_sync(token: str) -> Identity | None:
    """Run one authentication on a fresh loop; None when refused (message checked)."""
    auth = Authenticator(AuthSettings(secret=SECRET), clock=Clock())
    try:
        return asyncio.run(auth.authenticate(token))
    except Unauthorized as exc:
        assert exc.message in REASONS
        return None


@hypothesis_settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_arbitrary_text_only_ever_raises_unauthorized(text: str) -> None:
    """Random strings are refused with Unauthorized and nothing else."""
    assert _authenticate_sync(text) is None


@hypothesis_settings(max_examples=300, deadline=None)
@given(
    st.integers(min_value=0, max_value=len(GOOD) - 1),
    st.sampled_from("AZaz09-_.= +/%\x00é"),
)
def test_mutated_tokens_never_crash(index: int, char: str) -> None:
    """Changing one character of a good token yields either the same identity or Unauthorized."""
    mutated = GOOD[:index] + char + GOOD[index + 1 :]
    result = _authenticate_sync(mutated)
    assert result is None or result.user_id == "user-1"


# --- mint_token and parse_duration --------------------------------------------------------


def test_mint_token_claims() -> None:
    """mint_token writes sub, iat, exp, channels only when given, then the extra claims."""
    token = mint_token(SECRET, "u", ttl=60, now=NOW, channels=["a:1"], extra={"role": "admin"})
    decoded = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False})
    assert decoded == {
        "sub": "u",
        "iat": int(NOW),
        "exp": int(NOW) + 60,
        "channels": ["a:1"],
        "role": "admin",
    }
    plain = jwt.decode(
        mint_token(SECRET, "u", now=NOW),
        SECRET,
        algorithms=["HS256"],
        options={"verify_exp": False},
    )
    assert "channels" not in plain
    assert jwt.get_unverified_header(mint_token(SECRET, "u", algorithm="HS384"))["alg"] == "HS384"


async def test_mint_token_negative_ttl_is_already_expired(make_auth: MakeAuth) -> None:
    """A negative ttl mints a token that is expired beyond the leeway."""
    await rejected(make_auth(), mint_token(SECRET, "u", ttl=-60, now=NOW), "token expired")


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_mint_token_writes_what_pyjwt_writes(alg: str) -> None:
    """The standard-library minter (no PyJWT import for the CLI) signs byte for byte the
    token PyJWT would."""
    claims = {"sub": "u", "iat": int(NOW), "exp": int(NOW) + 60, "channels": ["a:1", "é:2"]}
    assert mint_token(
        SECRET, "u", ttl=60, now=NOW, channels=["a:1", "é:2"], algorithm=alg
    ) == jwt.encode(claims, SECRET, algorithm=alg)


def test_mint_token_default_now_is_the_wall_clock() -> None:
    """Without now, a minted token is valid for real time."""
    decoded = jwt.decode(mint_token(SECRET, "u", ttl=120), SECRET, algorithms=["HS256"])
    assert decoded["exp"] - decoded["iat"] == 120


@pytest.mark.parametrize(
    "kwargs",
    [
        {"algorithm": "RS256"},
        {"algorithm": "none"},
        {"secret": ""},
        {"sub": ""},
        {"ttl": float("inf")},
        {"ttl": float("nan")},
        {"channels": "chat:1"},
    ],
)
def test_mint_token_rejects_bad_arguments(kwargs: dict[str, Any]) -> None:
    """Non-HMAC algorithms, empty secret or sub, a non-finite ttl and bare-string channels fail."""
    arguments: dict[str, Any] = {"secret": SECRET, "sub": "u", **kwargs}
    with pytest.raises(ValueError):
        mint_token(**arguments)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("3600", 3600.0),
        ("90s", 90.0),
        ("15m", 900.0),
        ("1h", 3600.0),
        ("2d", 172800.0),
        ("1.5h", 5400.0),
        (" 10M ", 600.0),
        ("0", 0.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    """Plain seconds and s/m/h/d suffixes convert to seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "h", "-5", "1w", "1h30m", "1e3", "inf", "nan", "1..5s", "١٢", "9" * 400, "5 m"]
)
def test_parse_duration_rejects_junk(text: str) -> None:
    """Anything but a non-negative number with an optional unit is a clear ValueError."""
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@hypothesis_settings(max_examples=300, deadline=None)
@given(
    position=st.integers(min_value=0, max_value=400),
    char=st.sampled_from("AaZz09-_.=+/ \x00é"),
    alg=st.sampled_from(["HS256", "HS384", "HS512"]),
)
def test_hmac_fast_path_agrees_with_pyjwt(position: int, char: str, alg: str) -> None:
    """The HS* fast path accepts and rejects exactly the tokens PyJWT's path does."""
    auth_settings = AuthSettings(algorithms=("HS256", "HS384", "HS512"), secret="s" * 64, leeway=0)
    fast = Authenticator(auth_settings, clock=lambda: 1_000.0)
    slow = Authenticator(auth_settings, clock=lambda: 1_000.0)
    slow._hmac_fast = False  # the reference: every token through PyJWT
    good = mint_token("s" * 64, "alice", channels=["news:*"], ttl=600, algorithm=alg, now=1_000.0)
    index = position % (len(good) + 1)
    token = good[:index] + char + good[index + 1 :]

    def outcome(auth: Authenticator) -> object:
        try:
            identity = asyncio.run(auth.authenticate(token))
        except Unauthorized:
            return "rejected"
        return (identity.user_id, identity.expires_at, identity.channels)

    assert outcome(fast) == outcome(slow)


# --- verification without waiting (the handshake's path) --------------------------------


async def test_verify_now_verifies_hmac_tokens_without_waiting(make_auth: MakeAuth) -> None:
    """HS* tokens are verified synchronously, with the same identity and refusals."""
    auth = make_auth()
    token = mint_token(SECRET, "user-1", channels=["chat:1"], now=NOW)
    assert auth.verify_now(token) == await auth.authenticate(token)
    with pytest.raises(Unauthorized, match="invalid token signature"):
        auth.verify_now(mint_token("another-secret-of-32-bytes-or-more!", "user-1", now=NOW))
    with pytest.raises(Unauthorized, match="token missing"):
        auth.verify_now(None)


async def test_verify_now_defers_to_authenticate_until_the_jwks_is_cached(
    make_auth: MakeAuth, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    """A JWKS token gives None (fetch needed) until the key set is cached, then verifies
    synchronously without another fetch."""
    fetch = StubFetch({"keys": [public_jwk(ec_key, "e1")]})
    auth = make_auth(
        algorithms=("ES256",), jwks_url="https://issuer.example/jwks", fetch_jwks=fetch
    )
    token = signed(ec_key, "ES256", "e1")
    assert auth.verify_now(token) is None
    assert fetch.calls == []
    assert (await auth.authenticate(token)).user_id == "user-1"
    identity = auth.verify_now(token)
    assert identity is not None and identity.user_id == "user-1"
    assert len(fetch.calls) == 1
    assert auth.verify_now(signed(ec_key, "ES256", "unknown-kid")) is None


async def test_cached_header_does_not_vouch_for_the_rest_of_the_token(
    make_auth: MakeAuth,
) -> None:
    """A header seen before still comes with a full check of the other segments."""
    auth = make_auth()
    good = mint_token(SECRET, "user-1", now=NOW)
    assert (await auth.authenticate(good)).user_id == "user-1"
    header, payload, signature = good.split(".")
    for bad in (
        f"{header}.{payload}",
        f"{header}.{payload}.",
        f"{header}.{payload}+.{signature}",
        f"{header}.{payload}.{signature}=",
        f"{header}..{signature}",
    ):
        await rejected(auth, bad)


async def test_header_cache_stays_bounded(make_auth: MakeAuth) -> None:
    """Tokens with ever new headers do not grow memory without bound."""
    auth = make_auth()
    for index in range(500):
        token = jwt.encode(claims(), SECRET, algorithm="HS256", headers={"kid": f"k{index}"})
        assert (await auth.authenticate(token)).user_id == "user-1"
    assert len(auth._headers) <= 64


# HS384 MACs (48 bytes) fill their last base64 character: no spare bits to vary.
@pytest.mark.parametrize("alg", ["HS256", "HS512"])
async def test_non_canonical_signature_spelling_is_refused(make_auth: MakeAuth, alg: str) -> None:
    """A signature whose last character only changes unused bits decodes to the same MAC,
    yet is refused, as PyJWT refuses it: one token has one spelling."""
    auth = make_auth(algorithms=(alg,))
    good = mint_token(SECRET, "user-1", algorithm=alg, now=NOW)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    index = alphabet.index(good[-1])
    twin = good[:-1] + alphabet[index + 1]  # canonical last characters have zero low bits

    def lenient(token: str) -> bytes:
        segment = token.rsplit(".", 1)[1]
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))

    assert lenient(twin) == lenient(good)
    assert (await auth.authenticate(good)).user_id == "user-1"
    await rejected(auth, twin, "malformed token")
    with pytest.raises(jwt.DecodeError):
        jwt.decode(twin, SECRET, algorithms=[alg], options={"verify_exp": False})


# --- canonical form and depth on every verification path --------------------------------

#: The base64url alphabet in order: a character's index is its 6-bit value.
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
#: Where a token is verified: the HS* fast path, PyJWT for HS256 (an issuer to check),
#: a PEM key (RS256) and a JWKS key (ES256).
PATHS = ["hs256-fast", "hs256-pyjwt", "rs256-pem", "es256-jwks"]
SEGMENTS = ["header", "payload", "signature"]


class Issuer:
    """Signs hand-spelled tokens for one verification path and the Authenticator to
    verify them."""

    def __init__(
        self,
        path: str,
        make_auth: MakeAuth,
        tmp_path: Path,
        rsa_key: rsa.RSAPrivateKey,
        ec_key: ec.EllipticCurvePrivateKey,
    ) -> None:
        self.header: dict[str, Any] = {"alg": "HS256"}
        self.claims = claims()
        self.key: Any = SECRET
        if path == "hs256-fast":
            self.auth = make_auth()
        elif path == "hs256-pyjwt":
            self.claims["iss"] = "https://issuer.example"
            self.auth = make_auth(issuer="https://issuer.example")
        elif path == "rs256-pem":
            self.header, self.key = {"alg": "RS256"}, rsa_key
            self.auth = make_auth(
                algorithms=("RS256",), public_key_file=write_pem(tmp_path, rsa_key)
            )
        else:
            self.header, self.key = {"alg": "ES256", "kid": "e1"}, ec_key
            fetch = StubFetch({"keys": [public_jwk(ec_key, "e1")]})
            self.auth = make_auth(
                algorithms=("ES256",), jwks_url="https://idp.example/jwks", fetch_jwks=fetch
            )

    def token(
        self, spelling: Callable[[str, bytes], str] | None = None, payload: bytes | None = None
    ) -> str:
        """A correctly signed token; ``spelling(segment_name, data)`` writes each segment
        (default: canonical unpadded base64url), the signature over the spelled ones."""
        spell = spelling or (lambda _name, data: b64(data))
        header = spell("header", _unaligned(json.dumps(self.header).encode()))
        body = spell("payload", payload or _unaligned(json.dumps(self.claims).encode()))
        algorithm = jwt.get_algorithm_by_name(self.header["alg"])
        signature = algorithm.sign(f"{header}.{body}".encode(), algorithm.prepare_key(self.key))
        return f"{header}.{body}.{spell('signature', signature)}"


def _unaligned(document: bytes) -> bytes:
    """``document`` with trailing spaces so its length is not a multiple of 3: its
    base64 form then has '=' padding and unused bits in its last character."""
    while len(document) % 3 == 0:
        document += b" "
    return document


def _padded(data: bytes) -> str:
    text = base64.urlsafe_b64encode(data).decode()
    assert text.endswith("=")
    return text


def _stray_bits(data: bytes) -> str:
    """Unpadded base64url whose last character also sets unused low bits: it decodes
    to the same bytes, leniently."""
    text = b64(data)
    twin = text[:-1] + ALPHABET[ALPHABET.index(text[-1]) + 1]
    assert base64.urlsafe_b64decode(twin + "=" * (-len(twin) % 4)) == data
    return twin


def _standard_alphabet(data: bytes) -> str:
    """Base64 with '+' and '/' (RFC 4648 section 4) instead of '-' and '_', unpadded."""
    return base64.b64encode(data).rstrip(b"=").decode()


SPELLINGS = {"padded": _padded, "stray-bits": _stray_bits, "standard-alphabet": _standard_alphabet}


@pytest.fixture
def issuer_for(
    make_auth: MakeAuth,
    tmp_path: Path,
    rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
) -> Callable[[str], Issuer]:
    return lambda path: Issuer(path, make_auth, tmp_path, rsa_key, ec_key)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("segment", SEGMENTS)
@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
async def test_every_segment_must_be_canonical_on_every_path(
    issuer_for: Callable[[str], Issuer], path: str, segment: str, spelling: str
) -> None:
    """A header, payload or signature spelled with '=' padding, stray trailing bits or
    the standard alphabet is refused, though signed with the right key over exactly
    that spelling, on the HS* fast path, PyJWT's path, a PEM key and a JWKS key."""
    issuer = issuer_for(path)
    if spelling == "standard-alphabet":
        # Values whose base64 holds '-' or '_' (and so '+' or '/') in every segment.
        issuer.header["x"] = issuer.claims["x"] = "~~~>>>???"
    assert (await issuer.auth.authenticate(issuer.token())).user_id == "user-1"

    def spell(name: str, data: bytes) -> str:
        return SPELLINGS[spelling](data) if name == segment else b64(data)

    for attempt in range(64):
        issuer.claims["n"] = attempt  # another signature, until the spelling differs
        variant = issuer.token(spell)
        spelled = variant.split(".")[SEGMENTS.index(segment)]
        if spelling != "standard-alphabet" or "+" in spelled or "/" in spelled:
            break
    else:
        pytest.fail("no signature holds '-' or '_'")
    await rejected(issuer.auth, variant, "malformed token")
    with pytest.raises(Unauthorized, match="malformed token"):
        issuer.auth.verify_now(variant)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("depth", [65, 900, 1200])  # 1200 in UTF-16 fits in 8 KiB
@pytest.mark.parametrize("encoding", ["utf-8", "utf-16"])
async def test_claims_deeper_than_the_protocol_limit_are_malformed(
    issuer_for: Callable[[str], Issuer], path: str, depth: int, encoding: str
) -> None:
    """A signed payload nesting deeper than MAX_JSON_DEPTH is "malformed token" on every
    path and in every encoding json.loads reads: 900 levels, which the JSON decoders
    would read, as well as 1200, which make them recurse too deep; 64 are accepted."""
    issuer = issuer_for(path)

    def payload(levels: int) -> bytes:
        inner = "[" * (levels - 1) + "]" * (levels - 1)
        return (json.dumps(issuer.claims)[:-1] + ', "x": ' + inner + "}").encode(encoding)

    assert (await issuer.auth.authenticate(issuer.token(payload=payload(64)))).user_id == "user-1"
    await rejected(issuer.auth, issuer.token(payload=payload(depth)), "malformed token")


async def test_deep_jwks_document_is_a_logged_fetch_failure(
    make_auth: MakeAuth,
    jwks_endpoint: JwksEndpoint,
    ec_key: ec.EllipticCurvePrivateKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A JWKS reply nesting 5000 levels deep is a fetch failure: one warning line without
    traceback, tokens refused with "unknown signing key"."""
    jwks_endpoint.body = b'{"keys":[' + b"[" * 5000 + b"]" * 5000 + b"]}"
    caplog.set_level(logging.WARNING)
    auth = make_auth(algorithms=("ES256",), jwks_url=jwks_endpoint.url)
    await rejected(auth, signed(ec_key, "ES256", "e1"), "unknown signing key")
    assert jwks_endpoint.hits == 1
    [record] = caplog.records
    assert "deeper than 64 levels" in record.getMessage()
    assert record.exc_info is None and "Traceback" not in caplog.text
