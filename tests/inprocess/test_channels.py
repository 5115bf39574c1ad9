"""Tests for tidings.channels: claim patterns, namespace rules, callables and webhooks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given
from hypothesis import strategies as st

from tidings.auth import Identity
from tidings.channels import ChannelPolicy, matches_claim
from tidings.config import NamespaceSettings
from tidings.errors import (
    AuthorizerUnavailable,
    ConfigError,
    InvalidRequest,
    SubscriptionFailed,
    Unauthorized,
)

ALICE = Identity(
    user_id="alice",
    expires_at=0.0,
    channels=("conversation:*", "task:task-7*", "news:daily"),
    claims={"sub": "alice", "tenant": "acme", "channels": ["conversation:*"]},
)
BOB = Identity(user_id="bob", expires_at=0.0)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Backend:
    """An application backend answering webhook authorization requests."""

    def __init__(self) -> None:
        self.status = 200
        self.requests: list[dict[str, Any]] = []
        self.seen = asyncio.Event()
        self.gate: asyncio.Event | None = None
        self.redirect_hits = 0

    async def authorize(self, request: web.Request) -> web.Response:
        self.requests.append(await request.json())
        self.seen.set()
        if self.gate is not None:
            await self.gate.wait()
        return web.Response(status=self.status)

    async def redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/elsewhere")

    async def elsewhere(self, request: web.Request) -> web.Response:
        self.redirect_hits += 1
        return web.Response(status=200)


@pytest.fixture
async def backend() -> AsyncIterator[tuple[Backend, TestServer]]:
    state = Backend()
    app = web.Application()
    app.router.add_post("/auth", state.authorize)
    app.router.add_post("/redirect", state.redirect)
    app.router.add_post("/elsewhere", state.elsewhere)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    yield state, server
    await server.close()


def webhook_policy(
    server: TestServer,
    *,
    path: str = "/auth",
    timeout: float = 2.0,
    cache_ttl: float = 30,
    clock: FakeClock | None = None,
    cache_size: int = 100,
) -> ChannelPolicy:
    ns = NamespaceSettings(
        rule="webhook", url=str(server.make_url(path)), timeout=timeout, cache_ttl=cache_ttl
    )
    return ChannelPolicy({"room": ns}, clock=clock or FakeClock(), cache_size=cache_size)


# --- matches_claim ----------------------------------------------------------------------


def test_exact_claim_matches() -> None:
    """An exact channel name in the claim matches that channel only."""
    assert matches_claim("news:daily", ["news:daily"])
    assert not matches_claim("news:weekly", ["news:daily"])


def test_namespace_prefix_pattern() -> None:
    """``conversation:*`` matches its namespace but not a namespace sharing the prefix."""
    assert matches_claim("conversation:conv-1", ["conversation:*"])
    assert not matches_claim("conversations:x", ["conversation:*"])


def test_name_prefix_pattern() -> None:
    """``task:task-7*`` matches ``task:task-7`` and ``task:task-77`` but not ``task:task-8``."""
    assert matches_claim("task:task-7", ["task:task-7*"])
    assert matches_claim("task:task-77", ["task:task-7*"])
    assert not matches_claim("task:task-8", ["task:task-7*"])


def test_bare_star_and_namespaceless_patterns_match_nothing() -> None:
    """A bare ``*``, ``:*`` or a pattern without a namespace colon is not honoured."""
    for pattern in ("*", ":*", "conv*", "**"):
        assert not matches_claim("conversation:conv-1", [pattern])


def test_non_string_patterns_are_ignored() -> None:
    """Junk entries in the claim neither match nor crash."""
    assert not matches_claim("news:daily", [None, 3, ["news:daily"]])  # type: ignore[list-item]


_channels = st.from_regex(r"[a-z][a-z0-9_-]{0,5}:[A-Za-z0-9_.@=+|:-]{1,12}", fullmatch=True)


@given(channel=_channels, data=st.data())
def test_matches_claim_properties(channel: str, data: st.DataObject) -> None:
    """Every namespaced prefix of a channel plus ``*`` matches it; ``*`` and ``[]`` never do."""
    assert matches_claim(channel, [channel])
    assert not matches_claim(channel, [])
    assert not matches_claim(channel, ["*"])
    cut = data.draw(st.integers(min_value=channel.index(":") + 1, max_value=len(channel)))
    assert matches_claim(channel, [channel[:cut] + "*"])
    assert not matches_claim(channel, [channel[:cut] + "~*"])


# --- rules ------------------------------------------------------------------------------


async def test_personal_channel_own_allowed_other_denied() -> None:
    """``user:<sub>`` is open to its owner only, even under a public default rule."""
    policy = ChannelPolicy({"default": NamespaceSettings(rule="public")})
    await policy.authorize(ALICE, "user:alice")
    with pytest.raises(Unauthorized) as info:
        await policy.authorize(BOB, "user:alice")
    assert info.value.channel == "user:alice"


async def test_personal_namespace_cannot_be_configured() -> None:
    """Neither a config rule nor a callable may be registered for ``user``."""
    with pytest.raises(ConfigError):
        ChannelPolicy({"user": NamespaceSettings(rule="public")})
    with pytest.raises(ValueError):
        ChannelPolicy({}, callables={"user": lambda identity, channel: True})


async def test_claims_rule() -> None:
    """The claims rule allows channels in the token's channels claim and denies others."""
    policy = ChannelPolicy({"conversation": NamespaceSettings(rule="claims")})
    await policy.authorize(ALICE, "conversation:conv-1")
    with pytest.raises(Unauthorized):
        await policy.authorize(BOB, "conversation:conv-1")


