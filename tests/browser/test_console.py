"""The browser client and console routes: content, types, caching, configuration, switch;
and the console's layout and reconnection in Chromium at desktop and phone widths."""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
import pytest_asyncio

from browsers import ARTIFACTS, chromium
from helpers import API_KEY, connect, publish, scaled, serve, token
from paths import REPO
from tidings.config import load_settings
from tidings.console import client_script
from tidings.server import prepare_dev, running

CLIENT_SOURCE = REPO / "clients" / "js" / "tidings.js"
STATIC = REPO / "src" / "tidings" / "static"
CONSOLE_ON = {"console": {"enabled": "on"}}
#: What a newcomer runs (`make run`): development mode, the publish form pre-filled.
DEV = {"server": {"mode": "development"}}
WAIT_MS = int(scaled(8.0) * 1000)
#: Desktop and phone (an iPhone 12-15 is 390 px wide).
VIEWPORTS = [pytest.param((1280, 800), id="1280"), pytest.param((390, 844), id="390")]

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page


async def _get(
    url: str, headers: dict[str, str] | None = None
) -> tuple[int, Mapping[str, str], bytes]:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        return response.status, response.headers, await response.read()


def _page_config(html: bytes) -> dict[str, Any]:
    pattern = rb'<script type="application/json" id="tidings-console-config">(.*?)</script>'
    match = re.search(pattern, html, re.S)
    assert match is not None, html[:500]
    config: dict[str, Any] = json.loads(match.group(1))
    return config


def test_packaged_client_is_identical_to_the_repository_copy() -> None:
    """The copy shipped in the package is byte-for-byte clients/js/tidings.js (no drift)."""
    assert client_script() == CLIENT_SOURCE.read_bytes(), (
        "src/tidings/static/tidings.js differs from clients/js/tidings.js: "
        "cp clients/js/tidings.js src/tidings/static/tidings.js"
    )


async def test_client_script_is_served_as_javascript() -> None:
    """GET /client/tidings.js answers the packaged module with a JavaScript type and CORS."""
    async with serve(CONSOLE_ON) as server:
        status, headers, body = await _get(server.http_url + "/client/tidings.js")
    assert status == 200
    assert headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert body == CLIENT_SOURCE.read_bytes()


async def test_client_script_revalidates_with_its_etag() -> None:
    """A request with the current ETag gets 304 and no body; a stale one gets the file."""
    async with serve(CONSOLE_ON) as server:
        url = server.http_url + "/client/tidings.js"
        _, headers, _ = await _get(url)
        etag = headers["ETag"]
        status, _, body = await _get(url, {"If-None-Match": etag})
        stale, _, full = await _get(url, {"If-None-Match": '"other"'})
    assert (status, body) == (304, b"")
    assert stale == 200 and full == CLIENT_SOURCE.read_bytes()


async def test_console_page_and_assets() -> None:
    """The console page, its script and its style are served with fitting types and headers."""
    async with serve(CONSOLE_ON) as server:
        status, headers, html = await _get(server.http_url + "/console")
        js_status, js_headers, script = await _get(server.http_url + "/console/console.js")
        css_status, css_headers, style = await _get(server.http_url + "/console/console.css")
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Cache-Control"] == "no-store"
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert headers["Referrer-Policy"] == "no-referrer"
    assert b'src="console/console.js"' in html
    assert js_status == 200 and js_headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert script == (STATIC / "console.js").read_bytes()
    assert b'from "../client/tidings.js"' in script
    assert css_status == 200 and css_headers["Content-Type"] == "text/css; charset=utf-8"
    assert style == (STATIC / "console.css").read_bytes()


async def test_console_config_in_production_has_no_api_key() -> None:
    """Outside development mode the page names the WebSocket path and carries no API key."""
    async with serve({**CONSOLE_ON, "server": {"path": "/realtime"}}) as server:
        _, _, html = await _get(server.http_url + "/console")
    config = _page_config(html)
    assert config["wsPath"] == "/realtime"
    assert config["devMode"] is False
    assert "devApiKey" not in config
    assert API_KEY.encode() not in html


async def test_console_in_development_mode_prefills_the_api_key() -> None:
    """In development mode the console is on by default and carries the generated API key."""
    async with serve({"server": {"mode": "development"}}) as server:
        status, _, html = await _get(server.http_url + "/console")
        client_status, _, _ = await _get(server.http_url + "/client/tidings.js")
    assert status == 200 and client_status == 200
    config = _page_config(html)
    assert config["devMode"] is True
    assert config["devApiKey"] == API_KEY


