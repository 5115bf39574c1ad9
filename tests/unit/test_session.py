"""Unit tests for tidings.session: the sans-I/O protocol state, driven with explicit clocks."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tidings.auth import Identity
from tidings.brokers.base import StoredEvent
from tidings.config import LimitsSettings
from tidings.errors import (
    AuthorizerUnavailable,
    BrokerUnavailable,
    InvalidRequest,
    ServerError,
    SubscriptionFailed,
    Unauthorized,
)
from tidings.protocol import CloseCode, ErrorCode, Recover, Refresh, Subscribe, Unsubscribe
from tidings.protocol.messages import Refreshed, Subscribed, Unsubscribed, encode
from tidings.recovery import Replay
from tidings.session import (
    CheckGrants,
    Close,
    Effect,
    Send,
    SendEvents,
    SendPing,
    Session,
    SessionState,
    StartRefresh,
    StartSubscribe,
    StartUnsubscribe,
)

#: Wall-clock time at which the sessions below are created.
WALL = 1_800_000_000.0
#: Monotonic time at which the sessions below are created.
T0 = 100.0


def identity(user_id: str = "alice", ttl: float = 3600) -> Identity:
    """An identity whose token expires ``ttl`` seconds after WALL."""
    return Identity(user_id=user_id, expires_at=WALL + ttl, channels=(), claims={"sub": user_id})


def make_session(
    *,
    interval: float = 1000,
    timeout: float = 500,
    leeway: float = 30,
    ttl: float = 3600,
    **limits: Any,
) -> Session:
    """A session created at (T0, WALL) with the given heartbeat, leeway and limits."""
    return Session(
        identity(ttl=ttl),
        conn_id="c_test",
        limits=LimitsSettings(**limits),
        heartbeat_interval=interval,
        heartbeat_timeout=timeout,
        leeway=leeway,
        now=T0,
        wall=WALL,
    )


def wire(effect: Effect) -> bytes:
    """The JSON a Send effect puts on the wire, stamped WALL."""
    assert isinstance(effect, Send), effect
    return encode(effect.message, WALL)


def text(message: dict[str, Any]) -> str:
    """A client command as text."""
    return json.dumps(message)


def sent(effects: list[Effect]) -> list[dict[str, Any]]:
    """The JSON messages among ``effects``, decoded."""
    return [json.loads(wire(effect)) for effect in effects if isinstance(effect, Send)]


def only_message(effects: list[Effect]) -> dict[str, Any]:
    """The single Send among ``effects`` (and nothing else), decoded."""
    assert len(effects) == 1 and isinstance(effects[0], Send), effects
    message: dict[str, Any] = json.loads(wire(effects[0]))
    return message


def ping(session: Session, now: float, command_id: str | None = "p") -> list[Effect]:
    """Send a ping command at ``now``."""
    message: dict[str, Any] = {"type": "ping"}
    if command_id is not None:
        message["id"] = command_id
    return session.receive_text(text(message), now)


def subscribe(
    session: Session, channel: str, now: float = T0, command_id: str = "s"
) -> list[Effect]:
    """Send a subscribe command at ``now``."""
    return session.receive_text(
        text({"type": "subscribe", "id": command_id, "data": {"channel": channel}}), now
    )


# -- welcome ------------------------------------------------------------------------------


def test_welcome_fields() -> None:
    """The connected message carries connection id, user, expiry, heartbeat and channels."""
    session = make_session(interval=25, ttl=3600)
    raw = wire(session.welcome(["user:alice"]))
    message = json.loads(raw)
    assert message["type"] == "connected"
    assert message["data"] == {
        "connection_id": "c_test",
        "user_id": "alice",
        "expires_at": "2027-01-15T09:00:00Z",
        "heartbeat_interval": 25,
        "channels": ["user:alice"],
    }
    assert b'"heartbeat_interval":25,' in raw
    assert isinstance(message["data"]["heartbeat_interval"], int)
    assert "id" not in message
    assert message["timestamp"].endswith("Z")


def test_welcome_announces_the_positions_of_automatic_channels() -> None:
    """``positions`` gives each automatic channel's live point as offset and epoch."""
    message = json.loads(wire(make_session().welcome(["user:alice"], {"user:alice": (7, "e1")})))
    assert message["data"]["positions"] == {"user:alice": {"offset": 7, "epoch": "e1"}}