async def test_public_and_deny_rules() -> None:
    """Public admits anyone authenticated; deny admits nobody."""
    policy = ChannelPolicy(
        {"lobby": NamespaceSettings(rule="public"), "audit": NamespaceSettings(rule="deny")}
    )
    await policy.authorize(BOB, "lobby:main")
    with pytest.raises(Unauthorized):
        await policy.authorize(ALICE, "audit:main")


async def test_unknown_namespace_without_default_fails() -> None:
    """A namespace with no rule and no default is ``subscription_failed``."""
    policy = ChannelPolicy({"lobby": NamespaceSettings(rule="public")})
    with pytest.raises(SubscriptionFailed) as info:
        await policy.authorize(ALICE, "news:daily")
    assert info.value.code == "subscription_failed"
    assert info.value.channel == "news:daily"


async def test_default_rule_fallback() -> None:
    """An unconfigured namespace uses the ``default`` rule."""
    policy = ChannelPolicy({"default": NamespaceSettings(rule="claims")})
    await policy.authorize(ALICE, "news:daily")
    with pytest.raises(Unauthorized):
        await policy.authorize(ALICE, "news:weekly")


async def test_malformed_channel_is_invalid_request() -> None:
    """A channel that does not fit the grammar raises ``InvalidRequest``."""
    policy = ChannelPolicy({"default": NamespaceSettings(rule="public")})
    with pytest.raises(InvalidRequest):
        await policy.authorize(ALICE, "no-colon")


# --- callables --------------------------------------------------------------------------


async def test_sync_callable_takes_precedence() -> None:
    """A sync callable decides, overriding the namespace's configured rule."""
    policy = ChannelPolicy(
        {"room": NamespaceSettings(rule="deny")},
        callables={"room": lambda identity, channel: identity.user_id == "alice"},
    )
    await policy.authorize(ALICE, "room:1")
    with pytest.raises(Unauthorized):
        await policy.authorize(BOB, "room:1")


async def test_async_callable() -> None:
    """An async callable's awaited answer decides."""

    async def rule(identity: Identity, channel: str) -> bool:
        return channel.endswith(":open")

    policy = ChannelPolicy({}, callables={"room": rule})
    await policy.authorize(BOB, "room:open")
    with pytest.raises(Unauthorized):
        await policy.authorize(BOB, "room:shut")


async def test_raising_callable_is_unavailable() -> None:
    """A callable that raises, sync or async, yields ``AuthorizerUnavailable``."""

    def sync_rule(identity: Identity, channel: str) -> bool:
        raise RuntimeError("database down")

    async def async_rule(identity: Identity, channel: str) -> bool:
        raise RuntimeError("database down")

    policy = ChannelPolicy({}, callables={"a": sync_rule, "b": async_rule})
    for channel in ("a:1", "b:1"):
        with pytest.raises(AuthorizerUnavailable) as info:
            await policy.authorize(ALICE, channel)
        assert info.value.code == "subscription_failed"
        assert info.value.channel == channel


async def test_non_bool_callable_answer_is_unavailable() -> None:
    """A callable returning something other than a bool never opens the channel."""

    def rule(identity: Identity, channel: str) -> Any:
        return "yes"

    policy = ChannelPolicy({}, callables={"room": rule})
    with pytest.raises(AuthorizerUnavailable):
        await policy.authorize(ALICE, "room:1")


# --- webhook ----------------------------------------------------------------------------