async def test_unconfigured_server_serves_the_console_with_its_generated_key() -> None:
    """`tidings serve` with no configuration (prepare_dev) keeps development mode: the
    console is on and pre-filled with the generated API key."""
    settings, dev = prepare_dev(load_settings(None, {"server": {"port": 0}}, environ={}))
    assert dev is not None
    assert settings.dev_mode and settings.console_enabled
    async with running(settings) as server:
        status, _, html = await _get(server.http_url + "/console")
    assert status == 200
    assert _page_config(html)["devApiKey"] == dev.api_key


async def test_console_config_cannot_break_out_of_its_script_element() -> None:
    """A path holding "</script>" is escaped inside the page's JSON configuration."""
    async with serve({**CONSOLE_ON, "server": {"path": "/ws</script><b>&"}}) as server:
        _, _, html = await _get(server.http_url + "/console")
    assert b"</script><b>" not in html
    assert _page_config(html)["wsPath"] == "/ws</script><b>&"


@pytest.mark.parametrize("setting", ["auto", "off"])
async def test_console_is_off_outside_development_mode_unless_switched_on(setting: str) -> None:
    """In production mode, with the console auto or off, the console is 404 while the
    client script stays served (applications load it from here)."""
    async with serve({"console": {"enabled": setting}}) as server:
        console, _, _ = await _get(server.http_url + "/console")
        client, _, _ = await _get(server.http_url + "/client/tidings.js")
    assert (console, client) == (404, 200)


async def test_console_off_wins_over_development_mode() -> None:
    """console.enabled = off hides the console even in development mode."""
    async with serve({"server": {"mode": "development"}, "console": {"enabled": "off"}}) as server:
        status, _, _ = await _get(server.http_url + "/console")
    assert status == 404


async def test_head_requests_are_answered() -> None:
    """HEAD on the client script answers 200 with its length and no body."""
    async with (
        serve(CONSOLE_ON) as server,
        aiohttp.ClientSession() as session,
        session.head(server.http_url + "/client/tidings.js") as response,
    ):
        assert response.status == 200
        assert int(response.headers["Content-Length"]) == len(CLIENT_SOURCE.read_bytes())
        assert await response.read() == b""


async def test_favicon_is_served_and_inlined_in_the_console() -> None:
    """/favicon.ico answers the SVG icon, and the console page links the same icon inline."""
    icon = (STATIC / "favicon.svg").read_bytes()
    async with serve(CONSOLE_ON) as server:
        status, headers, body = await _get(server.http_url + "/favicon.ico")
        _, _, html = await _get(server.http_url + "/console")
    assert status == 200
    assert headers["Content-Type"] == "image/svg+xml; charset=utf-8"
    assert headers["Content-Security-Policy"] == "default-src 'none'"
    assert body == icon and body.startswith(b"<svg ")
    link = rb'<link rel="icon" type="image/svg\+xml" href="data:image/svg\+xml,([^"]*)">'
    match = re.search(link, html)
    assert match is not None
    assert urllib.parse.unquote(match.group(1).decode()) == icon.decode().strip()


# -- in Chromium ---------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as launched:
        yield launched


async def _console(
    browser: Browser, viewport: tuple[int, int], url: str, failures: list[str]
) -> Page:
    """A fresh page at ``viewport`` showing the console at ``url``, connected."""
    width, height = viewport
    context = await browser.new_context(viewport={"width": width, "height": height})
    page = await context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.on("pageerror", lambda error: failures.append(f"page error: {error}"))
    page.on(
        "response",
        lambda response: (
            failures.append(f"{response.status} {response.url}") if response.status >= 400 else None
        ),
    )
    await page.goto(url)
    await page.wait_for_selector('#state[data-state="connected"]')
    return page


async def _wait_live(page: Page, channel: str) -> None:
    await page.wait_for_selector(
        f'#subs li[data-channel="{channel}"] .sub-state[data-state="subscribed"]'
    )


async def _offsets(page: Page, channel: str) -> list[int]:
    """Offsets shown for ``channel``, oldest first (the table lists newest first)."""
    shown: list[str] = await page.eval_on_selector_all(
        f'tr.event[data-channel="{channel}"]', "rows => rows.map(r => r.dataset.offset)"
    )
    return [int(offset) for offset in reversed(shown)]


