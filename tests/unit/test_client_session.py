"""Unit tests of the client's sans-I/O core (``tidings.client.session.Session``): server
messages and clock readings in, effects and decisions out. No sockets, no event loop."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tidings.client import (
    AuthenticationFailed,
    Backoff,
    ConnectionClosed,
    Event,
    Gap,
    ProtocolViolation,
    Recovery,
    SubscriptionError,
)
from tidings.client.effects import (
    Added,
    ChannelState,
    Confirm,
    Connected,
    Deliver,
    Effect,
    End,
    Failed,
    Outcome,
    Reconnect,
    Recovered,
    RecoverFresh,
    Reply,
    Resubscribe,
    RetrySubscribe,
    StartRefresh,
    Stop,
    SubscribeNow,
)
from tidings.client.session import FIRST_RECOVER, Session

USER = "user:u1"
STAMP = "2026-01-01T00:00:00.000Z"


class Clock:
    """A settable clock for the session's ``clock`` and ``wall_clock``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(
    *,
    provider: bool = False,
    clock: Clock | None = None,
    token: str | None = "t",
    max_auth_failures: int = 3,
    burst: int = 2,
    rate: float = 4.0,
) -> Session:
    clock = clock or Clock()
    return Session(
        token=token,
        token_provider=(lambda: "fresh") if provider else None,
        backoff=Backoff(initial=0.5, cap=20.0, slow_floor=5.0, random=lambda: 1.0),
        refresh_margin=30.0,
        liveness_timeout=3.0,
        connect_timeout=7.0,
        resubscribe_burst=burst,
        resubscribe_rate=rate,
        max_auth_failures=max_auth_failures,
        clock=clock,
        wall_clock=clock,
    )


def frame(kind: str, data: dict[str, Any] | None = None, reply_to: str | None = None) -> str:
    message: dict[str, Any] = {"type": kind}
    if reply_to is not None:
        message["id"] = reply_to
    if data is not None:
        message["data"] = data
    return json.dumps(message)


def event(channel: str, offset: int) -> str:
    return json.dumps(
        {
            "type": "notification",
            "channel": channel,
            "offset": offset,
            "id": f"evt_{offset}",
            "timestamp": STAMP,
            "data": {"n": offset},
        }
    )


def welcome(session: Session, channels: tuple[str, ...] = (USER,), **extra: Any) -> list[Effect]:
    session.connection_opened()
    data = {
        "connection_id": "conn_1",
        "user_id": "u1",
        "heartbeat_interval": 25,
        "channels": list(channels),
        **extra,
    }
    return session.receive(frame("connected", data))


def add(session: Session, channel: str) -> ChannelState:
    state = ChannelState(channel)
    session.want(channel)
    session.add(state)
    return state


def subscribe(session: Session, state: ChannelState) -> tuple[str, dict[str, Any]]:
    """Build the subscribe for ``state`` on the live connection: ``(id, data)``."""
    message = session.subscribe_message(state, session.gen)
    assert message is not None and message["type"] == "subscribe"
    return message["id"], message["data"]


def reply(
    session: Session,
    state: ChannelState,
    offset: int,
    epoch: str = "e1",
    recovered: bool | None = None,
    since: int | None = None,
) -> list[Effect]:
    """Subscribe ``state`` and apply the server's ``subscribed`` reply."""
    command_id, _ = subscribe(session, state)
    data: dict[str, Any] = {"channel": state.channel, "offset": offset, "epoch": epoch}
    if recovered is not None:
        data["recovered"] = recovered
    if since is not None:
        data["since"] = since
    return session.receive(frame("subscribed", data, command_id))


def delivered(effects: list[Effect]) -> list[int | str]:
    out: list[int | str] = []
    for effect in effects:
        if isinstance(effect, Deliver):
            out += [
                i.offset if isinstance(i, Event) else f"gap:{i.last_offset}->{i.offset}"
                for i in effect.items
            ]
    return out


def reconnect(session: Session, channels: tuple[str, ...] = (USER,)) -> list[Effect]:
    session.connection_lost()
    return welcome(session, channels)


# -- connected -------------------------------------------------------------------------


