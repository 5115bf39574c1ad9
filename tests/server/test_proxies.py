"""deploy/nginx/tidings.conf and deploy/haproxy/tidings.cfg, run for real in front of a
real ``tidings serve``: a WebSocket session, a publish and a drain through each proxy,
with the server API on the internal listener (as every configuration in deploy/ has it)
and on the public port.

The proxies run from a temporary copy of the shipped file with only the addresses
replaced (free ports instead of 8080, 8000 and HAProxy's check port 9000), as the test's
own processes, stopped by PID. nginx and HAProxy are Debian packages; ``.ci/run``
installs them when missing, and these tests skip without them unless
``TIDINGS_REQUIRE_PROXIES=1``.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from deploy_support import (
    REPO,
    TidingsProcess,
    config_text,
    free_port,
    require_binary,
    tidings_process,
    until,
    wait_for_port,
)
from helpers import API_KEY, SECRET, TIMEOUT, Client, token
from redis_support import REDIS_URL
from tidings.config import ServerSettings, load_settings

pytestmark = pytest.mark.timeout(60)

NGINX_CONF = REPO / "deploy" / "nginx" / "tidings.conf"
HAPROXY_CFG = REPO / "deploy" / "haproxy" / "tidings.cfg"
SWITCH = "TIDINGS_REQUIRE_PROXIES"
CHANNEL = "news:proxied"


def _replace(text: str, old: str, new: str) -> str:
    """``text`` with ``old`` (which must be there) replaced by ``new``."""
    assert old in text, f"{old!r} is not in the shipped configuration"
    return text.replace(old, new)


@contextlib.contextmanager
def _process(args: list[str], log: Path) -> Any:
    """A proxy process of this test, killed by its PID on exit."""
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.asynccontextmanager
async def nginx(
    tmp_path: Path, upstream: int, internal: int | None, *, more_upstreams: Sequence[int] = ()
) -> AsyncIterator[tuple[int, Path]]:
    """nginx with deploy/nginx/tidings.conf in its http block (the same file whether or
    not Tidings has an ``internal`` port), its upstream's server line repeated for
    ``more_upstreams`` as docs/deployment.md says; yields its port and the access log."""
    binary = require_binary("nginx", SWITCH)
    port = free_port()
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    snippet = _replace(NGINX_CONF.read_text(), "listen 8080;", f"listen 127.0.0.1:{port};")
    line = re.search(r"^ *server 127\.0\.0\.1:8000 .*$", snippet, re.M)
    assert line, "no upstream server line"
    snippet = snippet.replace(
        line.group(0),
        "\n".join(
            line.group(0).replace(":8000 ", f":{node} ") for node in (upstream, *more_upstreams)
        ),
    )
    snippet = _replace(snippet, "/var/log/nginx/", f"{prefix}/")
    (prefix / "tidings.conf").write_text(snippet)
    # As root, nginx's workers would switch to "nobody", who cannot enter pytest's tmp.
    user = "user root;\n" if os.geteuid() == 0 else ""
    (prefix / "nginx.conf").write_text(
        f"{user}worker_processes 1;\nerror_log {prefix}/error.log info;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        + "".join(
            f"    {kind}_temp_path {prefix}/{kind}_temp;\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        + f"    access_log {prefix}/default-access.log;\n"
        f"    include {prefix}/tidings.conf;\n}}\n"
    )
    args = [
        binary,
        "-p",
        str(prefix),
        "-e",
        str(prefix / "error.log"),
        "-c",
        str(prefix / "nginx.conf"),
        "-g",
        f"daemon off; pid {prefix}/nginx.pid;",
    ]
    with _process(args, prefix / "stdout.log") as proc:
        try:
            await wait_for_port(port)
        except AssertionError:
            raise AssertionError((prefix / "stdout.log").read_text()) from None
        assert proc.poll() is None
        yield port, prefix / "tidings-access.log"


@contextlib.asynccontextmanager
async def haproxy(
    tmp_path: Path, upstream: int, internal: int | None
) -> AsyncIterator[tuple[int, Path]]:
    """HAProxy with deploy/haproxy/tidings.cfg, checking readiness on Tidings'
    ``internal`` port (without one, with "port 9000" dropped as the file says); yields
    its port and its output, where its access lines go."""
    binary = require_binary("haproxy", SWITCH)
    port = free_port()
    config = _replace(HAPROXY_CFG.read_text(), "bind :8080", f"bind 127.0.0.1:{port}")
    config = _replace(config, "127.0.0.1:8000", f"127.0.0.1:{upstream}")
    config = _replace(
        config, "check port 9000 ", "check " if internal is None else f"check port {internal} "
    )
    path = tmp_path / "haproxy.cfg"
    path.write_text(config)
    check = subprocess.run(
        [binary, "-c", "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    with _process([binary, "-db", "-f", str(path)], tmp_path / "haproxy.log"):
        await wait_for_port(port)
        yield port, tmp_path / "haproxy.log"


Proxy = Callable[[Path, int, int | None], contextlib.AbstractAsyncContextManager[tuple[int, Path]]]
PROXIES = [pytest.param(nginx, id="nginx"), pytest.param(haproxy, id="haproxy")]
#: Whether Tidings has an internal listener: the deploy/ configurations' shape first.
SHAPES = [pytest.param(True, id="internal-port"), pytest.param(False, id="one-port")]


@contextlib.asynccontextmanager
async def behind(
    proxy: Proxy, tmp_path: Path, with_internal: bool = True
) -> AsyncIterator[tuple[TidingsProcess, str, str, Path]]:
    """A Tidings process with ``proxy`` in front; yields it, the proxy's base URL, the
    server API's base URL (the internal port, or the proxy without one) and the proxy's
    access log, once a request through the proxy reaches Tidings."""
    port = free_port()
    internal = free_port() if with_internal else None
    async with (
        tidings_process(tmp_path, config_text(port, internal_port=internal), port=port) as tidings,
        proxy(tmp_path, port, internal) as (proxy_port, access_log),
    ):
        base = f"http://127.0.0.1:{proxy_port}"
        api_base = base if internal is None else f"http://127.0.0.1:{internal}"

        async def through() -> bool:
            # HAProxy forwards once its first health check has passed.
            with contextlib.suppress(aiohttp.ClientError):
                async with (
                    aiohttp.ClientSession() as http,
                    http.get(
                        base + "/client/tidings.js", timeout=aiohttp.ClientTimeout(total=2)
                    ) as answer,
                ):
                    return answer.status == 200
            return False

        await until(through, 15, "a request through the proxy")
        yield tidings, base, api_base, access_log


@contextlib.asynccontextmanager
async def ws_client(base: str, tok: str) -> AsyncIterator[Client]:
    url = base.replace("http://", "ws://") + f"/ws?token={tok}"
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=TIMEOUT)) as ws,
    ):
        client = Client(ws)
        hello = await client.recv()
        assert hello["type"] == "connected", hello
        yield client


async def _publish(base: str, data: dict[str, Any]) -> tuple[int, Any]:
    body = {"channel": CHANNEL, "type": "notification", "data": data}
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            base + "/api/publish", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
        ) as answer,
    ):
        return answer.status, await answer.json()


@pytest.mark.parametrize("with_internal", SHAPES)
@pytest.mark.parametrize("proxy", PROXIES)
async def test_session_and_publish_through_the_proxy(
    proxy: Proxy, with_internal: bool, tmp_path: Path
) -> None:
    """Through the proxy a client connects and subscribes, a publish (to the internal
    port when there is one, where the proxy answers 404) is accepted, and the event
    reaches the client; the proxy's access log names the requests without the token."""
    async with behind(proxy, tmp_path, with_internal) as (_, base, api_base, access_log):
        tok = token("proxied-user", ("news:*",))
        async with ws_client(base, tok) as client:
            reply = await client.subscribe(CHANNEL)
            assert reply["type"] == "subscribed", reply
            if with_internal:
                status, _ = await _publish(base, {"message": "public", "level": "info"})
                assert status == 404  # the server API does not face the proxy
            status, answer = await _publish(api_base, {"message": "through", "level": "info"})
            assert status == 200, answer
            event = await client.recv()
            assert event["type"] == "notification"
            assert event["data"]["message"] == "through"
            assert event["offset"] == answer["results"][0]["offset"]

        # A line is written when its request ends: the WebSocket's once it closed.
        async def logged() -> bool:
            text = access_log.read_text()
            return "/ws" in text and "/api/publish" in text

        await until(logged, 10, "the proxy's access lines")
        text = access_log.read_text()
        assert tok not in text and "token=" not in text, text