async def test_webhook_allows_on_200_and_sends_body(backend: tuple[Backend, TestServer]) -> None:
    """A 2xx answer allows, and the backend receives user_id, channel and claims."""
    state, server = backend
    policy = webhook_policy(server)
    try:
        await policy.authorize(ALICE, "room:r1")
    finally:
        await policy.close()
    assert state.requests == [
        {"user_id": "alice", "channel": "room:r1", "claims": dict(ALICE.claims)}
    ]


@pytest.mark.parametrize("status", [401, 403])
async def test_webhook_denies_on_401_403(backend: tuple[Backend, TestServer], status: int) -> None:
    """401 and 403 answers deny the subscription."""
    state, server = backend
    state.status = status
    policy = webhook_policy(server)
    try:
        with pytest.raises(Unauthorized):
            await policy.authorize(ALICE, "room:r1")
    finally:
        await policy.close()


@pytest.mark.parametrize("status", [500, 404, 204])
async def test_webhook_other_status(backend: tuple[Backend, TestServer], status: int) -> None:
    """Any 2xx allows; any other non-401/403 status is ``AuthorizerUnavailable``."""
    state, server = backend
    state.status = status
    policy = webhook_policy(server)
    try:
        if status == 204:
            await policy.authorize(ALICE, "room:r1")
        else:
            with pytest.raises(AuthorizerUnavailable):
                await policy.authorize(ALICE, "room:r1")
    finally:
        await policy.close()


async def test_webhook_redirect_not_followed(backend: tuple[Backend, TestServer]) -> None:
    """A 3xx is a failure and the redirect target never receives the claims."""
    state, server = backend
    policy = webhook_policy(server, path="/redirect")
    try:
        with pytest.raises(AuthorizerUnavailable):
            await policy.authorize(ALICE, "room:r1")
    finally:
        await policy.close()
    assert state.redirect_hits == 0


async def test_webhook_timeout(backend: tuple[Backend, TestServer]) -> None:
    """A backend that never answers within the namespace timeout is unavailable."""
    state, server = backend
    state.gate = asyncio.Event()  # never set
    policy = webhook_policy(server, timeout=0.2)
    try:
        with pytest.raises(AuthorizerUnavailable):
            await policy.authorize(ALICE, "room:r1")
    finally:
        await policy.close()


async def test_webhook_connection_error() -> None:
    """A backend that refuses connections is unavailable."""
    async with TestServer(web.Application(), host="127.0.0.1", port=0) as server:
        url = str(server.make_url("/auth"))
    policy = ChannelPolicy({"room": NamespaceSettings(rule="webhook", url=url, timeout=1)})
    try:
        with pytest.raises(AuthorizerUnavailable):
            await policy.authorize(ALICE, "room:r1")
    finally:
        await policy.close()


async def test_webhook_answers_cached_until_ttl(backend: tuple[Backend, TestServer]) -> None:
    """Allow and deny answers are reused within cache_ttl and asked again after it."""
    state, server = backend
    clock = FakeClock()
    policy = webhook_policy(server, cache_ttl=30, clock=clock)
    try:
        await policy.authorize(ALICE, "room:r1")
        await policy.authorize(ALICE, "room:r1")
        assert len(state.requests) == 1
        clock.now += 31
        state.status = 403
        with pytest.raises(Unauthorized):
            await policy.authorize(ALICE, "room:r1")
        assert len(state.requests) == 2
        state.status = 200
        with pytest.raises(Unauthorized):
            await policy.authorize(ALICE, "room:r1")
        assert len(state.requests) == 2
    finally:
        await policy.close()


async def test_webhook_cache_key_is_user_and_channel(backend: tuple[Backend, TestServer]) -> None:
    """Another user or another channel is not served from the cache."""
    state, server = backend
    policy = webhook_policy(server)
    try:
        await policy.authorize(ALICE, "room:r1")
        await policy.authorize(BOB, "room:r1")
        await policy.authorize(ALICE, "room:r2")
        assert len(state.requests) == 3
    finally:
        await policy.close()


async def test_webhook_zero_ttl_not_cached(backend: tuple[Backend, TestServer]) -> None:
    """cache_ttl 0 asks the backend every time."""
    state, server = backend
    policy = webhook_policy(server, cache_ttl=0)
    try:
        await policy.authorize(ALICE, "room:r1")
        await policy.authorize(ALICE, "room:r1")
        assert len(state.requests) == 2
    finally:
        await policy.close()