def test_connected_records_the_connection_and_plans_the_resubscription() -> None:
    """``connected`` stores its fields, creates the personal channel and ends with a
    resubscription plan followed by ``Connected``."""
    session = make()
    news = add(session, "news:a")
    effects = welcome(session, expires_at="1970-01-01T01:00:00Z")
    assert session.connected and session.welcomed and session.gen == 1
    assert (session.connection_id, session.user_id, session.heartbeat_interval) == (
        "conn_1",
        "u1",
        25.0,
    )
    assert session.tokens.expires_at == 3600
    assert session.automatic == {USER}
    personal = session.channels[USER]
    assert personal.automatic and not news.automatic
    assert effects == [Added(personal), Resubscribe(1, (), (news, personal)), Connected()]
    assert news.tracker.awaiting and personal.tracker.awaiting


def test_connected_starts_the_refresh_with_a_provider() -> None:
    """With a token provider, ``StartRefresh`` comes before ``Connected``."""
    effects = welcome(make(provider=True), channels=())
    assert [type(e) for e in effects] == [Resubscribe, StartRefresh, Connected]


def test_connected_tolerates_missing_or_malformed_fields() -> None:
    """A ``connected`` without channels or heartbeat leaves them empty, not broken."""
    session = make()
    session.connection_opened()
    effects = session.receive(
        frame("connected", {"channels": "user:u1", "heartbeat_interval": "25"})
    )
    assert session.automatic == frozenset() and session.heartbeat_interval is None
    assert effects == [Resubscribe(1, (), ()), Connected()]


def test_receive_timeout_follows_the_welcome() -> None:
    """Before ``connected`` the connect timeout applies, after it heartbeat + liveness."""
    session = make()
    session.connection_opened()
    assert session.receive_timeout() == 7.0
    welcome(session, channels=())
    assert session.receive_timeout() == 25.0 + 3.0
    session.connection_opened()
    assert session.receive_timeout() == 7.0


def test_frames_that_are_not_messages_are_ignored() -> None:
    """Non-JSON, non-object and unknown frames produce no effect."""
    session = make()
    for raw in ("not json", "[1, 2]", frame("mystery", {}), frame("pong", {})):
        assert session.receive(raw) == []


# -- subscribing -----------------------------------------------------------------------


def test_subscribe_message_carries_the_recovery_point() -> None:
    """No ``recover`` before a baseline, the first one for the personal channel, then the
    tracker's point; the message is recorded as the one in flight."""
    session = make()
    news = add(session, "news:a")
    welcome(session)
    command_id, data = subscribe(session, news)
    assert data == {"channel": "news:a"}
    assert news.pending_id == command_id and news.sent_on == 1
    _, data = subscribe(session, session.channels[USER])
    assert data == {"channel": USER, "recover": FIRST_RECOVER}
    session.receive(
        frame("subscribed", {"channel": "news:a", "offset": 4, "epoch": "e1"}, command_id)
    )
    assert subscribe(session, news)[1] == {
        "channel": "news:a",
        "recover": {"offset": 4, "epoch": "e1"},
    }


def test_subscribe_message_for_a_gone_connection_is_none() -> None:
    """A subscribe planned for an older connection, or with none up, is not sent."""
    session = make()
    news = add(session, "news:a")
    assert session.subscribe_message(news, 0) is None
    welcome(session)
    assert session.subscribe_message(news, 0) is None
    session.connection_lost()
    assert session.subscribe_message(news, 1) is None


def test_command_ids_are_unique() -> None:
    """Commands and subscribes draw from one counter of ids."""
    session = make()
    first, ping = session.command("ping", {})
    assert ping == {"type": "ping", "id": first, "data": {}}
    second = session.next_id()
    assert len({first, second}) == 2


def test_subscribed_reply_delivers_and_confirms() -> None:
    """A ``subscribed`` reply sets the baseline and confirms; later events are delivered
    in order and duplicates dropped."""
    session = make()
    news = add(session, "news:a")
    welcome(session)
    assert reply(session, news, 5) == [Confirm("news:a")]
    assert news.confirmed and not news.tracker.awaiting
    assert delivered(session.receive(event("news:a", 6))) == [6]
    assert session.receive(event("news:a", 6)) == []
    with pytest.raises(ProtocolViolation):
        session.receive(event("news:a", 9))


