"""The bench's ``publish`` scenario, in tiny configurations: figures present and positive,
never a speed assertion. Redis parts skip without ``redis-server`` (fail with
``TIDINGS_REQUIRE_REDIS=1``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from redis_support import unavailable
from tidings.bench.cluster import redis_command, start_cluster
from tidings.bench.postload import build_requests
from tidings.bench.servers import start_redis
from tidings.bench.system import Pinning
from timeouts import scaled

needs_cc = pytest.mark.skipif(
    shutil.which(os.environ.get("CC", "gcc")) is None and shutil.which("cc") is None,
    reason="the bench's load generator is compiled with a C compiler",
)

COMMAND = [
    sys.executable,
    "-m",
    "tidings.cli",
    "bench",
    "--scenarios",
    "publish",
    "--runs",
    "1",
    "--quiet-wait",
    "0",
    "--attempts",
    "1",
]


def _needs_redis_server() -> None:
    if shutil.which("redis-server") is None:
        unavailable("redis-server is not installed (the bench starts its own)")


def _bench(tmp_path: Path, *options: str, timeout: float = scaled(25)) -> dict[str, Any]:
    """Run the bench with ``options``; return its JSON report (stdout checked too)."""
    output = tmp_path / "bench.json"
    proc = subprocess.Popen(
        [*COMMAND, *options, "--output", str(output)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            # SIGTERM lets the bench stop every process it started.
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=scaled(15))
    assert proc.returncode == 0, stderr
    assert "publish 1/req x32, memory" in stdout, stdout
    report: dict[str, Any] = json.loads(output.read_text())
    return report


def _by_label(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {result["label"]: result["servers"]["tidings"] for result in report["results"]}


def test_requests_are_valid_http_with_json_bodies() -> None:
    """Single requests carry one ~100-byte event each, over the channels in turn; batch
    requests carry ``batch`` events spread over the channels."""
    single = build_requests(
        host="127.0.0.1",
        port=80,
        key="k",
        mode="single",
        batch=100,
        channels=4,
        prefix="bench:p",
        data_bytes=100,
    )
    assert len(single) == 4
    head, _, body = single[1].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /api/publish HTTP/1.1\r\n")
    assert f"Content-Length: {len(body)}".encode() in head
    event = msgspec.json.decode(body)
    assert event["channel"] == "bench:p1" and event["type"] == "chat_message"
    assert 90 <= len(msgspec.json.encode(event["data"])) <= 110
    batch = build_requests(
        host="127.0.0.1",
        port=80,
        key="k",
        mode="batch",
        batch=10,
        channels=4,
        prefix="bench:p",
        data_bytes=100,
    )
    head, _, body = batch[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /api/batch HTTP/1.1\r\n")
    events = msgspec.json.decode(body)["events"]
    assert len(events) == 10
    assert {e["channel"] for e in events} == {f"bench:p{i}" for i in range(4)}


@needs_cc
@pytest.mark.timeout(30)
def test_publish_scenario_against_memory(tmp_path: Path) -> None:
    """Single and batched publish rates through memory:// are measured and written."""
    report = _bench(tmp_path, "--publish-brokers", "memory", "--publish-seconds", "0.3")
    rows = _by_label(report)
    rates = {"publish 1/req x32, memory", "publish batch 100 x8, memory"}
    latencies = {
        "publish latency 1 in flight p50, memory",
        "publish latency 1 in flight p99, memory",
    }
    assert set(rows) == rates | latencies | {
        "Tidings CPU 1/req, memory",
        "Tidings CPU batch 100, memory",
    }
    for label, summary in rows.items():
        assert summary["errors"] == [], label
        [run] = summary["runs"]
        assert run["events"] > 0 and run["failed"] == 0, run
        assert run["redis_us_per_publish"] == [], run
    for label in rates | latencies:
        assert rows[label]["median"] > 0, label
        assert rows[label]["runs"][0]["server_cpu"] > 0, label
    assert rows["publish latency 1 in flight p50, memory"]["runs"][0]["concurrency"] == 1
    assert {r["scenario"] for r in report["results"]} == {
        "publish_single",
        "publish_batch",
        "publish_latency",
        "publish_node_cpu",
    }


@needs_cc
@pytest.mark.timeout(30)
def test_publish_scenario_through_one_redis(tmp_path: Path) -> None:
    """Through a private redis-server: rates, the ratio to memory and Redis CPU per
    publish are present and positive, and the ratio is checked against its target."""
    _needs_redis_server()
    report = _bench(tmp_path, "--publish-brokers", "memory,redis", "--publish-seconds", "1")
    rows = _by_label(report)
    for label in (
        "publish 1/req x32, memory",
        "publish 1/req x32, Redis",
        "publish batch 100 x8, Redis",
        "publish 1/req x32, Redis/memory",
    ):
        assert rows[label]["errors"] == [], label
        assert rows[label]["median"] > 0, label
    assert rows["publish latency 1 in flight p99, Redis"]["median"] > 0
    assert rows["Tidings CPU 1/req, Redis"]["median"] is not None
    cpu = [rows["Redis CPU 1/req, Redis"], rows["Redis CPU batch 100, Redis"]]
    assert all(summary["median"] is not None and summary["median"] >= 0 for summary in cpu)
    # CPU time comes in 10 ms ticks: over 1 s at least one of the two phases shows some.
    assert max(summary["median"] for summary in cpu) > 0
    [run] = rows["publish 1/req x32, Redis"]["runs"]
    assert len(run["redis_us_per_publish"]) == 1 and run["failed"] == 0, run
    [target] = [t for t in report["targets"] if t["figure"] == "publish 1/req x32, Redis/memory"]
    assert target["value"] > 0 and isinstance(target["met"], bool)


@pytest.mark.timeout(30)
def test_cluster_forms_and_every_process_is_stopped() -> None:
    """start_cluster: 3 shards own all 16384 slots, cluster_state is ok on every node,
    and every redis-server it started is gone afterwards."""
    _needs_redis_server()
    with start_cluster(Pinning("none", None, None), 3, 0) as cluster:
        pids = cluster.pids
        assert len(pids) == 3
        assert cluster.url.startswith("redis+cluster://127.0.0.1:")
        for node in cluster.nodes:
            info = str(redis_command(node.port, "CLUSTER", "INFO"))
            assert "cluster_state:ok" in info
            assert "cluster_slots_assigned:16384" in info
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.timeout(30)
def test_redis_servers_can_run_on_the_load_cpu() -> None:
    """--redis-cpu load: start_redis and start_cluster put their redis-servers on the CPU
    they are given instead of the node's."""
    _needs_redis_server()
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        unavailable("needs two CPUs to tell the server CPU from the load CPU")
    pinning = Pinning("sched_setaffinity", cpus[0], cpus[1])
    with start_redis(pinning, cpus[1]) as (proc, _):
        assert os.sched_getaffinity(proc.pid) == {cpus[1]}
    with start_cluster(pinning, 1, 0, cpu=cpus[1]) as cluster:
        assert {frozenset(os.sched_getaffinity(pid)) for pid in cluster.pids} == {
            frozenset({cpus[1]})
        }
    with start_redis(pinning) as (proc, _):
        assert os.sched_getaffinity(proc.pid) == {cpus[0]}