@pytest.mark.parametrize("with_internal", SHAPES)
@pytest.mark.parametrize("proxy", PROXIES)
async def test_drain_reaches_the_client_through_the_proxy(
    proxy: Proxy, with_internal: bool, tmp_path: Path
) -> None:
    """SIGTERM to Tidings: the client behind the proxy reads close 1001, and Tidings
    exits 0."""
    async with (
        behind(proxy, tmp_path, with_internal) as (tidings, base, _, _),
        ws_client(base, token("drained-user", ("news:*",))) as client,
    ):
        await client.subscribe(CHANNEL)
        tidings.sigterm()
        assert await client.expect_close() == 1001
        assert await tidings.terminate() == 0


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m|h)?", value)
    assert match, value
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]
    return int(match.group(1)) * scale


def test_proxy_timeouts_are_above_the_heartbeat() -> None:
    """The idle timeouts that apply to an open WebSocket (nginx's read and send
    timeouts, HAProxy's tunnel timeout) exceed heartbeat_interval + heartbeat_timeout."""
    defaults = ServerSettings()
    floor = defaults.heartbeat_interval + defaults.heartbeat_timeout
    nginx_text = NGINX_CONF.read_text()
    for key in ("proxy_read_timeout", "proxy_send_timeout"):
        match = re.search(rf"^\s*{key}\s+(\S+);", nginx_text, re.M)
        assert match, key
        assert _seconds(match.group(1)) > floor, key
    assert re.search(r"^\s*proxy_http_version 1\.1;", nginx_text, re.M)
    assert re.search(r"^\s*proxy_buffering off;", nginx_text, re.M)
    haproxy_text = HAPROXY_CFG.read_text()
    match = re.search(r"^\s*timeout tunnel\s+(\S+)", haproxy_text, re.M)
    assert match and _seconds(match.group(1)) > floor
    assert (
        f"127.0.0.1:{defaults.port}" in nginx_text and f"127.0.0.1:{defaults.port}" in haproxy_text
    )