def test_events_before_the_reply_are_held_and_replayed_in_order() -> None:
    """After a reconnect, events that arrive before the reply wait for the replay; the
    recovery is announced first, with the offsets it covers."""
    session = make()
    news = add(session, "news:a")
    welcome(session)
    reply(session, news, 2)
    reconnect(session)
    assert session.receive(event("news:a", 5)) == []
    effects = reply(session, news, 4, recovered=True)
    assert effects == [Recovered("news:a", Recovery("news:a", 2, 4, "e1")), Confirm("news:a")]
    assert Recovery("news:a", 2, 4, "e1").count == 2
    assert delivered(session.receive(event("news:a", 3))) == [3]
    assert delivered(session.receive(event("news:a", 4))) == [4, 5]


def test_recovery_is_announced_only_for_a_subscription_confirmed_before() -> None:
    """A first reply is the baseline, never a ``Recovered``, even with ``recovered: true``
    (the personal channel's announced position); each later one is, also when nothing
    was missed."""
    session = make()
    welcome(session, positions={USER: {"offset": 3, "epoch": "e1"}})
    personal = session.channels[USER]
    command_id, _ = subscribe(session, personal)
    first = session.receive(
        frame(
            "subscribed",
            {"channel": USER, "offset": 3, "epoch": "e1", "recovered": True},
            command_id,
        )
    )
    assert not any(isinstance(effect, Recovered) for effect in first)
    reconnect(session)
    command_id, _ = subscribe(session, personal)
    again = session.receive(
        frame(
            "subscribed",
            {"channel": USER, "offset": 3, "epoch": "e1", "recovered": True},
            command_id,
        )
    )
    assert again == [Recovered(USER, Recovery(USER, 3, 3, "e1")), Confirm(USER)]


def test_recovery_failure_delivers_a_gap_before_confirming() -> None:
    """``recovered: false`` after a reconnect is a Gap, delivered before ``Confirm``."""
    session = make()
    news = add(session, "news:a")
    welcome(session)
    reply(session, news, 2)
    reconnect(session)
    effects = reply(session, news, 250, recovered=False)
    assert effects == [
        Deliver("news:a", [Gap("news:a", "recovery_failed", 2, "e1", 250, "e1")]),
        Confirm("news:a"),
    ]


def test_new_epoch_replay_follows_the_gap() -> None:
    """``recovered: false`` with ``since: 0`` under a new epoch delivers a Gap from the old
    position to offset 0, then the replayed events 1..n, although the old epoch had
    reached a higher offset."""
    session = make()
    news = add(session, "news:a")
    welcome(session)
    reply(session, news, 40, "old")
    session.receive(event("news:a", 41))
    reconnect(session)
    effects = reply(session, news, 3, "new", recovered=False, since=0)
    assert effects == [
        Deliver("news:a", [Gap("news:a", "recovery_failed", 41, "old", 0, "new")]),
        Confirm("news:a"),
    ]
    replayed = [o for n in (1, 2, 3, 4) for o in delivered(session.receive(event("news:a", n)))]
    assert replayed == [1, 2, 3, 4]
    assert news.tracker.recover_point() == (4, "new")


def test_personal_channel_new_epoch_replay_needs_no_fallback() -> None:
    """The automatic channel's ``recovered: false`` with ``since`` is a replay, not a
    case for the unsubscribe-and-recover fallback."""
    session = make()
    welcome(session)
    personal = session.channels[USER]
    reply(session, personal, 5, "old", recovered=False)
    reconnect(session)
    effects = reply(session, personal, 2, "new", recovered=False, since=0)
    assert delivered(effects) == ["gap:5->0"] and effects[-1] == Confirm(USER)
    assert delivered(session.receive(event(USER, 1))) == [1]


def test_personal_channel_new_epoch_without_replay_falls_back_once() -> None:
    """A new epoch answered without ``since`` on the automatic channel (live events had
    gone out) is retried once with unsubscribe-and-recover, whose replay is delivered."""
    session = make()
    welcome(session)
    personal = session.channels[USER]
    reply(session, personal, 5, "old", recovered=False)
    reconnect(session)
    assert reply(session, personal, 4, "new", recovered=False) == [RecoverFresh(personal, 2)]
    assert session.receive(event(USER, 4)) == []  # live, held until the fresh reply
    effects = reply(session, personal, 4, "new", recovered=False, since=0)
    assert delivered(effects) == ["gap:5->0"]
    replayed = [o for n in (1, 2, 3, 4) for o in delivered(session.receive(event(USER, n)))]
    assert replayed == [1, 2, 3, 4]