#: The console's four panels: name -> selector.
PANELS = {
    "connection": "section[aria-labelledby=h-connection]",
    "subscriptions": "section[aria-labelledby=h-subs]",
    "publish": "section[aria-labelledby=h-publish]",
    "events": "section[aria-labelledby=h-events]",
}
BUTTONS = [
    "#connect",
    "#disconnect",
    "#ping",
    "#subscribe-form button",
    "#publish",
    "#clear",
    '#subs li[data-channel="demo:feed"] .sub-x',
]

_GEOMETRY = """(panels) => {
  const rect = (el) => { const r = el.getBoundingClientRect();
    return {left: r.left, top: r.top + scrollY, right: r.right, bottom: r.bottom + scrollY}; };
  const out = {};
  for (const [name, selector] of Object.entries(panels)) {
    out[name] = rect(document.querySelector(selector));
  }
  return {panels: out, viewport: innerWidth, page: document.documentElement.scrollWidth};
}"""

#: True when the element's centre, scrolled into view, hits the element itself.
_HIT = """(el) => {
  el.scrollIntoView({block: "center", inline: "center"});
  const r = el.getBoundingClientRect();
  const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
  return hit !== null && (hit === el || el.contains(hit));
}"""


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("viewport", VIEWPORTS)
async def test_console_layout_fits_the_width(browser: Browser, viewport: tuple[int, int]) -> None:
    """At desktop and phone width the panels do not overlap or stick out, every button is
    visible and clickable, and the Type field shows "notification" whole."""
    failures: list[str] = []
    async with serve(DEV) as server:
        tok = token("alice", ("demo:*",))
        page = await _console(
            browser, viewport, f"{server.http_url}/console#token={tok}&channels=demo:feed", failures
        )
        await _wait_live(page, "demo:feed")
        await _wait_live(page, "user:alice")

        geometry = await page.evaluate(_GEOMETRY, PANELS)
        boxes = geometry["panels"]
        assert geometry["page"] <= geometry["viewport"], "the page scrolls sideways"
        for name, box in boxes.items():
            assert box["right"] > box["left"] and box["bottom"] > box["top"], name
            assert box["left"] >= 0 and box["right"] <= geometry["viewport"], (name, box)
        names = list(boxes)
        for i, first in enumerate(names):
            for second in names[i + 1 :]:
                a, b = boxes[first], boxes[second]
                apart = (
                    a["right"] <= b["left"]
                    or b["right"] <= a["left"]
                    or a["bottom"] <= b["top"]
                    or b["bottom"] <= a["top"]
                )
                assert apart, f"{first} {a} overlaps {second} {b}"

        for name, selector in PANELS.items():
            panel = page.locator(selector)
            assert await panel.is_visible(), name
            assert await panel.locator("h2").evaluate(_HIT), f"{name}: its title is covered"
        assert await page.locator("#subs li").count() == 2
        # The top bar and the events table fit: nothing is cut off at the right.
        for selector in (".topbar", ".table-wrap"):
            width, room = await page.eval_on_selector(
                selector, "el => [el.scrollWidth, el.clientWidth]"
            )
            assert width <= room, f"{selector} overflows ({width} > {room} px)"

        for selector in BUTTONS:
            button = page.locator(selector)
            assert await button.is_visible(), selector
            assert await button.is_enabled(), selector
            assert await button.evaluate(_HIT), f"{selector} is covered"
            # Playwright's actionability checks: visible, stable, enabled, receives events.
            await button.click(trial=True)

        for value in ("notification", "status_update", "chat_message"):
            await page.fill("#pub-type", value)
            width, room = await page.eval_on_selector(
                "#pub-type", "el => [el.scrollWidth, el.clientWidth]"
            )
            assert width <= room, f"the Type field cuts {value!r} ({width} > {room} px)"

        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(
            path=str(ARTIFACTS / f"console-layout-{viewport[0]}.png"),
            full_page=True,
            animations="disabled",
        )
        await page.context.close()
    assert failures == []


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("viewport", VIEWPORTS)
async def test_disconnect_then_connect_shows_the_recovery(
    browser: Browser, viewport: tuple[int, int]
) -> None:
    """Disconnect, a publish, then Connect: the console recovers the missed events, in
    order, and marks each channel as recovered (no silent jump)."""
    failures: list[str] = []
    async with serve(DEV) as server:
        tok = token("alice", ("demo:*",))
        page = await _console(
            browser, viewport, f"{server.http_url}/console#token={tok}&channels=demo:feed", failures
        )
        await _wait_live(page, "demo:feed")
        await _wait_live(page, "user:alice")
        # The first connection's reply only confirms the personal channel: no marker.
        assert await page.locator("tr.marker[data-kind=recovered]").count() == 0

        await page.fill("#pub-channel", "demo:feed")
        await page.click("#publish")
        await page.wait_for_selector(
            'tr.event[data-channel="demo:feed"][data-offset="1"]', state="attached"
        )
        await page.wait_for_selector('#subs li[data-channel="demo:feed"] .sub-meta:text("@1")')

        await page.click("#disconnect")
        await page.wait_for_selector('#state[data-state="closed"]')
        await page.wait_for_selector(
            '#subs li[data-channel="demo:feed"] .sub-state[data-state="stopped"]'
        )
        for n in (2, 3):
            await publish(
                server, "demo:feed", "notification", {"message": f"missed {n}", "level": "info"}
            )
        await publish(
            server, "user:alice", "notification", {"message": "missed too", "level": "info"}
        )

        await page.click("#connect")
        await page.wait_for_selector('#state[data-state="connected"]')
        feed = page.locator('tr.marker[data-kind="recovered"][data-channel="demo:feed"]')
        await feed.wait_for(state="attached")
        assert "2 missed events replayed" in (await feed.text_content() or "")
        personal = page.locator('tr.marker[data-kind="recovered"][data-channel="user:alice"]')
        await personal.wait_for(state="attached")
        assert "1 missed event replayed" in (await personal.text_content() or "")
        await page.wait_for_selector(
            'tr.event[data-channel="demo:feed"][data-offset="3"]', state="attached"
        )
        await page.wait_for_selector(
            'tr.event[data-channel="user:alice"][data-offset="1"]', state="attached"
        )
        await _wait_live(page, "demo:feed")
        assert await _offsets(page, "demo:feed") == [1, 2, 3]
        assert await page.text_content('#subs li[data-channel="demo:feed"] .sub-meta') == "@3"
        assert await page.locator("tr.marker[data-kind=unrecovered]").count() == 0

        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(
            path=str(ARTIFACTS / f"console-recovery-{viewport[0]}.png"),
            full_page=True,
            animations="disabled",
        )
        await page.context.close()
    assert failures == []