def test_haproxy_checks_the_internal_port_of_the_shipped_configurations() -> None:
    """HAProxy's readiness check goes to the internal port that deploy/tidings.toml and
    the image's configuration set, and its server line to their public port."""
    haproxy_text = HAPROXY_CFG.read_text()
    check = re.search(r"^\s*default-server check port (\d+) ", haproxy_text, re.M)
    server = re.search(r"^\s*server \S+ 127\.0\.0\.1:(\d+)$", haproxy_text, re.M)
    assert check and server
    for config in (REPO / "deploy" / "tidings.toml", REPO / "deploy" / "docker" / "tidings.toml"):
        settings = load_settings(config, environ={"TIDINGS_AUTH__SECRET": SECRET})
        assert settings.server.internal_port == int(check.group(1)), config
        assert settings.server.port == int(server.group(1)), config


async def _connections(internal: int) -> float:
    """A node's tidings_connections gauge, read from its internal /metrics."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{internal}/metrics") as answer,
    ):
        text = await answer.text()
    match = re.search(r"^tidings_connections (\S+)$", text, re.M)
    assert match, text
    return float(match.group(1))


async def test_two_redis_nodes_behind_nginx_a_drained_client_recovers_on_the_other(
    redis_prefix: str, tmp_path: Path
) -> None:
    """docs/deployment.md's shape: two nodes on Redis behind the shipped nginx file, the
    API on their internal ports. A client gets an event published on the other node;
    its node drains (1001); it reconnects through nginx, lands on the other node, and
    recovers the event published while it was away."""
    ports = [free_port() for _ in range(4)]
    nodes = {}
    async with contextlib.AsyncExitStack() as stack:
        for port, internal in (ports[0:2], ports[2:4]):
            config = (
                config_text(port, internal_port=internal, broker=REDIS_URL)
                .replace("[broker]\n", f'[broker]\nprefix = "{redis_prefix}"\n')
                .replace("shutdown_timeout = 5\n", "shutdown_timeout = 5\ndrain_delay = 0.5\n")
            )
            nodes[internal] = await stack.enter_async_context(
                tidings_process(tmp_path, config, port=port)
            )
        proxy_port, _ = await stack.enter_async_context(
            nginx(tmp_path, ports[0], None, more_upstreams=[ports[2]])
        )
        base = f"http://127.0.0.1:{proxy_port}"
        tok = token("roaming-user", ("news:*",))
        async with ws_client(base, tok) as client:
            reply = await client.subscribe(CHANNEL)
            assert reply["type"] == "subscribed", reply
            epoch = reply["data"]["epoch"]
            serving = [i for i in nodes if await _connections(i) == 1]
            assert len(serving) == 1, serving
            (other,) = set(nodes) - set(serving)
            status, _ = await _publish(
                f"http://127.0.0.1:{other}", {"message": "before", "level": "info"}
            )
            assert status == 200
            seen = await client.recv()
            assert seen["data"]["message"] == "before"
            nodes[serving[0]].sigterm()
            assert await client.expect_close(timeout=10) == 1001
        status, missed = await _publish(
            f"http://127.0.0.1:{other}", {"message": "while away", "level": "info"}
        )
        assert status == 200
        async with ws_client(base, tok) as client:
            reply = await client.subscribe(
                CHANNEL, recover={"offset": seen["offset"], "epoch": epoch}
            )
            assert reply["data"]["recovered"] is True, reply
            event = await client.recv()
            assert event["data"]["message"] == "while away"
            assert event["offset"] == missed["results"][0]["offset"]
            assert await _connections(other) == 1
        assert await nodes[serving[0]].terminate() == 0
        assert await nodes[other].terminate() == 0
