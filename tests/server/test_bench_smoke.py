"""Smoke test of the benchmark suite: one tiny run end to end, never a timing assertion."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from timeouts import scaled

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CC", "gcc")) is None and shutil.which("cc") is None,
    reason="the bench's load generator is compiled with a C compiler",
)

COMMAND = [sys.executable, "-m", "tidings.cli", "bench"]


def test_bench_runs_a_tiny_fanout_and_writes_json(tmp_path: Path) -> None:
    """A 20-subscriber fan-out of 300 events, run once, completes and writes the JSON."""
    output = tmp_path / "bench.json"
    proc = subprocess.Popen(
        [
            *COMMAND,
            "--scenarios",
            "fanout",
            "--subscribers",
            "20",
            "--events",
            "300",
            "--runs",
            "1",
            "--quiet-wait",
            "0",
            "--attempts",
            "1",
            "--output",
            str(output),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=scaled(45))
    finally:
        if proc.poll() is None:
            # SIGTERM lets the bench stop the server and generator it started.
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=scaled(15))
    assert proc.returncode == 0, stderr
    assert "fan-out 20 subs" in stdout
    report = json.loads(output.read_text())
    assert {"tidings_version", "machine", "config", "results", "targets", "skipped"} <= set(report)
    assert {"cpu_model", "cpus", "python", "pinning"} <= set(report["machine"])
    [result] = report["results"]
    assert {"scenario", "label", "metric", "unit", "params", "servers"} <= set(result)
    assert result["scenario"] == "fanout"
    assert result["params"] == {"subscribers": 20}
    summary = result["servers"]["tidings"]
    assert {"median", "min", "max", "runs", "errors", "lower_bound", "gen_cpu_max"} <= set(summary)
    assert summary["errors"] == []
    [run] = summary["runs"]
    assert {"value", "expected", "received", "server_cpu", "gen_cpu", "events"} <= set(run)