@pytest.mark.parametrize("since", ["0", -1, 4, True])
def test_malformed_since_is_a_violation(since: object) -> None:
    """A ``since`` that is not an integer between 0 and the reply's offset breaks the
    contract."""
    session = make()
    news = add(session, "news:a")
    welcome(session)
    command_id, _ = subscribe(session, news)
    data = {"offset": 3, "epoch": "e1", "recovered": False, "since": since}
    with pytest.raises(ProtocolViolation):
        session.receive(frame("subscribed", data, command_id))


def test_stale_and_foreign_replies_are_ignored() -> None:
    """Replies to an older subscribe, to a dropped subscription, or without an id change
    nothing."""
    session = make()
    news = add(session, "news:a")
    welcome(session)
    old_id, _ = subscribe(session, news)
    subscribe(session, news)
    data = {"channel": "news:a", "offset": 1, "epoch": "e1"}
    assert session.receive(frame("subscribed", data, old_id)) == []
    assert session.receive(frame("subscribed", data)) == []
    gone_id, _ = subscribe(session, news)
    session.remove("news:a")
    assert session.receive(frame("subscribed", data, gone_id)) == []
    assert not news.confirmed


def test_replies_after_the_connection_was_lost_are_ignored() -> None:
    """A reply to a subscribe sent on a lost connection is not applied."""
    session = make()
    news = add(session, "news:a")
    welcome(session)
    command_id, _ = subscribe(session, news)
    session.connection_lost()
    data = {"channel": "news:a", "offset": 1, "epoch": "e1"}
    assert session.receive(frame("subscribed", data, command_id)) == []


def test_malformed_subscribed_reply_is_a_violation() -> None:
    """A ``subscribed`` reply without an integer offset breaks the contract."""
    session = make()
    news = add(session, "news:a")
    welcome(session)
    command_id, _ = subscribe(session, news)
    with pytest.raises(ProtocolViolation):
        session.receive(frame("subscribed", {"offset": "1", "epoch": "e1"}, command_id))


def test_events_of_unknown_channels_or_malformed_are_ignored() -> None:
    """An event for a channel without a subscription, or one that is malformed, is dropped."""
    session = make()
    news = add(session, "news:a")
    welcome(session)
    reply(session, news, 0)
    assert session.receive(event("news:zzz", 1)) == []
    bad = json.dumps({"type": "notification", "channel": "news:a", "offset": 1})
    assert session.receive(bad) == []
    assert news.tracker.offset == 0


# -- the personal channel --------------------------------------------------------------


def test_personal_channel_falls_back_to_a_fresh_subscription_once() -> None:
    """``recovered: false`` at the same epoch for the automatic channel is retried once per
    connection with unsubscribe-and-recover; the second failure is a Gap."""
    session = make()
    welcome(session)
    personal = session.channels[USER]
    reply(session, personal, 3, recovered=False)
    reconnect(session)
    assert reply(session, personal, 8, recovered=False) == [RecoverFresh(personal, 2)]
    assert personal.fallback_on == 2 and personal.tracker.awaiting
    effects = reply(session, personal, 8, recovered=False)
    assert delivered(effects) == ["gap:3->8"] and effects[-1] == Confirm(USER)
    reconnect(session)
    assert reply(session, personal, 9, recovered=False) == [RecoverFresh(personal, 3)]


def test_first_connection_lost_before_the_personal_reply_misses_nothing() -> None:
    """When the very first connection drops before the personal channel's reply, the next
    one recovers from the position ``connected`` announced: the events published in
    between are replayed and no Gap from 0 is reported."""
    session = make()
    welcome(session, positions={USER: {"offset": 3, "epoch": "e1"}})
    personal = session.channels[USER]
    recover = {"channel": USER, "recover": {"offset": 3, "epoch": "e1"}}
    assert subscribe(session, personal)[1] == recover
    assert session.receive(event(USER, 4)) == []  # held until the reply, then lost
    session.connection_lost()
    welcome(session, positions={USER: {"offset": 6, "epoch": "e1"}})
    assert not personal.tracker.baseline_lost
    command_id, data = subscribe(session, personal)
    assert data == recover
    effects = session.receive(
        frame(
            "subscribed",
            {"channel": USER, "offset": 6, "epoch": "e1", "recovered": True},
            command_id,
        )
    )
    assert effects == [Confirm(USER)]
    replayed = [effect for offset in (4, 5, 6) for effect in session.receive(event(USER, offset))]
    assert delivered(replayed) == [4, 5, 6]


