"""Several gateway nodes joined by Redis, end to end; and ``--workers`` processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from helpers import API_KEY, SECRET, api, connect, line_starting, publish, token
from redis_support import REDIS_URL, Follower, eventually, redis_node
from timeouts import scaled

NEWS = ("news:*", "room:*")


async def test_events_cross_nodes_once_and_in_order(redis_prefix: str) -> None:
    """Subscribers on two nodes receive every event published on a third, once, in order."""
    async with (
        redis_node(REDIS_URL, redis_prefix) as a,
        redis_node(REDIS_URL, redis_prefix) as b,
        redis_node(REDIS_URL, redis_prefix) as c,
        connect(a, token("u1", NEWS)) as ca,
        connect(b, token("u2", NEWS)) as cb,
    ):
        followers = [Follower(ca, "news:x"), Follower(cb, "news:x")]
        for follower in followers:
            await follower.subscribe()
            follower.start()
        ids = []
        for i in range(20):
            result = await publish(c, "news:x", data={"message": f"m{i}", "level": "info"})
            ids.append(result["id"])
        status, body = await api(
            c,
            "POST",
            "/api/batch",
            {
                "events": [
                    {
                        "channel": "news:x",
                        "type": "notification",
                        "data": {"message": f"b{i}", "level": "info"},
                    }
                    for i in range(20)
                ]
            },
        )
        assert status == 200, body
        ids += [r["id"] for r in body["results"]]
        for follower in followers:
            await follower.until(lambda f=follower: len(f.events) == 40)  # type: ignore[misc]
            follower.check_delivery(ids)
            assert [e["offset"] for e in follower.events] == list(range(1, 41))
            await follower.stop()


async def test_presence_and_channels_span_nodes(redis_prefix: str) -> None:
    """Presence and /api/channels count subscribers on every node."""
    async with (
        redis_node(REDIS_URL, redis_prefix) as a,
        redis_node(REDIS_URL, redis_prefix) as b,
        connect(a, token("u1", NEWS)) as c1,
        connect(b, token("u2", NEWS)) as c2,
        connect(b, token("u1", NEWS)) as c3,
    ):
        for client in (c1, c2, c3):
            assert (await client.subscribe("room:1"))["type"] == "subscribed"

        async def presence_everywhere() -> bool:
            for server in (a, b):
                status, body = await api(server, "GET", "/api/channels/room:1/presence")
                assert status == 200, body
                if body["users"] != [
                    {"user_id": "u1", "connections": 2},
                    {"user_id": "u2", "connections": 1},
                ]:
                    return False
            return True

        await eventually(presence_everywhere)
        status, body = await api(a, "GET", "/api/channels?prefix=room:")
        assert (status, body) == (200, {"channels": [{"channel": "room:1", "subscribers": 3}]})
        status, body = await api(b, "GET", "/api/channels?prefix=user:")
        assert body["channels"] == [
            {"channel": "user:u1", "subscribers": 2},
            {"channel": "user:u2", "subscribers": 1},
        ]
        await c2.send("unsubscribe", {"channel": "room:1"})

        async def u2_left() -> bool:
            _, answer = await api(a, "GET", "/api/channels/room:1/presence")
            return bool(answer["users"] == [{"user_id": "u1", "connections": 2}])

        await eventually(u2_left)


async def test_disconnect_on_one_node_closes_connections_on_all(redis_prefix: str) -> None:
    """POST /api/disconnect on node A closes the user's connections on A and B with 4403."""
    async with (
        redis_node(REDIS_URL, redis_prefix) as a,
        redis_node(REDIS_URL, redis_prefix) as b,
        connect(b, token("bad-user")) as on_b,
        connect(a, token("bad-user")) as on_a,
        connect(b, token("good-user")) as other,
    ):
        status, body = await api(
            a, "POST", "/api/disconnect", {"user_id": "bad-user", "reason": "banned"}
        )
        assert status == 200, body
        assert await on_b.expect_close() == 4403
        assert await on_a.expect_close() == 4403
        await other.send("ping", id="p")
        assert (await other.recv())["type"] == "pong"


