"""The live console and tidings.js in a real browser (Debian's Chromium, headless).

Skipped when /usr/bin/chromium or the playwright package is missing, unless
TIDINGS_REQUIRE_BROWSER=1 (CI) turns that into a failure. No browser is downloaded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio

from browsers import ARTIFACTS, chromium
from fault_proxy_js import fault_proxy
from helpers import API_KEY, api, publish, scaled, serve, token
from tidings.protocol import CloseCode

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page

WAIT_MS = int(scaled(8.0) * 1000)
CONSOLE = {"console": {"enabled": "on"}}
#: Small backoff (ms) passed to the console so that reconnections in tests are quick.
FAST = "delay=50&maxDelay=200"

# One browser for the module (launching takes about a second); each test gets a fresh
# context, so no state is shared between tests.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as launched:
        yield launched


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1440, "height": 900})
    opened = await context.new_page()
    opened.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield opened
    finally:
        await context.close()
    assert errors == [], f"JavaScript errors in the page: {errors}"


async def _leave(page: Page) -> None:
    """Close the page's browser context while the server still runs: a browser keeps
    spare pre-connected sockets, which would hold the server's graceful shutdown."""
    await page.context.close()


async def _open_console(page: Page, base: str, tok: str, extra: str = "") -> None:
    await page.goto(f"{base}/console#token={tok}{'&' + extra if extra else ''}")
    await _wait_state(page, "connected")


async def _wait_state(page: Page, state: str) -> None:
    await page.wait_for_selector(f'#state[data-state="{state}"]')


async def _wait_live(page: Page, channel: str) -> None:
    await page.wait_for_selector(
        f'#subs li[data-channel="{channel}"] .sub-state[data-state="subscribed"]'
    )


async def _wait_event(page: Page, channel: str, offset: int) -> None:
    await page.wait_for_selector(
        f'tr.event[data-channel="{channel}"][data-offset="{offset}"]', state="attached"
    )


async def _offsets(page: Page, channel: str) -> list[int]:
    """Offsets shown for ``channel``, oldest first (the table lists newest first)."""
    shown: list[str] = await page.eval_on_selector_all(
        f'tr.event[data-channel="{channel}"]', "rows => rows.map(r => r.dataset.offset)"
    )
    return [int(offset) for offset in reversed(shown)]


async def _publish_many(server: Any, channel: str, count: int, start: int = 1) -> None:
    for n in range(start, start + count):
        await publish(
            server,
            channel,
            "chat_message",
            {"conversation_id": "c1", "sender_id": "bob", "content": f"message {n}"},
        )


async def test_console_shows_events_published_through_the_api(page: Page) -> None:
    """The console connects, subscribes, and shows events from the server API and its form."""
    async with serve(CONSOLE) as server:
        await _open_console(
            page, server.http_url, token("alice", ("demo:*",)), "channels=demo:lobby"
        )
        await _wait_live(page, "demo:lobby")
        await _wait_live(page, "user:alice")
        assert await page.text_content("#info-user") == "alice"

        await publish(
            server,
            "demo:lobby",
            "chat_message",
            {"conversation_id": "lobby", "sender_id": "bob", "content": "Hello there!"},
        )
        await _wait_event(page, "demo:lobby", 1)
        row = page.locator('tr.event[data-channel="demo:lobby"][data-offset="1"]')
        assert await row.locator("td.type").text_content() == "chat_message"
        assert "Hello there!" in (await row.locator("td.data").text_content() or "")

        await publish(
            server,
            "user:alice",
            "notification",
            {"message": "Your export is ready", "level": "success"},
        )
        await _wait_event(page, "user:alice", 1)

        # The publish form, with the API key typed in (production mode: not pre-filled).
        assert await page.input_value("#api-key") == ""
        await page.fill("#api-key", API_KEY)
        await page.fill("#pub-channel", "demo:lobby")
        await page.fill("#pub-type", "status_update")
        await page.fill(
            "#pub-data", '{"entity_type": "order", "entity_id": "o-7", "status": "shipped"}'
        )
        await page.click("#publish")
        await _wait_event(page, "demo:lobby", 2)
        assert "offset 2" in (await page.text_content("#pub-result") or "")
        await page.fill("#channel", "demo:alerts")
        await page.click("#subscribe-form button")
        await _wait_live(page, "demo:alerts")
        await publish(
            server,
            "demo:alerts",
            "notification",
            {"message": "Disk almost full", "level": "warning"},
        )
        await _wait_event(page, "demo:alerts", 1)
        assert await _offsets(page, "demo:lobby") == [1, 2]

        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "console.png"), animations="disabled")
        await _leave(page)