def test_personal_position_in_connected_is_the_first_baseline() -> None:
    """On a connection that lives, the announced position is the baseline: the reply to
    its recover confirms, held live events follow, no Gap."""
    session = make()
    welcome(session, positions={USER: {"offset": 3, "epoch": "e1"}})
    personal = session.channels[USER]
    command_id, _ = subscribe(session, personal)
    assert session.receive(event(USER, 4)) == []
    effects = session.receive(
        frame(
            "subscribed",
            {"channel": USER, "offset": 3, "epoch": "e1", "recovered": True},
            command_id,
        )
    )
    assert delivered(effects) == [4] and effects[-1] == Confirm(USER)
    # A later connection's announcement does not move a baseline the client already has.
    session.connection_lost()
    welcome(session, positions={USER: {"offset": 9, "epoch": "e1"}})
    assert subscribe(session, personal)[1]["recover"] == {"offset": 4, "epoch": "e1"}


@pytest.mark.parametrize(
    "positions",
    [
        "garbage",
        {USER: {"offset": "3", "epoch": "e1"}},
        {USER: {"offset": -1, "epoch": "e1"}},
        {USER: {"offset": True, "epoch": "e1"}},
        {USER: {"offset": 3, "epoch": ""}},
        {USER: [3, "e1"]},
        {"user:other": {"offset": 3, "epoch": "e1"}},
    ],
)
def test_malformed_positions_fall_back_to_the_first_recover(positions: object) -> None:
    """A ``positions`` entry that is missing or malformed is ignored: the first subscribe
    asks for a baseline (``FIRST_RECOVER``) as from a server that sends none."""
    session = make()
    welcome(session, positions=positions)
    assert subscribe(session, session.channels[USER])[1] == {
        "channel": USER,
        "recover": FIRST_RECOVER,
    }


def test_personal_channel_live_before_without_a_baseline_reports_a_gap() -> None:
    """From a server that announces no position, a personal channel whose first
    connection ended before its reply reports a Gap from offset 0 at its first baseline
    (events may have been missed, and nothing says which)."""
    session = make()
    welcome(session)
    personal = session.channels[USER]
    effects = reconnect(session)
    assert not any(isinstance(e, Added) for e in effects)
    assert personal.tracker.baseline_lost
    assert delivered(reply(session, personal, 4, recovered=False)) == ["gap:0->4"]


def test_dropped_personal_channel_is_unsubscribed_at_connect() -> None:
    """After the application unsubscribes the personal channel, each connection
    unsubscribes it first; subscribing it again undoes that."""
    session = make()
    welcome(session)
    session.remove(USER)
    effects = reconnect(session)
    assert USER not in session.channels
    assert effects[0] == Resubscribe(2, ({"type": "unsubscribe", "data": {"channel": USER}},), ())
    session.want(USER)
    assert reconnect(session)[0] == Added(session.channels[USER])


# -- server-initiated unsubscribes and errors ------------------------------------------


def test_server_unsubscribe_with_resubscribe_subscribes_again() -> None:
    """``unsubscribed`` with ``resubscribe: true`` holds events and subscribes again."""
    session = make()
    news = add(session, "news:a")
    welcome(session)
    reply(session, news, 1)
    effects = session.receive(frame("unsubscribed", {"channel": "news:a", "resubscribe": True}))
    assert effects == [SubscribeNow(news, 1)] and news.tracker.awaiting


def test_server_unsubscribe_without_resubscribe_ends_the_subscription() -> None:
    """``unsubscribed`` without ``resubscribe`` ends it with its reason (``revoked`` when
    there is none); unknown channels are ignored."""
    session = make()
    news, room = add(session, "news:a"), add(session, "room:b")
    welcome(session)
    effects = session.receive(frame("unsubscribed", {"channel": "news:a", "reason": "banned"}))
    assert len(effects) == 1 and isinstance(effects[0], End)
    assert isinstance(effects[0].error, SubscriptionError)
    assert (effects[0].channel, effects[0].error.code) == ("news:a", "banned")
    assert "news:a" not in session.channels and not session.is_current(news)
    [end] = session.receive(frame("unsubscribed", {"channel": "room:b", "reason": 7}))
    assert isinstance(end, End) and end.error.args == (
        "room:b: revoked: the server ended the subscription",
    )
    assert not session.is_current(room)
    assert session.receive(frame("unsubscribed", {"channel": "news:zzz"})) == []