def test_welcome_fractional_heartbeat() -> None:
    """A fractional heartbeat interval is sent as a number with its fraction."""
    message = json.loads(wire(make_session(interval=2.5).welcome([])))
    assert message["data"]["heartbeat_interval"] == 2.5
    assert message["data"]["channels"] == []


def test_welcome_expiry_drops_fraction() -> None:
    """expires_at is whole seconds in RFC 3339 UTC."""
    message = json.loads(wire(make_session(ttl=59.9).welcome([])))
    assert message["data"]["expires_at"] == "2027-01-15T08:00:59Z"


# -- commands -----------------------------------------------------------------------------


def test_ping_with_id() -> None:
    """A ping command is answered by a pong echoing its id."""
    session = make_session()
    message = only_message(ping(session, T0, "p1"))
    assert message["type"] == "pong"
    assert message["id"] == "p1"
    assert message["data"] == {}


def test_ping_without_id() -> None:
    """A pong answering a ping without id has no id key at all."""
    effects = ping(make_session(), T0, None)
    assert len(effects) == 1 and isinstance(effects[0], Send)
    assert b'"id"' not in wire(effects[0])
    assert effects[0].error is None
    assert json.loads(wire(effects[0]))["type"] == "pong"


def test_subscribe_starts_gateway_work() -> None:
    """A valid subscribe is handed to the gateway as StartSubscribe."""
    assert subscribe(make_session(), "news:x", command_id="s1") == [
        StartSubscribe(Subscribe("s1", "news:x", None))
    ]


def test_unsubscribe_starts_gateway_work() -> None:
    """A valid unsubscribe is handed to the gateway, subscribed or not."""
    effects = make_session().receive_text(
        text({"type": "unsubscribe", "id": "u", "data": {"channel": "news:x"}}), T0
    )
    assert effects == [StartUnsubscribe(Unsubscribe("u", "news:x"))]


def test_refresh_starts_gateway_work() -> None:
    """A refresh command is handed to the gateway with its token."""
    effects = make_session().receive_text(
        text({"type": "refresh", "id": "r", "data": {"token": "tok"}}), T0
    )
    assert effects == [StartRefresh(Refresh("r", "tok"))]


@pytest.mark.parametrize(
    ("raw", "command_id", "channel"),
    [
        ("not json", None, None),
        ("[1]", None, None),
        ('{"type": "bogus", "id": "b1"}', "b1", None),
        ('{"id": "b2"}', "b2", None),
        ('{"type": "subscribe", "id": "b3", "data": {"channel": "Bad:x"}}', "b3", "Bad:x"),
        ('{"type": "ping", "id": 7}', None, None),
    ],
)
def test_invalid_commands(raw: str, command_id: str | None, channel: str | None) -> None:
    """Invalid commands get an invalid_request error with id and channel when known."""
    session = make_session()
    effects = session.receive_text(raw, T0)
    message = only_message(effects)
    assert isinstance(effects[0], Send) and effects[0].error == ErrorCode.INVALID_REQUEST
    assert message["type"] == "error"
    assert message["data"]["code"] == "invalid_request"
    assert message["data"]["message"]
    assert message.get("id") == command_id
    assert message["data"].get("channel") == channel
    assert "null" not in wire(effects[0]).decode()
    assert not session.closed


def test_binary_frame_is_invalid_request() -> None:
    """A binary frame gets invalid_request and the connection stays open."""
    session = make_session()
    message = only_message(session.receive_binary(T0))
    assert message["data"]["code"] == "invalid_request"
    assert "id" not in message
    assert not session.closed


# -- rate limit ---------------------------------------------------------------------------


