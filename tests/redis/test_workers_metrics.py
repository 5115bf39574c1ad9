"""``/metrics`` under ``tidings serve --workers 2``: every scrape, whichever worker the
kernel hands it to, describes the whole server; counters survive a worker's restart; the
private metrics directory goes away with the server, even when the supervisor is killed.

Needs the shared Redis (``REDIS_URL``); skipped without it unless TIDINGS_REQUIRE_REDIS=1.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import API_KEY, SECRET, TIMEOUT, line_starting, token
from redis_support import REDIS_URL, eventually
from tidings import __version__
from timeouts import scaled

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="--workers needs SO_REUSEPORT and /proc (Linux)"
)

#: Scrapes per check, each on a fresh TCP connection (so each may reach either worker).
SCRAPES = 8


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _parse(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def _scrape(url: str) -> Samples:
    """One scrape on a connection of its own (no keep-alive)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.get(f"{url}/metrics", timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as response,
    ):
        assert response.status == 200
        return _parse(await response.text())


async def _scrapes(url: str) -> list[Samples]:
    return [await _scrape(url) for _ in range(SCRAPES)]


def _values(
    scrapes: list[Samples], key: tuple[str, tuple[tuple[str, str], ...]]
) -> list[float | None]:
    return [samples.get(key) for samples in scrapes]


async def _publish(url: str, count: int) -> None:
    """``count`` publishes, each on a connection of its own."""
    body = {"channel": "news:w", "type": "notification", "data": {"message": "m", "level": "info"}}
    for _ in range(count):
        connector = aiohttp.TCPConnector(force_close=True)
        async with (
            aiohttp.ClientSession(connector=connector) as http,
            http.post(
                f"{url}/api/publish", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
            ) as response,
        ):
            assert response.status == 200, await response.text()


async def _start(prefix: str, tmp: Path) -> tuple[asyncio.subprocess.Process, dict[str, int], str]:
    """``tidings serve --workers 2`` on a free port: the process, its workers' pids by
    number, and its URL once every worker is ready."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tidings.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--workers",
        "2",
        env=_environment(prefix, tmp),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    try:
        pids = {}
        for _ in range(2):
            line = await line_starting(proc.stdout, "tidings: worker")
            pids[line.split()[2]] = int(line.rsplit(" ", 1)[1].rstrip(")"))
        url = (await line_starting(proc.stdout, "tidings: listening on")).split()[3]
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    return proc, pids, url


def _environment(prefix: str, tmp: Path) -> Mapping[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TIDINGS_")}
    env.update(
        {
            "TIDINGS_AUTH__SECRET": SECRET,
            "TIDINGS_API__KEYS": API_KEY,
            "TIDINGS_BROKER__URL": REDIS_URL,
            "TIDINGS_BROKER__PREFIX": prefix,
            "TIDINGS_LOGGING__LEVEL": "warning",
            "TIDINGS_SERVER__SHUTDOWN_TIMEOUT": "3",
            # The supervisor's private metrics directory goes here, where the test can see it.
            "TMPDIR": str(tmp),
        }
    )
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


async def test_every_scrape_describes_the_whole_server(redis_prefix: str, tmp_path: Path) -> None:
    """With one WebSocket open, all 8 scrapes read one connection; counters are sums over
    the workers and keep a killed worker's counts; process_* covers the server and
    tidings_worker_* each worker; the metrics directory is removed at exit."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc, pids, url = await _start(redis_prefix, tmp)
    assert proc.stdout is not None
    try:
        assert len(list(tmp.glob("tidings-metrics-*"))) == 1

        ws_url = url.replace("http://", "ws://") + f"/ws?token={token('u1')}"
        async with aiohttp.ClientSession() as http, http.ws_connect(ws_url) as ws:
            hello = await ws.receive_json(timeout=TIMEOUT)
            assert hello["type"] == "connected"
            scrapes = await _scrapes(url)
            assert _values(scrapes, ("tidings_connections", ())) == [1] * SCRAPES
            assert _values(scrapes, ("tidings_subscriptions", ())) == [1] * SCRAPES
            assert (
                _values(scrapes, ("tidings_handshakes_total", (("outcome", "ok"),)))
                == [1] * SCRAPES
            )
        await _publish(url, SCRAPES)

        published = ("tidings_events_published_total", (("type", "notification"),))
        scrapes = await _scrapes(url)
        assert _values(scrapes, published) == [SCRAPES] * SCRAPES
        assert _values(scrapes, ("tidings_publish_seconds_count", ())) == [SCRAPES] * SCRAPES
        for samples in scrapes:
            assert samples[("tidings_build_info", (("version", __version__),))] == 1
            assert samples[("tidings_broker_up", ())] == 1
            assert samples[("process_resident_memory_bytes", ())] > 0
            assert samples[("process_open_fds", ())] > 0
            assert ("python_gc_collections_total", (("generation", "0"),)) in samples
            for worker in ("1", "2"):
                label = (("worker", worker),)
                assert samples[("tidings_worker_resident_memory_bytes", label)] > 0
                assert samples[("tidings_worker_open_fds", label)] > 0
                assert ("tidings_worker_gc_collections", (("generation", "0"), *label)) in samples
            whole = samples[("process_resident_memory_bytes", ())]
            assert whole > sum(
                samples[("tidings_worker_resident_memory_bytes", (("worker", w),))]
                for w in ("1", "2")
            )  # the supervisor counts too

        async def closed() -> bool:
            return (await _scrape(url))[("tidings_connections", ())] == 0

        await eventually(closed)

        os.kill(pids["1"], signal.SIGKILL)
        replacement = int(
            (await line_starting(proc.stdout, "tidings: worker 1 ready"))
            .rsplit(" ", 1)[1]
            .rstrip(")")
        )
        assert replacement != pids["1"]
        scrapes = await _scrapes(url)
        # Whichever worker counted them, the dead worker's counts are still in the sums.
        assert _values(scrapes, published) == [SCRAPES] * SCRAPES
        assert _values(scrapes, ("tidings_handshakes_total", (("outcome", "ok"),))) == [1] * SCRAPES
        assert _values(scrapes, ("tidings_connections", ())) == [0] * SCRAPES

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), scaled(15)) == 0
        assert list(tmp.glob("tidings-metrics-*")) == []
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_workers_remove_the_metrics_directory_when_the_supervisor_is_killed(
    redis_prefix: str, tmp_path: Path
) -> None:
    """kill -9 of the supervisor: the workers drain and exit, and the last one removes
    the metrics directory the supervisor could not."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc, pids, _ = await _start(redis_prefix, tmp)
    try:
        assert len(list(tmp.glob("tidings-metrics-*"))) == 1
        proc.kill()
        await proc.wait()

        async def cleaned() -> bool:
            gone = not any(_alive(pid) for pid in pids.values())
            return gone and not list(tmp.glob("tidings-metrics-*"))

        await eventually(cleaned, timeout=scaled(15))
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