async def test_recovery_after_reconnecting_to_another_node(redis_prefix: str) -> None:
    """A client that leaves node A and comes back on node B recovers exactly what it
    missed, then gets live events."""
    async with redis_node(REDIS_URL, redis_prefix) as a, redis_node(REDIS_URL, redis_prefix) as b:
        tok = token("u1", NEWS)
        async with connect(a, tok) as first:
            follower = Follower(first, "news:r")
            reply = await follower.subscribe()
            follower.start()
            early = [(await publish(b, "news:r"))["id"] for _ in range(3)]
            await follower.until(lambda: len(follower.events) == 3)
            await follower.stop()
            epoch, last = reply["data"]["epoch"], follower.last
        missed = [(await publish(a, "news:r"))["id"] for _ in range(4)]
        async with connect(b, tok) as second:
            again = Follower(second, "news:r")
            answer = await again.subscribe({"offset": last, "epoch": epoch})
            assert answer["data"]["recovered"] is True
            assert answer["data"]["epoch"] == epoch
            again.start()
            await again.until(lambda: len(again.events) == 4)
            live = [(await publish(a, "news:r"))["id"]]
            await again.until(lambda: len(again.events) == 5)
            again.check_delivery(missed + live)
            assert [e["offset"] for e in again.events] == [4, 5, 6, 7, 8]
            assert not set(early) & set(again.ids)
            await again.stop()


async def test_readyz_on_every_node(redis_prefix: str) -> None:
    """Every node on a reachable Redis is ready."""
    async with redis_node(REDIS_URL, redis_prefix) as a, redis_node(REDIS_URL, redis_prefix) as b:
        for server in (a, b):
            assert await api(server, "GET", "/readyz", key=None) == (200, {"status": "ready"})


async def test_make_broker_selects_redis_from_the_url(redis_prefix: str) -> None:
    """broker.url = redis://... builds the Redis broker, which serves the API."""
    from helpers import serve
    from tidings.brokers.redis import RedisBroker

    overrides = {"broker": {"url": REDIS_URL, "prefix": redis_prefix}}
    async with serve(overrides) as server:
        assert isinstance(server.gateway.broker, RedisBroker)
        result = await publish(server, "news:m")
        assert result["offset"] == 1


# -- workers ----------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return stat.parent.exists()  # vanished in between: gone


def _start_supervisor(config: Path) -> Any:
    script = (
        "import sys\nfrom tidings.config import load_settings\n"
        "from tidings.workers import run_workers\n"
        "sys.exit(run_workers(load_settings(sys.argv[1], environ={}), 2, "
        "restart_delay=(0.1, 1.0)))\n"
    )
    return asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )


def _write_config(tmp_path: Path, prefix: str) -> Path:
    config = tmp_path / "tidings.toml"
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = 0\nmode = "production"\nshutdown_timeout = 3\n'
        f'[auth]\nsecret = "{SECRET}"\n[api]\nkeys = ["{API_KEY}"]\n'
        f'[broker]\nurl = "{REDIS_URL}"\nprefix = "{prefix}"\n'
        f'[logging]\nlevel = "warning"\n'
    )
    return config


async def _worker_pids(stdout: asyncio.StreamReader) -> dict[str, int]:
    pids = {}
    for _ in range(2):
        line = await line_starting(stdout, "tidings: worker")
        pids[line.split()[2]] = int(line.rsplit(" ", 1)[1].rstrip(")"))
    return pids


async def test_workers_share_a_port_restart_and_drain(redis_prefix: str, tmp_path: Path) -> None:
    """--workers: N processes serve one port; a killed worker is replaced; SIGTERM drains
    all and the supervisor exits 0."""
    proc = await _start_supervisor(_write_config(tmp_path, redis_prefix))
    assert proc.stdout is not None
    try:
        pids = await _worker_pids(proc.stdout)
        url = (await line_starting(proc.stdout, "tidings: listening on")).split()[3]
        assert len(set(pids.values())) == 2
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/readyz") as response:
                assert response.status == 200
            headers = {"Authorization": f"Bearer {API_KEY}"}
            body: dict[str, Any] = {
                "channel": "news:w",
                "type": "notification",
                "data": {"message": "m", "level": "info"},
            }
            async with http.post(f"{url}/api/publish", json=body, headers=headers) as response:
                assert response.status == 200

        victim = pids["1"]
        os.kill(victim, signal.SIGKILL)
        line = await line_starting(proc.stdout, "tidings: worker 1 ready")
        replacement = int(line.rsplit(" ", 1)[1].rstrip(")"))
        assert replacement != victim
        async with aiohttp.ClientSession() as http, http.get(f"{url}/readyz") as response:
            assert response.status == 200

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), scaled(15)) == 0
        assert not _alive(replacement) and not _alive(pids["2"])
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_workers_stop_when_the_supervisor_is_killed(
    redis_prefix: str, tmp_path: Path
) -> None:
    """Workers whose supervisor died by kill -9 drain and exit instead of living on."""
    proc = await _start_supervisor(_write_config(tmp_path, redis_prefix))
    assert proc.stdout is not None
    try:
        pids = await _worker_pids(proc.stdout)
        await line_starting(proc.stdout, "tidings: listening on")
        proc.kill()
        await proc.wait()

        async def all_gone() -> bool:
            return not any(_alive(pid) for pid in pids.values())

        await eventually(all_gone)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