def _rate_limited(effects: list[Effect], command_id: str) -> None:
    """``effects`` start with the ``rate_limited`` error answering ``command_id``."""
    assert effects and isinstance(effects[0], Send), effects
    assert effects[0].error == ErrorCode.RATE_LIMITED
    message = json.loads(wire(effects[0]))
    assert message["type"] == "error" and message["id"] == command_id
    assert message["data"]["code"] == "rate_limited"


def test_rate_limit_burst_then_errors_then_close() -> None:
    """After the burst every over-limit command gets rate_limited; the Nth in a row gets
    its error too, followed by the close 4429."""
    session = make_session(command_burst=3, commands_per_second=1, rate_limit_strikes=3)
    for _ in range(3):
        assert only_message(ping(session, T0))["type"] == "pong"
    for index in range(2):
        effects = ping(session, T0, f"p{index}")
        assert len(effects) == 1
        _rate_limited(effects, f"p{index}")
        assert not session.closed
    effects = ping(session, T0, "last")
    assert len(effects) == 2
    _rate_limited(effects, "last")
    assert effects[1] == Close(CloseCode.TOO_MANY, "command rate limit exceeded")
    assert session.closed
    assert ping(session, T0 + 1000) == []


def test_rate_limit_single_strike_answers_then_closes() -> None:
    """With rate_limit_strikes=1 the first violation gets its error and closes 4429."""
    session = make_session(command_burst=1, commands_per_second=1, rate_limit_strikes=1)
    assert only_message(ping(session, T0))["type"] == "pong"
    effects = ping(session, T0)
    assert len(effects) == 2
    _rate_limited(effects, "p")
    assert isinstance(effects[1], Close) and effects[1].code is CloseCode.TOO_MANY
    assert int(effects[1].code) == 4429


def test_rate_limit_closing_binary_frame_is_answered() -> None:
    """A binary frame that uses up the last strike gets its (id-less) error before 4429."""
    session = make_session(command_burst=1, commands_per_second=1, rate_limit_strikes=2)
    session.receive_binary(T0)
    assert only_message(session.receive_binary(T0))["data"]["code"] == "rate_limited"
    effects = session.receive_binary(T0)
    message = json.loads(wire(effects[0])) if isinstance(effects[0], Send) else {}
    assert message["data"]["code"] == "rate_limited" and "id" not in message
    assert effects[1:] == [Close(CloseCode.TOO_MANY, "command rate limit exceeded")]


def test_rate_limit_counts_invalid_and_binary_frames() -> None:
    """Invalid commands and binary frames use up the budget like any command."""
    session = make_session(command_burst=2, commands_per_second=1, rate_limit_strikes=5)
    session.receive_text("garbage", T0)
    session.receive_binary(T0)
    assert only_message(ping(session, T0))["data"]["code"] == "rate_limited"
    assert only_message(session.receive_binary(T0))["data"]["code"] == "rate_limited"


def test_rate_limit_refill_resets_strikes() -> None:
    """Tokens refill over time; an accepted command resets the consecutive-strike count."""
    session = make_session(command_burst=2, commands_per_second=2, rate_limit_strikes=3)
    now = T0
    for _ in range(2):
        assert only_message(ping(session, now))["type"] == "pong"
    for _ in range(2):
        assert only_message(ping(session, now))["data"]["code"] == "rate_limited"
    now += 0.5  # one token at 2 per second
    assert only_message(ping(session, now))["type"] == "pong"
    # The strike count started over: two more violations are errors, the third closes.
    for _ in range(2):
        assert only_message(ping(session, now))["data"]["code"] == "rate_limited"
    assert not session.closed
    assert isinstance(ping(session, now)[-1], Close)


def test_rate_limit_partial_refill() -> None:
    """Less than one token of refill is still a violation."""
    session = make_session(command_burst=1, commands_per_second=1, rate_limit_strikes=10)
    assert only_message(ping(session, T0))["type"] == "pong"
    assert only_message(ping(session, T0 + 0.4))["data"]["code"] == "rate_limited"
    assert only_message(ping(session, T0 + 0.8))["data"]["code"] == "rate_limited"
    assert only_message(ping(session, T0 + 1.0))["type"] == "pong"