def test_command_replies_are_handed_over() -> None:
    """``pong``, ``refreshed`` and ``unsubscribed`` with an id are replies to commands."""
    session = make()
    assert session.receive(frame("pong", {}, "7")) == [Reply("7", {})]
    assert session.receive(frame("refreshed", {"expires_at": "x"}, "8")) == [
        Reply("8", {"expires_at": "x"})
    ]
    assert session.receive(frame("unsubscribed", {"channel": "news:a"}, "9")) == [
        Reply("9", {"channel": "news:a"})
    ]


def test_refused_first_subscription_ends_it() -> None:
    """An error answering the first subscribe of a channel ends it with that code."""
    session = make()
    news = add(session, "news:a")
    welcome(session)
    command_id, _ = subscribe(session, news)
    effects = session.receive(
        frame("error", {"code": "subscription_failed", "message": "down"}, command_id)
    )
    assert len(effects) == 1 and isinstance(effects[0], End)
    assert isinstance(effects[0].error, SubscriptionError)
    assert effects[0].error.code == "subscription_failed"
    assert "news:a" not in session.channels


def test_failed_resubscription_is_retried_with_backoff() -> None:
    """A transient error on a confirmed subscription schedules a retry with a growing
    delay; success resets the count; a fatal code ends it."""
    session = make()
    news = add(session, "news:a")
    welcome(session)
    reply(session, news, 1)
    for retries, delay in ((1, 1.0), (2, 2.0)):
        command_id, _ = subscribe(session, news)
        effects = session.receive(frame("error", {"code": "rate_limited"}, command_id))
        assert effects == [RetrySubscribe(news, 1, delay)] and news.retries == retries
    reply(session, news, 1, recovered=True)
    assert news.retries == 0
    command_id, _ = subscribe(session, news)
    [end] = session.receive(frame("error", {"code": "unauthorized"}, command_id))
    assert isinstance(end, End) and isinstance(end.error, SubscriptionError)
    assert end.error.code == "unauthorized"


def test_failed_personal_channel_subscription_is_retried() -> None:
    """The automatic channel is retried even before its first confirmation."""
    session = make()
    welcome(session)
    personal = session.channels[USER]
    command_id, _ = subscribe(session, personal)
    effects = session.receive(frame("error", {"code": "internal_error"}, command_id))
    assert effects == [RetrySubscribe(personal, 1, 1.0)]


def test_stale_subscribe_errors_are_ignored() -> None:
    """An error for an older subscribe, or a dropped subscription, changes nothing."""
    session = make()
    news = add(session, "news:a")
    welcome(session)
    old_id, _ = subscribe(session, news)
    subscribe(session, news)
    assert session.receive(frame("error", {"code": "unauthorized"}, old_id)) == []
    gone_id, _ = subscribe(session, news)
    session.remove("news:a")
    assert session.receive(frame("error", {"code": "unauthorized"}, gone_id)) == []


def test_other_errors_go_to_the_command_or_are_remembered() -> None:
    """An error with another id is a command's; without an id, ``unauthorized`` becomes
    the reason of the 4401 close that follows."""
    session = make()
    welcome(session)
    assert session.receive(frame("error", {"code": 5, "message": None}, "42")) == [
        Failed("42", "internal_error", "")
    ]
    assert (
        session.receive(frame("error", {"code": "unauthorized", "message": "token expired"})) == []
    )
    assert session.outcome(4401, "") == Outcome(4401, "token expired", True)
    assert session.outcome(1011, "oops") == Outcome(1011, "oops", True)
    session.connection_opened()
    assert session.outcome(4401, "bye") == Outcome(4401, "bye", False)


def test_unanswered_command_error_is_remembered() -> None:
    """An error handed back by the shell (no command waited) is treated like one without
    an id."""
    session = make()
    session.server_error("unauthorized", "revoked key")
    assert session.outcome(4401, "").reason == "revoked key"


# -- resubscription after a reconnect --------------------------------------------------