async def test_webhook_cache_is_bounded(backend: tuple[Backend, TestServer]) -> None:
    """Past cache_size the oldest answer is evicted and asked for again."""
    state, server = backend
    policy = webhook_policy(server, cache_size=2)
    try:
        for channel in ("room:a", "room:b", "room:c", "room:c", "room:b"):
            await policy.authorize(ALICE, channel)
        assert len(state.requests) == 3
        await policy.authorize(ALICE, "room:a")
        assert len(state.requests) == 4
    finally:
        await policy.close()


async def test_webhook_failures_not_cached(backend: tuple[Backend, TestServer]) -> None:
    """A failed request is retried on the next subscribe."""
    state, server = backend
    state.status = 500
    policy = webhook_policy(server)
    try:
        with pytest.raises(AuthorizerUnavailable):
            await policy.authorize(ALICE, "room:r1")
        state.status = 200
        await policy.authorize(ALICE, "room:r1")
        assert len(state.requests) == 2
    finally:
        await policy.close()


async def test_webhook_concurrent_requests_share_one(backend: tuple[Backend, TestServer]) -> None:
    """Identical concurrent subscribes make a single HTTP request and share its answer."""
    state, server = backend
    state.gate = asyncio.Event()
    # No cache, so only in-flight sharing can explain a single request.
    policy = webhook_policy(server, cache_ttl=0)
    try:
        tasks = [asyncio.create_task(policy.authorize(ALICE, "room:r1")) for _ in range(5)]
        await state.seen.wait()
        state.gate.set()
        assert await asyncio.gather(*tasks) == [None] * 5
        assert len(state.requests) == 1
    finally:
        await policy.close()


async def test_webhook_shared_request_survives_one_cancel(
    backend: tuple[Backend, TestServer],
) -> None:
    """Cancelling one waiter does not cancel the request the others share."""
    state, server = backend
    state.gate = asyncio.Event()
    policy = webhook_policy(server)
    try:
        first = asyncio.create_task(policy.authorize(ALICE, "room:r1"))
        second = asyncio.create_task(policy.authorize(ALICE, "room:r1"))
        await state.seen.wait()
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        state.gate.set()
        await second
        assert len(state.requests) == 1
    finally:
        await policy.close()


async def test_close_during_request_is_unavailable(backend: tuple[Backend, TestServer]) -> None:
    """Closing the policy turns a pending webhook subscribe into ``AuthorizerUnavailable``."""
    state, server = backend
    state.gate = asyncio.Event()
    policy = webhook_policy(server)
    pending = asyncio.create_task(policy.authorize(ALICE, "room:r1"))
    await state.seen.wait()
    await policy.close()
    with pytest.raises(AuthorizerUnavailable):
        await pending
    await policy.close()


async def test_injected_post_json_receives_url_body_and_timeout() -> None:
    """A custom post_json gets the namespace URL, the JSON body and the timeout."""
    calls: list[tuple[str, dict[str, Any], float]] = []

    async def post_json(url: str, body: Any, timeout: float) -> int:
        calls.append((url, dict(body), timeout))
        return 200

    ns = NamespaceSettings(rule="webhook", url="https://backend.test/auth", timeout=1.5)
    policy = ChannelPolicy({"room": ns}, post_json=post_json)
    await policy.authorize(BOB, "room:r1")
    assert calls == [
        ("https://backend.test/auth", {"user_id": "bob", "channel": "room:r1", "claims": {}}, 1.5)
    ]


@pytest.mark.parametrize("shape", ["circular", "deep"])
async def test_webhook_with_unencodable_claims_is_unavailable(
    shape: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Hand-made claims that cannot become JSON (a cycle, 5,000 levels) make the webhook
    unavailable with a warning, never a RecursionError or ValueError."""
    claims: Any
    if shape == "circular":
        claims = {"sub": "alice"}
        claims["self"] = claims
    else:
        claims = {"sub": "alice", "deep": []}
        node = claims["deep"]
        for _ in range(5000):
            node.append([])
            node = node[0]
    identity = Identity(user_id="alice", expires_at=0.0, claims=claims)
    sent: list[Any] = []

    async def post_json(url: str, body: Any, timeout: float) -> int:
        sent.append(body)
        return 200

    ns = NamespaceSettings(rule="webhook", url="https://backend.test/auth", timeout=1.5)
    policy = ChannelPolicy({"room": ns}, post_json=post_json)
    with pytest.raises(AuthorizerUnavailable):
        await policy.authorize(identity, "room:r1")
    assert sent == []
    assert "claims not encodable" in caplog.text
