"""Helpers for the deployment-kit tests: a ``tidings serve`` process of the test's own,
free ports, and polling a condition with a deadline (never a fixed sleep)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from helpers import API_KEY, SECRET
from timeouts import TIMEOUT, scaled

__all__ = [
    "REPO",
    "TidingsProcess",
    "config_text",
    "free_port",
    "json_lines",
    "require_binary",
    "tidings_process",
    "until",
    "wait_for_port",
]

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "tidings.cli"]
#: Seconds a process may take to start or stop.
PROCESS_TIMEOUT = scaled(15.0)


def require_binary(name: str, switch: str) -> str:
    """The path of ``name``; skip without it, unless ``switch`` is set to 1 (CI)."""
    path = shutil.which(name) or next(
        (str(p) for d in ("/usr/sbin", "/sbin") if (p := Path(d, name)).exists()), None
    )
    if path is None:
        if os.environ.get(switch) == "1":
            pytest.fail(f"{name} is not installed ({switch}=1)")
        pytest.skip(f"{name} is not installed")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def until(
    check: Callable[[], Awaitable[bool]], timeout: float = TIMEOUT, what: str = "condition"
) -> None:
    """Poll ``check`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        await asyncio.sleep(0.02)


async def wait_for_port(port: int, timeout: float = TIMEOUT) -> None:
    """Until something accepts connections on 127.0.0.1:``port``."""

    async def accepting() -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    await until(accepting, timeout, f"port {port} accepting")


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON log lines of ``text`` (other lines skipped)."""
    lines = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                lines.append(value)
    return lines


def config_text(
    port: int, *, internal_port: int | None = None, extra: str = "", broker: str = "memory://"
) -> str:
    """A production configuration on 127.0.0.1 with the test secret and API key."""
    internal = f"internal_port = {internal_port}\n" if internal_port is not None else ""
    return (
        f'[logging]\nlevel = "info"\nformat = "json"\n'
        f'[server]\nmode = "production"\nhost = "127.0.0.1"\nport = {port}\n{internal}'
        f"shutdown_timeout = 5\n"
        f'[auth]\nsecret = "{SECRET}"\npersonal_channel_hold = 0\n'
        f'[api]\nkeys = ["{API_KEY}"]\n[broker]\nurl = "{broker}"\n'
        f'[namespaces.news]\nrule = "public"\n{extra}'
    )


@dataclass
class TidingsProcess:
    """A ``tidings serve`` subprocess this test started."""

    proc: asyncio.subprocess.Process
    port: int
    stderr_path: Path
    stdout: list[str]
    signalled: bool = False

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def log(self) -> list[dict[str, Any]]:
        """Its JSON log lines so far."""
        return json_lines(self.stderr())

    def sigterm(self) -> None:
        """Send SIGTERM (once: a drain is begun by the first)."""
        if not self.signalled and self.proc.returncode is None:
            self.signalled = True
            self.proc.send_signal(signal.SIGTERM)

    async def terminate(self) -> int:
        """SIGTERM unless it was sent already, then its exit status. Never a second
        SIGTERM: between the "stopped" line and the exit the signal handlers are gone,
        and a second one would kill the process as it exits."""
        self.sigterm()
        return await asyncio.wait_for(self.proc.wait(), PROCESS_TIMEOUT)


@contextlib.asynccontextmanager
async def tidings_process(
    tmp_path: Path, config: str, *, port: int, env: Mapping[str, str] | None = None
) -> AsyncIterator[TidingsProcess]:
    """``tidings serve --config`` with ``config`` until it prints its listening line;
    killed (by its PID) if still running on exit."""
    path = tmp_path / f"tidings-{port}.toml"
    path.write_text(config)
    stderr_path = tmp_path / f"tidings-{port}.stderr"
    environ = {k: v for k, v in os.environ.items() if not k.upper().startswith("TIDINGS_")}
    environ.update(env or {})
    with stderr_path.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            *CLI,
            "serve",
            "--config",
            str(path),
            env=environ,
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )
    served = TidingsProcess(proc, port, stderr_path, [])
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(PROCESS_TIMEOUT):
            while True:
                raw = await proc.stdout.readline()
                if not raw:
                    raise AssertionError(f"tidings exited early: {served.stderr()}")
                served.stdout.append(raw.decode().rstrip("\n"))
                if "listening on" in served.stdout[-1]:
                    break
        yield served
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