def test_resubscription_skips_what_was_already_sent_and_paces_the_rest() -> None:
    """A channel subscribed on this connection already, or dropped, needs no resubscribe;
    commands past the burst wait 1/rate seconds."""
    session = make(burst=2, rate=4.0)
    news, room = add(session, "news:a"), add(session, "room:b")
    [plan, _] = welcome(session, channels=())
    assert isinstance(plan, Resubscribe)
    assert [session.needs_resubscribe(s, plan.gen) for s in plan.channels] == [True, True]
    subscribe(session, news)
    session.remove("room:b")
    assert [session.needs_resubscribe(s, plan.gen) for s in (news, room)] == [False, False]
    assert [session.pacing_delay(sent) for sent in (0, 1, 2, 5)] == [None, None, 0.25, 0.25]


def test_clear_drops_every_subscription() -> None:
    """After the client stops, the session has no subscription left."""
    session = make()
    add(session, "news:a")
    session.clear()
    assert session.channels == {}


# -- the end of a connection -----------------------------------------------------------


@pytest.mark.parametrize("code", [1000, 4403])
def test_normal_close_and_forbidden_stop(code: int) -> None:
    """1000 and 4403 stop the client with ``ConnectionClosed`` carrying the reason."""
    step = make().connection_ended(Outcome(code, "bye", True))
    assert isinstance(step, Stop) and type(step.error) is ConnectionClosed
    assert step.error.code == code and step.error.reason.endswith(": bye")


def test_rejected_token_without_provider_stops() -> None:
    """4401 without a token provider stops with ``AuthenticationFailed``."""
    step = make().connection_ended(Outcome(4401, "", False))
    assert isinstance(step, Stop) and isinstance(step.error, AuthenticationFailed)
    assert "token_provider" in step.error.reason and not step.error.reason.endswith(": ")


def test_rejected_tokens_from_the_provider_are_counted() -> None:
    """4401 with a provider drops the token and reconnects, until too many tokens in a row
    were rejected before ``connected``; a welcomed connection restarts the count."""
    session = make(provider=True, max_auth_failures=2)
    assert isinstance(session.connection_ended(Outcome(4401, "expired", False)), Reconnect)
    assert session.tokens.token is None
    assert isinstance(session.connection_ended(Outcome(4401, "expired", False)), Reconnect)
    assert isinstance(session.connection_ended(Outcome(4401, "expired", True)), Reconnect)
    assert isinstance(session.connection_ended(Outcome(4401, "expired", False)), Reconnect)
    step = session.connection_ended(Outcome(4401, "expired", False))
    assert isinstance(step, Stop) and isinstance(step.error, AuthenticationFailed)
    assert "rejected 3 tokens" in step.error.reason


def test_reconnect_delays_follow_the_backoff() -> None:
    """Other closes reconnect with backoff; 4429 adds the slow floor; a connection that
    stayed up long enough resets the backoff."""
    clock = Clock()
    session = make(clock=clock)
    assert session.connection_ended(Outcome(None, "lost", False)) == Reconnect(0.5)
    assert session.connection_ended(Outcome(1011, "", False)) == Reconnect(1.0)
    assert session.connection_ended(Outcome(4429, "", False)) == Reconnect(5.0 + 2.0)
    welcome(session, channels=())
    clock.now += 10.0
    assert session.connection_ended(Outcome(1001, "", True)) == Reconnect(0.5)


# -- token refresh ---------------------------------------------------------------------


def test_refresh_is_scheduled_only_with_a_provider_and_an_expiry() -> None:
    """Without a provider or a known expiry there is nothing to refresh; otherwise the
    refresh is due ``refresh_margin`` before expiry."""
    assert make().refresh_delay() is None
    session = make(provider=True, clock=Clock(0.0))
    assert session.refresh_delay() is None
    welcome(session, channels=(), expires_at="1970-01-01T00:10:00Z")
    assert session.refresh_delay() == 600 - 30


def test_refresh_retry_and_acceptance() -> None:
    """A failed provider call is retried after a bounded pause; a refreshed token that does
    not expire later stops the refreshing."""
    clock = Clock(0.0)
    session = make(provider=True, clock=clock)
    assert session.refresh_retry_delay(None) == 0.5
    assert session.refresh_retry_delay(8.0) == 2.0
    welcome(session, channels=(), expires_at="1970-01-01T00:10:00Z")
    assert session.refreshed("t2", {"expires_at": "1970-01-01T00:20:00Z"})
    assert session.tokens.token == "t2"
    assert not session.refreshed("t3", {"expires_at": "1970-01-01T00:20:00Z"})
    assert not session.refreshed("t4", {})