def test_rate_limit_refill_capped_at_burst() -> None:
    """A long quiet period refills no more than the burst."""
    session = make_session(command_burst=3, commands_per_second=10, rate_limit_strikes=10)
    now = T0 + 10_000
    assert [only_message(ping(session, now))["type"] for _ in range(4)] == [
        "pong",
        "pong",
        "pong",
        "error",
    ]


def test_rate_limit_steady_rate_never_limited() -> None:
    """A client that stays at the configured rate is never limited."""
    session = make_session(command_burst=1, commands_per_second=5, rate_limit_strikes=1)
    for step in range(200):
        assert only_message(ping(session, T0 + step * 0.201))["type"] == "pong"


def test_rate_limit_ignores_clock_going_backwards() -> None:
    """A clock reading earlier than the last one refills nothing (and does not crash)."""
    session = make_session(command_burst=1, commands_per_second=1, rate_limit_strikes=10)
    assert only_message(ping(session, T0 + 5))["type"] == "pong"
    assert only_message(ping(session, T0))["data"]["code"] == "rate_limited"


# -- subscription limit -------------------------------------------------------------------


def test_max_subscriptions_excludes_personal_channel() -> None:
    """The personal channel does not count towards max_subscriptions; at the limit the
    subscribe goes to the gateway marked ``at_limit`` and is refused with ``too_many``."""
    session = make_session(max_subscriptions=2)
    session.subscribed("user:alice", personal=True)
    for channel in ("news:1", "news:2"):
        assert subscribe(session, channel) == [StartSubscribe(Subscribe("s", channel, None))]
        session.subscribed(channel)
    command = Subscribe("s3", "news:3", None)
    assert subscribe(session, "news:3", command_id="s3") == [StartSubscribe(command, True)]
    effects = session.too_many(command)
    message = only_message(effects)
    assert isinstance(effects[0], Send) and effects[0].error == ErrorCode.SUBSCRIPTION_FAILED
    assert message["id"] == "s3"
    assert message["data"]["code"] == "subscription_failed"
    assert message["data"]["channel"] == "news:3"
    assert "2" in message["data"]["message"]
    assert not session.closed
    assert session.subscription_count == 2


def test_max_subscriptions_without_personal_channel() -> None:
    """Without a personal channel every subscription counts."""
    session = make_session(max_subscriptions=1)
    assert subscribe(session, "news:1") == [StartSubscribe(Subscribe("s", "news:1", None))]
    session.subscribed("news:1")
    assert subscribe(session, "news:2") == [StartSubscribe(Subscribe("s", "news:2", None), True)]


def test_personal_channel_never_counts_even_when_subscribed_by_command() -> None:
    """The user's own personal channel stays outside the limit however it was subscribed."""
    session = make_session(max_subscriptions=1)
    session.subscribed("user:alice")
    assert session.subscription_count == 0
    assert subscribe(session, "news:1") == [StartSubscribe(Subscribe("s", "news:1", None))]
    session.subscribed("news:1")
    assert subscribe(session, "user:alice") == [StartSubscribe(Subscribe("s", "user:alice", None))]


def test_unsubscribe_frees_a_slot() -> None:
    """After an unsubscribe the freed slot can be used again."""
    session = make_session(max_subscriptions=1)
    session.subscribed("news:1")
    [at_limit] = subscribe(session, "news:2")
    assert isinstance(at_limit, StartSubscribe) and at_limit.at_limit
    session.unsubscribed("news:1")
    assert subscribe(session, "news:2") == [StartSubscribe(Subscribe("s", "news:2", None))]