@pytest.mark.asyncio(loop_scope="module")
async def test_console_shows_personal_events_without_waiting_for_the_hold(browser: Browser) -> None:
    """With a connect-time hold of the personal channel far longer than the test waits,
    an event published to it as soon as the console is connected still shows: tidings.js
    sends its first command at once (the README promises the console never waits)."""
    failures: list[str] = []
    async with serve({**DEV, "auth": {"personal_channel_hold": 30}}) as server:
        tok = token("alice", ("demo:*",))
        page = await _console(
            browser, (1280, 800), f"{server.http_url}/console#token={tok}", failures
        )
        sent = await publish(
            server, "user:alice", "notification", {"message": "right away", "level": "info"}
        )
        row = page.locator('tr.event[data-channel="user:alice"][data-offset="1"]')
        await row.wait_for(state="attached")
        assert "right away" in (await row.text_content() or ""), sent
        await page.context.close()
    assert failures == []


@pytest.mark.asyncio(loop_scope="module")
async def test_console_shows_joins_and_leaves(browser: Browser) -> None:
    """Another user's join and leave in a presence namespace show as markers."""
    failures: list[str] = []
    settings = {
        **DEV,
        "namespaces": {"room": {"rule": "public", "presence_events": True, "presence_ttl": 0.2}},
    }
    async with serve(settings) as server:
        tok = token("alice")
        page = await _console(
            browser,
            (1280, 800),
            f"{server.http_url}/console#token={tok}&channels=room:lobby",
            failures,
        )
        await _wait_live(page, "room:lobby")
        async with connect(server, token("bob")) as bob:
            await bob.subscribe("room:lobby")
            joined = page.locator(
                'tr.marker[data-kind="join"][data-channel="room:lobby"]', has_text="bob"
            )
            await joined.wait_for(state="attached")
        left = page.locator(
            'tr.marker[data-kind="leave"][data-channel="room:lobby"]', has_text="bob"
        )
        await left.wait_for(state="attached")
        assert await page.locator('tr.event[data-channel="room:lobby"]').count() == 0
        await page.context.close()
    assert failures == []
