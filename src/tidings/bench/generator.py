"""The compiled load generator: built from ``gen.c`` at bench time and driven over pipes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from tidings.bench.system import Pinning, Proc

__all__ = ["BuildError", "Generator", "build_generator"]


class BuildError(RuntimeError):
    """No C compiler, or the generator did not compile."""


def build_generator(cache_dir: Path | None = None) -> Path:
    """Compile ``gen.c`` once per source version; return the executable's path."""
    source = resources.files("tidings.bench").joinpath("gen.c").read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    base = cache_dir or Path(tempfile.gettempdir()) / f"tidings-bench-{os.getuid()}"
    target = base / f"gen-{digest}"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise BuildError("no C compiler found (gcc or cc): the load generator needs one")
    base.mkdir(parents=True, exist_ok=True)
    src = base / f"gen-{digest}.c"
    src.write_bytes(source)
    partial = base / f"gen-{digest}.{os.getpid()}.tmp"
    result = subprocess.run(  # noqa: S603 - fixed argv
        [compiler, "-O2", "-o", str(partial), str(src)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise BuildError(f"the load generator did not compile:\n{result.stderr[-2000:]}")
    partial.replace(target)
    return target


@dataclass(slots=True)
class Ready:
    """The connect phase's outcome, as the generator reported it (monotonic ns)."""

    ok: int
    connected: int
    failed: int
    t_first_start: int
    t_last_connected: int
    t_last_ready: int
    fail: dict[str, int]
    last_error: str


class Generator:
    """One running generator process holding ``conns`` connections to one server."""

    def __init__(
        self,
        exe: Path,
        *,
        port: int | list[int],
        mode: str,
        conns: int,
        tokens: Path | None,
        path: str,
        channel: str,
        subscribe: bool,
        concurrency: int,
        sample_every: int,
        pinning: Pinning,
        setup_timeout: float,
    ) -> None:
        ports = port if isinstance(port, list) else [port]
        argv = [
            str(exe),
            "--host",
            "127.0.0.1",
            "--ports",
            ",".join(map(str, ports)),
            "--mode",
            mode,
            "--conns",
            str(conns),
            "--path",
            path,
            "--channel",
            channel,
            "--subscribe",
            "1" if subscribe else "0",
            "--concurrency",
            str(concurrency),
            "--sample-every",
            str(sample_every),
            "--setup-timeout-ms",
            str(int(setup_timeout * 1000)),
        ]
        if tokens is not None:
            argv += ["--tokens", str(tokens)]
        self.conns = conns
        self.setup_timeout = setup_timeout
        self.proc = Proc(argv, cpu=pinning.load_cpu, pinning=pinning, name="load generator")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _event(self, name: str, timeout: float) -> dict[str, Any]:
        while True:
            line = self.proc.readline(timeout)
            try:
                message: dict[str, Any] = json.loads(line)
            except ValueError:
                continue
            if message.get("event") == name:
                return message

    def ready(self) -> Ready:
        data = self._event("ready", self.setup_timeout + 30)
        del data["event"]
        return Ready(**data)

    def start_measure(self, expected: int, idle: float, limit: float) -> None:
        self.proc.send(f"measure {expected} {int(idle * 1000)} {int(limit * 1000)}")
        self._event("measuring", 10)

    def done(self, limit: float) -> dict[str, Any]:
        return self._event("done", limit + 30)

    def close(self) -> None:
        try:
            self.proc.send("quit")
            self.proc.popen.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.proc.stop()
