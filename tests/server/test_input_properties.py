"""Property-based tests: whatever a client sends, only the documented errors come out.

The socket command parser (``Session.receive_text`` and the wire decoder), the publish
validator (``loads`` then ``ApiService``, as the HTTP routes run them) and the SSE
resume-token decoder (``Last-Event-ID``) are fed deep, huge
and malformed structures: nesting to 2,000 levels, integers like 10**400, inf and NaN,
non-UTF-8 bytes, lone surrogates, truncations and random text. A socket-level test then
checks the same over a real connection, log included.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import SECRET, connect, make_settings, serve, token, ws_assert_open, ws_until_close
from tidings.api.service import ApiService
from tidings.auth import Identity, mint_token
from tidings.brokers.memory import MemoryBroker
from tidings.config import LimitsSettings
from tidings.errors import InvalidRequest
from tidings.metrics import Metrics
from tidings.protocol import (
    MAX_JSON_DEPTH,
    BadCommand,
    Command,
    ErrorCode,
    decode_command,
    loads,
)
from tidings.protocol.messages import encode
from tidings.session import Send, Session, StartRefresh, StartSubscribe, StartUnsubscribe
from tidings.transport.sse_format import BadResumeToken, decode_token

pytestmark = pytest.mark.timeout(120)

PROPERTY = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- strategies ---------------------------------------------------------------------------

#: JSON scalars chosen to hurt: huge numbers (msgspec refuses 1e400, keeps 10**400),
#: lone surrogate escapes, NUL.
_JSON_SCALARS = [
    b"null",
    b"true",
    b"0",
    b"-0",
    b"1.5",
    b"1e400",
    b"-1e400",
    b"1e-400",
    b"1" + b"0" * 400,
    b"-" + b"9" * 400,
    b'"x"',
    b'""',
    b'"\\ud800"',
    b'"\\udc00\\ud800"',
    b'"\\u0000"',
]
#: Near-JSON that is not: literals JSON lacks, invalid UTF-8 and escapes, nothing.
_BROKEN_SCALARS = [
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b'"\xff"',
    b'"\xc3\x28"',
    b'"\xed\xa0\x80"',
    b"\xff",
    b"",
    b"'x'",
    b'"\\x"',
]
_scalar_text = st.one_of(
    st.sampled_from(_JSON_SCALARS),
    st.text(max_size=12).map(lambda text: json.dumps(text).encode()),
    st.integers().map(lambda number: str(number).encode()),
    st.sampled_from(_BROKEN_SCALARS),
    st.binary(max_size=6),
)


def _nest(fragment: bytes, levels: int, kind: str) -> bytes:
    """``fragment`` inside ``levels`` arrays or objects."""
    if kind == "[":
        return b"[" * levels + fragment + b"]" * levels
    return b'{"k":' * levels + fragment + b"}" * levels


#: Nesting depths: around the limit, around msgspec's recursion limit, anything to 2,000.
_levels = st.one_of(
    st.sampled_from([63, 64, 65, 999, 1000, 2000]), st.integers(min_value=1, max_value=2000)
)
#: JSON-shaped text: arrays, objects and long nestings (to 2,000 levels) of the above.
_fragments = st.recursive(
    _scalar_text,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda items: b"[" + b",".join(items) + b"]"),
        st.lists(st.tuples(_scalar_text, inner), max_size=3).map(
            lambda pairs: b"{" + b",".join(key + b":" + value for key, value in pairs) + b"}"
        ),
        st.tuples(inner, _levels, st.sampled_from("[{")).map(lambda args: _nest(*args)),
    ),
    max_leaves=12,
)


@st.composite
def _mutated(draw: st.DrawFn, document: bytes) -> bytes:
    """``document``, sometimes truncated, spliced with random bytes, or unbalanced."""
    how = draw(st.sampled_from(["as-is"] * 3 + ["truncate", "splice", "unclosed"]))
    if how == "truncate" and document:
        return document[: draw(st.integers(min_value=0, max_value=len(document) - 1))]
    if how == "splice":
        at = draw(st.integers(min_value=0, max_value=len(document)))
        return document[:at] + draw(st.binary(min_size=1, max_size=4)) + document[at:]
    if how == "unclosed":
        return draw(st.sampled_from([b"[", b"{", b'{"a":'])) * draw(_levels) + document
    return document


def _mostly(*usual: bytes) -> st.SearchStrategy[bytes]:
    """One of ``usual`` two times in three, else a hostile fragment."""
    return st.one_of(st.sampled_from(usual), st.sampled_from(usual), _fragments)


@st.composite
def commands(draw: st.DrawFn) -> bytes:
    """A client command: the protocol's shape with hostile values, or anything at all."""
    kind = draw(_mostly(b'"subscribe"', b'"unsubscribe"', b'"ping"', b'"refresh"'))
    command_id = draw(_mostly(b'"c1"'))
    channel = draw(_mostly(b'"news:a"'))
    recover = draw(_mostly(b'{"offset":1,"epoch":"e"}'))
    refresh_token = draw(_mostly(b'"a.b.c"'))
    data = draw(
        st.sampled_from(
            [
                b'{"channel":' + channel + b',"recover":' + recover + b"}",
                b'{"token":' + refresh_token + b"}",
                channel,
            ]
        )
    )
    shaped = b'{"type":' + kind + b',"id":' + command_id + b',"data":' + data + b"}"
    document = draw(_mostly(shaped, shaped, data))
    return draw(_mutated(document))