async def test_cut_connection_recovers_missed_events_in_order(page: Page) -> None:
    """Events published while the page is cut off arrive after it reconnects, in order, once."""
    async with serve(CONSOLE) as server, fault_proxy(server.host, server.port) as proxy:
        ws = f"ws://127.0.0.1:{proxy.port}/ws"
        await _open_console(
            page, server.http_url, token("alice", ("demo:*",)), f"ws={ws}&channels=demo:feed&{FAST}"
        )
        await _wait_live(page, "demo:feed")
        await _publish_many(server, "demo:feed", 3)
        await _wait_event(page, "demo:feed", 3)

        proxy.refusing = True
        assert proxy.cut() == 1
        await page.wait_for_selector('#state:not([data-state="connected"])')
        await proxy.wait_refused(1)  # the page tried again and was turned away
        await _publish_many(server, "demo:feed", 5, start=4)
        await publish(server, "user:alice", "notification", {"message": "missed", "level": "info"})

        proxy.refusing = False
        await page.wait_for_selector(
            'tr.marker[data-kind="recovered"][data-channel="demo:feed"]', state="attached"
        )
        await _wait_event(page, "demo:feed", 8)
        await _wait_event(page, "user:alice", 1)
        await _publish_many(server, "demo:feed", 2, start=9)
        await _wait_event(page, "demo:feed", 10)

        assert await _offsets(page, "demo:feed") == list(range(1, 11))
        marker = (
            await page.text_content('tr.marker[data-kind="recovered"][data-channel="demo:feed"]')
            or ""
        )
        assert "5 missed events" in marker
        assert await page.locator('tr.marker[data-kind="unrecovered"]').count() == 0
        assert await page.locator('tr.marker[data-kind="disconnected"]').count() >= 1
        await _leave(page)


async def test_restarted_memory_server_shows_that_recovery_failed(page: Page) -> None:
    """After a restart of an in-memory server the page marks the channel as not recovered."""
    tok = token("alice", ("demo:*",))
    async with serve(CONSOLE) as first:
        port = first.port
        await _open_console(page, first.http_url, tok, f"channels=demo:feed&{FAST}")
        await _wait_live(page, "demo:feed")
        await _publish_many(first, "demo:feed", 2)
        await _wait_event(page, "demo:feed", 2)
    await page.wait_for_selector('#state:not([data-state="connected"])')
    async with serve({**CONSOLE, "server": {"port": port}}) as second:
        await page.wait_for_selector(
            'tr.marker[data-kind="unrecovered"][data-channel="demo:feed"]', state="attached"
        )
        await _wait_state(page, "connected")
        await _wait_live(page, "demo:feed")
        await _publish_many(second, "demo:feed", 1)
        # The new history starts again at offset 1, shown after the marker.
        await page.wait_for_function(
            """() => {
                const rows = [...document.querySelectorAll('#rows tr')];
                const marker = rows.findIndex(r => r.dataset.kind === 'unrecovered');
                const fresh = rows.findIndex(r => r.classList.contains('event')
                    && r.dataset.channel === 'demo:feed' && r.dataset.offset === '1');
                return marker >= 0 && fresh >= 0 && fresh < marker
                    && rows.slice(marker).filter(r => r.classList.contains('event')
                        && r.dataset.channel === 'demo:feed').length === 2;
            }"""
        )
        text = (
            await page.text_content('tr.marker[data-kind="unrecovered"][data-channel="demo:feed"]')
            or ""
        )
        assert "could not recover" in text
        await _leave(page)


async def test_unauthorized_close_asks_the_token_provider(page: Page) -> None:
    """A 4401 makes the page ask its token provider, which waits for a token from the user."""
    async with serve(CONSOLE) as server:
        await page.goto(f"{server.http_url}/console#token=not-a-valid-token&{FAST}")
        await _wait_state(page, "waiting-token")
        prompt = page.locator("#token-prompt")
        assert await prompt.is_visible()
        assert "4401" in (await prompt.text_content() or "")
        assert "4401" in (await page.text_content("#info-close") or "")
        assert await page.text_content("#connect") == "Use token"

        await page.fill("#token", token("alice", ("demo:*",)))
        await page.click("#connect")
        await _wait_state(page, "connected")
        assert await page.text_content("#info-user") == "alice"
        assert not await prompt.is_visible()
        client_state = await page.evaluate("window.tidingsConsole.client.state")
        assert client_state == "connected"
        await _leave(page)


async def test_forbidden_close_stops_reconnection(page: Page) -> None:
    """After a 4403 (disconnected by the application) the page stays closed."""
    async with serve(CONSOLE) as server:
        await _open_console(page, server.http_url, token("alice", ("demo:*",)), FAST)
        status, _ = await api(
            server, "POST", "/api/disconnect", {"user_id": "alice", "reason": "account suspended"}
        )
        assert status == 200
        await _wait_state(page, "closed")
        assert "4403" in (await page.text_content("#state-text") or "")
        assert "not reconnecting" in (
            await page.text_content('tr.marker[data-kind="closed"]') or ""
        )
        assert await page.evaluate("window.tidingsConsole.client.state") == "closed"
        # "closed" is the client's terminal state: no reconnect timer is left behind.
        assert await server.gateway.wait_idle(5.0)
        assert await page.evaluate("window.tidingsConsole.client.state") == "closed"
        await _leave(page)