def test_max_subscriptions_zero_keeps_personal_channel() -> None:
    """With max_subscriptions=0 no channel can be added, but the personal one is kept."""
    session = make_session(max_subscriptions=0)
    session.subscribed("user:alice", personal=True)
    assert session.personal == "user:alice" and session.subscription_count == 0
    [at_limit] = subscribe(session, "news:1")
    assert isinstance(at_limit, StartSubscribe) and at_limit.at_limit


def test_unsubscribing_personal_channel_clears_it() -> None:
    """Unsubscribing from the personal channel forgets it as personal."""
    session = make_session(max_subscriptions=1)
    session.subscribed("user:alice", personal=True)
    session.unsubscribed("user:alice")
    assert session.personal is None
    assert session.subscription_count == 0
    session.subscribed("user:alice")
    assert subscribe(session, "news:1") == [StartSubscribe(Subscribe("s", "news:1", None))]


# -- heartbeats ---------------------------------------------------------------------------


def test_heartbeat_ping_then_timeout() -> None:
    """Silence for the interval sends a ping; no frame within the timeout then closes 4408."""
    session = make_session(interval=10, timeout=5)
    assert session.tick(T0 + 9.99) == []
    assert session.tick(T0 + 10) == [SendPing()]
    assert session.tick(T0 + 12) == []
    assert session.tick(T0 + 14.99) == []
    assert session.tick(T0 + 15) == [Close(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout")]
    assert session.closed
    assert session.tick(T0 + 100) == []


@pytest.mark.parametrize("frame", ["saw_frame", "text", "binary"])
def test_any_frame_cancels_pending_timeout(frame: str) -> None:
    """A pong or any other frame after a ping cancels the timeout and restarts the interval."""
    session = make_session(interval=10, timeout=5)
    assert session.tick(T0 + 10) == [SendPing()]
    if frame == "saw_frame":
        session.saw_frame(T0 + 12)
    elif frame == "text":
        ping(session, T0 + 12)
    else:
        session.receive_binary(T0 + 12)
    assert session.tick(T0 + 15) == []
    assert session.tick(T0 + 21.99) == []
    assert session.tick(T0 + 22) == [SendPing()]
    assert session.tick(T0 + 27) == [Close(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout")]


def test_client_traffic_postpones_ping() -> None:
    """A client that keeps talking is not pinged."""
    session = make_session(interval=10, timeout=5)
    for step in range(1, 10):
        session.saw_frame(T0 + step * 5)
        assert session.tick(T0 + step * 5 + 4) == []


def test_heartbeat_pings_repeat_while_answered() -> None:
    """A peer that answers every ping is pinged once per interval and never closed."""
    session = make_session(interval=10, timeout=5)
    now = T0
    for _ in range(20):
        now += 10
        assert session.tick(now) == [SendPing()]
        session.saw_frame(now + 1)
        now += 1
        assert session.tick(now + 4) == []
    assert not session.closed


def test_heartbeat_timeout_longer_than_interval() -> None:
    """With a timeout longer than the interval, a silent peer is still closed 4408 in time."""
    session = make_session(interval=1, timeout=3)
    effects: list[Effect] = []
    now = T0
    while now < T0 + 10 and not session.closed:
        now += 0.5
        effects += session.tick(now)
    assert effects[0] == SendPing()
    assert effects[-1] == Close(CloseCode.HEARTBEAT_TIMEOUT, "heartbeat timeout")
    # The first ping went out at T0 + 1; no frame came back within 3 s of it.
    assert now == T0 + 4


# -- token expiry and refresh -------------------------------------------------------------


def test_expiry_with_leeway() -> None:
    """The token expires at expires_at + leeway: unauthorized error then close 4401."""
    session = make_session(ttl=60, leeway=30)
    assert session.tick(T0 + 89.99) == []
    effects = session.tick(T0 + 90)
    assert len(effects) == 2
    message = json.loads(wire(effects[0])) if isinstance(effects[0], Send) else {}
    assert message["type"] == "error"
    assert message["data"]["code"] == "unauthorized"
    assert "expired" in message["data"]["message"]
    assert "id" not in message
    assert effects[1] == Close(CloseCode.UNAUTHORIZED, "unauthorized")
    assert session.closed
    assert session.tick(T0 + 91) == []


def test_expiry_without_leeway() -> None:
    """With zero leeway the session closes at the token's own expiry."""
    session = make_session(ttl=5, leeway=0)
    assert session.tick(T0 + 4.9) == []
    assert isinstance(session.tick(T0 + 5)[-1], Close)


def test_expiry_uses_wall_clock_offset_at_creation() -> None:
    """The expiry deadline is fixed from wall time at creation, then follows the monotonic clock."""
    session = Session(
        identity(ttl=100),
        conn_id="c",
        limits=LimitsSettings(),
        heartbeat_interval=1000,
        heartbeat_timeout=500,
        leeway=0,
        now=5.0,
        wall=WALL + 40,
    )
    assert session.tick(64.99) == []
    assert isinstance(session.tick(65.0)[-1], Close)


def test_refresh_same_user_extends_expiry() -> None:
    """A refreshed token for the same user moves the deadline; the old one no longer closes."""
    session = make_session(ttl=60, leeway=30)
    new = identity(ttl=600)
    effects = session.refreshed(new, "r1", T0 + 50, WALL + 50)
    message = only_message(effects)
    assert message["type"] == "refreshed"
    assert message["id"] == "r1"
    assert message["data"] == {"expires_at": "2027-01-15T08:10:00Z"}
    assert session.identity is new
    assert session.tick(T0 + 90) == []
    assert session.tick(T0 + 629.99) == []
    effects = session.tick(T0 + 630)
    assert effects[-1] == Close(CloseCode.UNAUTHORIZED, "unauthorized")


def test_refresh_without_id() -> None:
    """A refreshed reply to a refresh without id has no id key."""
    effects = make_session().refreshed(identity(ttl=7200), None, T0, WALL)
    assert len(effects) == 1 and isinstance(effects[0], Send)
    assert b'"id"' not in wire(effects[0])


def test_refresh_other_user_is_unauthorized() -> None:
    """A refresh token for another sub gets unauthorized and close 4401."""
    session = make_session(ttl=60)
    old = session.identity
    effects = session.refreshed(identity("mallory", ttl=600), "r2", T0 + 1, WALL + 1)
    assert len(effects) == 2
    message = json.loads(wire(effects[0])) if isinstance(effects[0], Send) else {}
    assert message["data"]["code"] == "unauthorized"
    assert message["id"] == "r2"
    assert effects[1] == Close(CloseCode.UNAUTHORIZED, "unauthorized")
    assert session.identity is old
    assert session.closed


def test_unauthorized_helper() -> None:
    """unauthorized() sends the error with the command id and closes 4401."""
    session = make_session()
    effects = session.unauthorized("invalid token signature", "r3")
    message = json.loads(wire(effects[0])) if isinstance(effects[0], Send) else {}
    assert message["id"] == "r3"
    assert message["data"] == {"code": "unauthorized", "message": "invalid token signature"}
    assert effects[1] == Close(CloseCode.UNAUTHORIZED, "unauthorized")


# -- failures -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (SubscriptionFailed("unknown namespace 'foo'"), "subscription_failed"),
        (Unauthorized("not allowed to read this channel"), "unauthorized"),
        (InvalidRequest("bad"), "invalid_request"),
        (BrokerUnavailable("broker down"), "subscription_failed"),
        (AuthorizerUnavailable("webhook timed out"), "subscription_failed"),
        (ServerError("boom"), "internal_error"),
    ],
)
def test_fail_maps_to_wire_codes(exc: Exception, code: str) -> None:
    """Gateway failures become error messages with a wire code; the connection stays open."""
    session = make_session()
    assert isinstance(exc, (SubscriptionFailed, Unauthorized, InvalidRequest, ServerError))
    effects = session.fail(exc, "s9", "foo:bar")
    message = only_message(effects)
    assert isinstance(effects[0], Send) and effects[0].error == code
    assert message["id"] == "s9"
    assert message["data"] == {"code": code, "message": exc.message, "channel": "foo:bar"}
    assert not session.closed


def test_fail_uses_exception_channel() -> None:
    """Without an explicit channel the exception's channel is used; none means no key."""
    session = make_session()
    message = only_message(session.fail(SubscriptionFailed("x", channel="a:b"), None))
    assert message["data"]["channel"] == "a:b"
    assert "id" not in message
    message = only_message(session.fail(SubscriptionFailed("x"), None))
    assert "channel" not in message["data"]


# -- closed sessions ----------------------------------------------------------------------


def test_closed_session_ignores_input() -> None:
    """Once closed, the session ignores frames and ticks."""
    session = make_session(ttl=1, leeway=0)
    assert isinstance(session.tick(T0 + 2)[-1], Close)
    assert ping(session, T0 + 3) == []
    assert subscribe(session, "news:1", T0 + 3) == []
    assert session.receive_binary(T0 + 3) == []
    assert session.tick(T0 + 5000) == []


def test_ping_command_is_not_a_ping_effect() -> None:
    """An application-level ping is answered with a pong message, not a protocol ping."""
    effects = ping(make_session(), T0)
    assert not any(isinstance(effect, SendPing) for effect in effects)
    assert only_message(effects)["type"] == "pong"


def test_rate_limited_error_names_the_dropped_command() -> None:
    """A ``rate_limited`` error carries the id of the command it dropped."""
    session = make_session(command_burst=1, commands_per_second=1)
    session.receive_text('{"type":"ping","id":"a"}', 0.0)
    effects = session.receive_text('{"type":"subscribe","id":"b","data":{"channel":"x:y"}}', 0.0)
    assert len(effects) == 1 and isinstance(effects[0], Send)
    error = json.loads(wire(effects[0]))
    assert error["data"]["code"] == "rate_limited" and error["id"] == "b"


# -- replies the session owns: plain calls, no event loop ------------------------------


def _subscribe(channel: str, command_id: str = "s1", recover: Recover | None = None) -> Subscribe:
    return Subscribe(command_id, channel, recover)


def test_subscribe_done_answers_subscribed_and_takes_the_channel() -> None:
    """A new subscription's outcome is one ``subscribed`` reply with the live point, no
    recovery fields, and the channel counted by the session."""
    session = make_session()
    effects = session.subscribe_done(_subscribe("news:a"), 4, "e1", None, new=True)
    assert effects == [Send(Subscribed("news:a", 4, "e1", "s1"))]
    assert session.subscription_count == 1
    assert only_message(effects)["data"] == {"channel": "news:a", "offset": 4, "epoch": "e1"}


def test_recovery_reply_comes_before_the_replayed_events() -> None:
    """A recovered subscription answers ``subscribed`` (recovered: true) first, then the
    replayed events in order: live events can only follow."""
    session = make_session()
    replay = Replay(
        True, (StoredEvent(3, b'{"type":"a"}'), StoredEvent(4, b'{"type":"b"}')), since=2
    )
    effects = session.subscribe_done(
        _subscribe("news:a", recover=Recover(2, "e1")), 4, "e1", replay, new=True
    )
    assert effects == [
        Send(Subscribed("news:a", 4, "e1", "s1", recovered=True)),
        SendEvents((b'{"type":"a"}', b'{"type":"b"}')),
    ]


def test_unrecovered_replay_of_a_new_epoch_announces_since() -> None:
    """``recovered: false`` followed by a new epoch's events carries ``since``; without
    events it does not."""
    session = make_session()
    replay = Replay(False, (StoredEvent(1, b'{"type":"a"}'),), since=0)
    effects = session.subscribe_done(
        _subscribe("news:a", recover=Recover(9, "old")), 1, "e2", replay, new=True
    )
    assert effects[0] == Send(Subscribed("news:a", 1, "e2", "s1", recovered=False, since=0))
    assert isinstance(effects[1], SendEvents)
    bare = session.subscribe_done(
        _subscribe("news:b", recover=Recover(9, "old")), 5, "e2", Replay(False), new=True
    )
    assert bare == [Send(Subscribed("news:b", 5, "e2", "s1", recovered=False))]


def test_a_resubscribe_does_not_take_the_channel_again() -> None:
    """An idempotent subscribe (``new=False``) answers without counting it again."""
    session = make_session()
    session.subscribe_done(_subscribe("news:a"), 1, "e", None, new=True)
    session.subscribe_done(_subscribe("news:a", "s2"), 1, "e", None, new=False)
    assert session.subscription_count == 1


def test_refresh_reply_precedes_the_check_of_the_other_channels() -> None:
    """A refresh answers ``refreshed`` first, then asks for the policy check of the
    channels held (the gateway reads which from the hub)."""
    session = make_session()
    session.subscribed("user:alice", personal=True)
    for channel in ("news:b", "news:a"):
        session.subscribe_done(_subscribe(channel), 1, "e", None, new=True)
    effects = session.refreshed(identity(ttl=7200), "r1", T0, WALL)
    assert isinstance(effects[0], Send) and isinstance(effects[0].message, Refreshed)
    assert effects[1:] == [CheckGrants()]


def test_refresh_without_other_channels_checks_nothing() -> None:
    """Only the personal channel: the refresh is the whole answer."""
    session = make_session()
    session.subscribed("user:alice", personal=True)
    assert len(session.refreshed(identity(), "r1", T0, WALL)) == 1


def test_revoke_answers_once_and_only_while_subscribed() -> None:
    """A revoked channel gets ``unsubscribed`` (revoked, no resubscribe) once; a channel
    that ended meanwhile gets nothing."""
    session = make_session()
    session.subscribe_done(_subscribe("news:a"), 1, "e", None, new=True)
    assert session.revoke("news:a", subscribed=True) == [
        Send(Unsubscribed("news:a", reason="revoked", resubscribe=False))
    ]
    assert session.revoke("news:a", subscribed=False) == []
    assert session.subscription_count == 0


def test_continuity_lost_asks_for_a_resubscribe() -> None:
    """Lost continuity ends the channel with ``insufficient_state`` and resubscribe."""
    session = make_session()
    session.subscribe_done(_subscribe("news:a"), 1, "e", None, new=True)
    assert session.continuity_lost("news:a", subscribed=True) == [
        Send(Unsubscribed("news:a", reason="insufficient_state", resubscribe=True))
    ]
    assert session.subscription_count == 0
    # Still being set up: the subscription is gone all the same, nothing was counted.
    assert session.continuity_lost("news:b", subscribed=False) == [
        Send(Unsubscribed("news:b", reason="insufficient_state", resubscribe=True))
    ]
    assert session.subscription_count == 0


def test_unsubscribe_done_answers_with_the_command_id() -> None:
    """The client's unsubscribe is answered with its id and no reason."""
    session = make_session()
    session.subscribe_done(_subscribe("news:a"), 1, "e", None, new=True)
    assert only_message(session.unsubscribe_done("news:a", "u1", subscribed=True)) == {
        "type": "unsubscribed",
        "id": "u1",
        "timestamp": "2027-01-15T08:00:00.000Z",
        "data": {"channel": "news:a"},
    }


def test_state_moves_through_ping_pong_and_close() -> None:
    """OPEN, AWAITING_PONG after a ping, OPEN again on any frame, CLOSED at the end."""
    session = make_session(interval=10, timeout=5)
    states = [session.state]
    assert session.tick(T0 + 10) == [SendPing()]
    states.append(session.state)
    session.saw_frame(T0 + 11)
    states.append(session.state)
    session.tick(T0 + 21)
    assert isinstance(session.tick(T0 + 26)[0], Close)
    states.append(session.state)
    assert states == [
        SessionState.OPEN,
        SessionState.AWAITING_PONG,
        SessionState.OPEN,
        SessionState.CLOSED,
    ]
    assert session.closed