@st.composite
def publish_bodies(draw: st.DrawFn) -> bytes:
    """An HTTP publish body: the documented fields with hostile values, or anything."""
    channel = draw(_mostly(b'"news:a"', b'"user:alice"'))
    kind = draw(_mostly(b'"notification"', b'"custom_kind"'))
    data = draw(_mostly(b'{"message":"m","level":"info"}'))
    key = draw(_mostly(b'"k1"'))
    field = draw(st.sampled_from([b'"channel":' + channel, b'"channels":[' + channel + b"]"]))
    body = b"{" + field + b',"type":' + kind + b',"data":' + data + b',"idempotency_key":' + key
    document = draw(_mostly(body + b"}", body + b"}", data))
    return draw(_mutated(document))


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([10**400, -(10**400)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
#: Decoded values of any shape, as an embedding program might hand to ApiService.
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def _as_text(raw: bytes) -> str:
    """``raw`` as the str a text frame might carry, lone surrogates included."""
    return raw.decode("utf-8", "surrogateescape")


# -- the socket command parser -------------------------------------------------------------


def _session() -> Session:
    identity = Identity(user_id="alice", expires_at=2e9, claims={"sub": "alice"})
    return Session(
        identity,
        conn_id="c_prop",
        limits=LimitsSettings(),
        heartbeat_interval=25,
        heartbeat_timeout=10,
        leeway=30,
        now=0.0,
        wall=1.7e9,
    )


def _check_decoded(raw: bytes | str) -> Command | None:
    """``decode_command``'s outcome: a command, or None for a BadCommand; nothing else."""
    try:
        return decode_command(raw)
    except BadCommand as exc:
        assert exc.code == "invalid_request"
        assert isinstance(exc.message, str) and exc.message
        assert exc.command_id is None or isinstance(exc.command_id, str)
        return None


@PROPERTY
@given(raw=commands(), as_text=st.booleans())
def test_command_parser_raises_only_bad_command(raw: bytes, as_text: bool) -> None:
    """The wire decoder turns any bytes or text into a command or a BadCommand."""
    _check_decoded(_as_text(raw) if as_text else raw)


@PROPERTY
@given(raw=commands() | st.text(max_size=200).map(str.encode), as_text=st.booleans())
def test_session_answers_any_text_with_documented_effects(raw: bytes, as_text: bool) -> None:
    """A session answers any text frame with a command to start or an invalid_request
    error frame; it never raises and never closes for a single bad frame."""
    frame: bytes | str = _as_text(raw) if as_text else raw
    effects = _session().receive_text(frame, 1.0)
    command = _check_decoded(frame)
    [effect] = effects
    if isinstance(effect, Send):
        message = json.loads(encode(effect.message, 1_800_000_000.0))
        if message["type"] == "error":
            assert command is None
            assert message["data"]["code"] == ErrorCode.INVALID_REQUEST
            assert effect.error == ErrorCode.INVALID_REQUEST
        else:
            assert message["type"] == "pong"
    else:
        assert isinstance(effect, StartSubscribe | StartUnsubscribe | StartRefresh)
        assert command is not None


# -- the publish validator ------------------------------------------------------------------


def _service() -> tuple[ApiService, MemoryBroker]:
    broker = MemoryBroker()
    return ApiService(make_settings(), broker, Metrics()), broker


def _run_publish(body: Any, batch: bool) -> dict[str, Any] | None:
    """Publish ``body`` (or a batch of it): the answer, or None for InvalidRequest."""
    service, _ = _service()
    operation = service.batch({"events": [body]}) if batch else service.publish(body)
    try:
        return asyncio.run(operation)
    except InvalidRequest as exc:
        assert exc.code == "invalid_request" and exc.http_status == 400
        return None


@PROPERTY
@given(raw=publish_bodies(), batch=st.booleans())
def test_publish_bodies_raise_only_invalid_request(raw: bytes, batch: bool) -> None:
    """Any HTTP body, decoded and validated as the routes do, is published or refused
    with InvalidRequest (400); what is published encodes to JSON within the depth limit."""
    try:
        body = loads(raw)
    except InvalidRequest as exc:
        assert exc.code == "invalid_request"
        return
    answer = _run_publish(body, batch)
    if answer is not None:
        assert [result["channel"] for result in answer["results"]]


@PROPERTY
@given(value=_values, data=_values)
def test_publish_validator_takes_any_decoded_value(value: Any, data: Any) -> None:
    """Decoded values of any type (huge ints, inf, NaN included) are refused with
    InvalidRequest or published as JSON clients can read."""
    for body in (
        value,
        {"channel": "news:a", "type": "custom_kind", "data": data},
        {"channel": "news:a", "type": "notification", "data": value},
    ):
        _run_publish(body, batch=False)


def test_published_huge_and_non_finite_numbers_stay_json() -> None:
    """An event carrying 10**400, inf and NaN is stored as JSON that decodes again."""
    service, broker = _service()
    data = {"big": 10**400, "inf": float("inf"), "nan": float("nan")}
    asyncio.run(service.publish({"channel": "news:a", "type": "custom_kind", "data": data}))
    page = asyncio.run(broker.history("news:a", 0, 10))
    [event] = page.events
    assert loads(event.payload)["data"]["big"] == 10**400


# -- the SSE resume token (Last-Event-ID) --------------------------------------------------


@st.composite
def resume_tokens(draw: st.DrawFn) -> str:
    """A ``Last-Event-ID``: base64url of a token's JSON shape with hostile values, of
    anything at all, or not base64url."""
    entry = (
        b"["
        + draw(_mostly(b'"news:a"'))
        + b","
        + draw(_mostly(b"3"))
        + b","
        + draw(_mostly(b'"e1"'))
        + b"]"
    )
    shaped = b"[" + entry + b"]"
    deep = _nest(entry, draw(_levels), draw(st.sampled_from("[{")))
    document = draw(_mutated(draw(st.sampled_from([shaped, deep]) | _mostly(shaped))))
    encoded = base64.urlsafe_b64encode(document).rstrip(b"=").decode()
    return draw(st.sampled_from([encoded, encoded, encoded + "=", encoded[1:]]))


@PROPERTY
@given(resume=resume_tokens() | st.text(max_size=40))
def test_resume_token_decoder_raises_only_bad_resume_token(resume: str) -> None:
    """Whatever a client sends as ``Last-Event-ID`` (nesting to 2,000 levels included) is
    a channel-position map or a BadResumeToken (400); nothing else comes out."""
    try:
        positions = decode_token(resume, max_channels=129)
    except BadResumeToken as exc:
        assert str(exc)
        return
    for channel, (offset, epoch) in positions.items():
        assert isinstance(channel, str) and type(offset) is int and isinstance(epoch, str)


# -- over a real socket -------------------------------------------------------------------


@pytest.fixture
def no_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Capture every log record; after the test, none may be an error or a traceback."""
    caplog.set_level(logging.DEBUG)
    yield caplog
    # get_records: after the yield, caplog.records and caplog.text hold the teardown's
    # records only.
    logged = caplog.get_records("call")
    failures = [r for r in logged if r.exc_info or r.levelno >= logging.ERROR]
    assert not failures, [r.getMessage() for r in failures]
    text = "\n".join(r.getMessage() for r in logged)
    assert "Traceback" not in text and "RecursionError" not in text


def _deep(levels: int) -> str:
    return "[" * levels + "]" * levels


async def test_deep_commands_get_invalid_request_and_the_socket_stays_open(
    no_tracebacks: pytest.LogCaptureFixture,
) -> None:
    """Commands nesting 1,000 levels (in data, recover, id, or bare) get an
    invalid_request error frame naming the limit; the connection stays usable, and a
    command at the limit is answered."""
    deep = _deep(1000)
    frames = [
        '{"type":"ping","id":"p","data":{"x":' + deep + "}}",
        '{"type":"subscribe","id":"s","data":{"channel":"news:a","recover":' + deep + "}}",
        '{"type":"ping","id":' + deep + "}",
        deep,
        "{" * 1000,
    ]
    assert all(len(frame.encode()) <= 2100 for frame in frames)
    async with serve() as server, connect(server, token()) as client:
        for frame in frames:
            await client.ws.send_str(frame)
            reply = await client.recv()
            assert reply["type"] == "error", reply
            assert reply["data"]["code"] == "invalid_request", reply
        await ws_assert_open(client)
        # 64 levels in all: the command object, data, then 62 arrays.
        await client.ws.send_str(
            '{"type":"ping","id":"edge","data":{"x":' + _deep(MAX_JSON_DEPTH - 2) + "}}"
        )
        assert (await client.recv())["type"] == "pong"
        await client.ws.send_str(
            '{"type":"ping","id":"over","data":{"x":' + _deep(MAX_JSON_DEPTH - 1) + "}}"
        )
        over = await client.recv()
        assert over["data"]["code"] == "invalid_request"
        assert "deeper than 64 levels" in over["data"]["message"]
        assert over.get("id") is None  # the id could not be read


def _deep_claims_token(levels: int) -> str:
    """An HS256 token signed with the test secret whose claims nest ``levels`` deep."""
    good = mint_token(SECRET, "user-1").split(".")
    claims = json.loads(base64.urlsafe_b64decode(good[1] + "=" * (-len(good[1]) % 4)))
    payload = json.dumps(claims)[:-1] + ', "x": ' + _deep(levels - 1) + "}"
    signing_input = f"{good[0]}.{_b64(payload.encode())}"
    mac = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def test_deep_token_claims_are_unauthorized_at_connect_and_refresh(
    no_tracebacks: pytest.LogCaptureFixture,
) -> None:
    """A correctly signed token whose claims nest 900 levels is refused with 4401 at the
    handshake, and as a refresh (unauthorized error, then 4401)."""
    deep = _deep_claims_token(900)
    async with serve() as server:
        async with connect(server, deep, welcome=False) as client:
            messages, code = await ws_until_close(client.ws)
            assert code == 4401
            assert [m["data"]["code"] for m in messages] == ["unauthorized"]
        async with connect(server, token()) as client:
            await client.send("refresh", {"token": deep}, id="r")
            messages, code = await ws_until_close(client.ws)
            assert code == 4401
            assert [(m["type"], m["data"]["code"]) for m in messages] == [("error", "unauthorized")]


def _respelled(segment_index: int, padded: bool) -> str:
    """A test-secret HS256 token whose header, payload or signature is spelled with '='
    padding (or, when not ``padded``, canonically), signed over that spelling."""
    header = b'{"alg":"HS256","typ":"JWT"} '  # 28 bytes: padded in base64
    good = mint_token(SECRET, "user-1").split(".")
    payload = base64.urlsafe_b64decode(good[1] + "=" * (-len(good[1]) % 4))
    while len(payload) % 3 == 0:  # a length base64 must pad
        payload += b" "

    def spell(index: int, data: bytes) -> str:
        text = base64.urlsafe_b64encode(data).decode()
        return text if padded and index == segment_index else text.rstrip("=")

    signing_input = f"{spell(0, header)}.{spell(1, payload)}"
    mac = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{spell(2, mac)}"


@pytest.mark.parametrize("segment_index", [0, 1, 2], ids=["header", "payload", "signature"])
@pytest.mark.parametrize("query", [True, False], ids=["query", "bearer"])
async def test_padded_token_segments_close_4401_at_the_edge(
    no_tracebacks: pytest.LogCaptureFixture, segment_index: int, query: bool
) -> None:
    """A correctly signed token with '=' padding in any one segment is refused at the
    handshake (unauthorized, close 4401), by query parameter or bearer header alike."""
    async with serve() as server:
        async with connect(server, _respelled(segment_index, padded=False), query=query):
            pass  # the same token spelled canonically is accepted
        padded = _respelled(segment_index, padded=True)
        assert "=" in padded.split(".")[segment_index]
        async with connect(server, padded, welcome=False, query=query) as client:
            messages, code = await ws_until_close(client.ws)
    assert code == 4401
    assert [m["data"]["code"] for m in messages] == ["unauthorized"]