async def test_plain_page_iterates_events_and_refreshes_its_token(page: Page) -> None:
    """A page importing /client/tidings.js iterates events and refreshes before expiry."""
    async with serve({**CONSOLE, "auth": {"leeway": 0}}) as server:
        tokens = [token("alice", ("demo:*",), ttl=2), token("alice", ("demo:*",), ttl=3600)]
        await page.expose_function("nextToken", lambda: tokens.pop(0))
        await page.set_content(f"""<!doctype html><meta charset="utf-8">
            <script type="module">
              import {{ connect }} from "{server.http_url}/client/tidings.js";
              window.seen = [];
              window.refreshed = 0;
              const client = window.client = connect("{server.ws_url}",
                {{ tokenProvider: () => window.nextToken() }});
              client.on("message", (m) => {{ if (m.type === "refreshed") window.refreshed += 1; }});
              const sub = client.subscribe("demo:plain");
              for await (const item of sub) window.seen.push([item.kind, item.offset]);
            </script>""")
        await page.wait_for_function(
            "window.client && window.client.subscription('demo:plain')?.state === 'subscribed'"
        )
        first_connection = await page.evaluate("window.client.connectionId")
        await _publish_many(server, "demo:plain", 2)
        await page.wait_for_function("window.seen.length === 2")
        assert await page.evaluate("window.seen") == [["event", 1], ["event", 2]]
        # The 2 s token is refreshed about a second before it expires, on the same connection.
        await page.wait_for_function("window.refreshed === 1")
        assert tokens == []
        assert await page.evaluate("window.client.connectionId") == first_connection
        expires = await page.evaluate("window.client.expiresAt.getTime() - Date.now()")
        assert expires > 3000_000
        await _leave(page)


async def test_console_negotiates_deflate_and_shows_events(page: Page) -> None:
    """With ``server.permessage_deflate`` on, Chromium negotiates the extension by itself
    and the console shows a compressed event."""
    async with serve({**CONSOLE, "server": {"permessage_deflate": True}}) as server:
        await _open_console(
            page, server.http_url, token("alice", ("demo:*",)), "channels=demo:lobby"
        )
        await _wait_live(page, "demo:lobby")
        peers = list(server.gateway.hub.connections())
        assert peers and all(getattr(peer, "deflate", False) for peer in peers)
        content = "compressed " * 40
        await publish(
            server,
            "demo:lobby",
            "chat_message",
            {"conversation_id": "lobby", "sender_id": "bob", "content": content},
        )
        await _wait_event(page, "demo:lobby", 1)
        row = page.locator('tr.event[data-channel="demo:lobby"][data-offset="1"]')
        assert content.strip() in (await row.locator("td.data").text_content() or "")


async def test_tidings_js_falls_back_to_sse_when_websockets_are_blocked(page: Page) -> None:
    """With WebSocket blocked in the page, tidings.js connects over SSE by itself: events
    arrive, subscribe goes by POST, and after the stream ends the missed events recover."""
    async with serve(CONSOLE) as server:
        tok = token("alice", ("demo:*",))
        await page.set_content(f"""<!doctype html><meta charset="utf-8">
            <script>window.WebSocket = function () {{ throw new Error("blocked"); }};</script>
            <script type="module">
              import {{ connect }} from "{server.http_url}/client/tidings.js";
              window.seen = [];
              const client = window.client = connect("{server.ws_url}",
                {{ token: "{tok}", initialDelay: 50, maxDelay: 200 }});
              const sub = client.subscribe("demo:sse");
              for await (const item of sub) window.seen.push([item.kind, item.offset]);
            </script>""")
        await page.wait_for_function(
            "window.client && window.client.subscription('demo:sse')?.state === 'subscribed'"
        )
        assert await page.evaluate("window.client.transport") == "sse"
        await _publish_many(server, "demo:sse", 2)
        await page.wait_for_function("window.seen.length === 2")
        first = await page.evaluate("window.client.connectionId")
        peer = server.gateway.hub.peer(first)
        assert peer is not None
        peer.close(CloseCode.GOING_AWAY, "test: stream ended")
        await _publish_many(server, "demo:sse", 3)  # missed while reconnecting
        await page.wait_for_function("window.seen.length === 5")
        assert await page.evaluate("window.seen") == [["event", n] for n in range(1, 6)]
        assert await page.evaluate("window.client.connectionId") != first
        await _leave(page)
