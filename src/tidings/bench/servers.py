"""The servers under test: Tidings itself, the floor and python-socketio, as subprocesses."""

from __future__ import annotations

import importlib.util
import os
import re
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tidings.auth import mint_token
from tidings.bench.system import Pinning, Proc

__all__ = [
    "KINDS",
    "Credentials",
    "Server",
    "ServerKind",
    "available_kinds",
    "redis_available",
    "start_redis",
    "start_server",
    "write_tokens",
]

CHANNEL = "bench:fan"
_LISTENING = re.compile(r"listening on https?://([^:/\s]+):(\d+)")


@dataclass(frozen=True, slots=True)
class Credentials:
    """The secret and API key generated for one bench run."""

    secret: str
    api_key: str

    @classmethod
    def generate(cls) -> Credentials:
        return cls(secrets.token_urlsafe(48), "bench_" + secrets.token_urlsafe(32))


@dataclass(frozen=True, slots=True)
class ServerKind:
    """How to start one kind of server and how the load generator speaks to it."""

    name: str
    gen_mode: str
    ws_path: str
    module: str
    requires: str | None = None

    def argv(self, broker: str | None = None) -> list[str]:
        if self.name == "tidings":
            extra = ["--broker", broker] if broker else []
            return [
                sys.executable,
                "-m",
                "tidings.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                *extra,
            ]
        return [sys.executable, "-m", self.module, "--host", "127.0.0.1", "--port", "0"]


KINDS: dict[str, ServerKind] = {
    "tidings": ServerKind("tidings", "tidings", "/ws", "tidings.cli"),
    "floor": ServerKind("floor", "floor", "/ws", "tidings.bench.floor"),
    "socketio": ServerKind(
        "socketio",
        "socketio",
        "/socket.io/?EIO=4&transport=websocket",
        "tidings.bench.sio_peer",
        requires="socketio",
    ),
}


def available_kinds(names: Sequence[str]) -> tuple[list[ServerKind], dict[str, str]]:
    """The kinds whose dependencies are installed, and why the others are skipped."""
    kinds, skipped = [], {}
    for name in names:
        kind = KINDS[name]
        if kind.requires and importlib.util.find_spec(kind.requires) is None:
            skipped[name] = f"{kind.requires} is not installed (pip install 'tidings[bench]')"
            continue
        kinds.append(kind)
    return kinds, skipped


def server_env(
    credentials: Credentials, *, send_buffer: int, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of a server under test: production mode, generous limits, and
    ``extra``. Inherited ``OTEL_*`` variables are kept only with ``extra`` (``--otel``,
    whose exporter variables win), so that e.g. a sampler can be set for a traced run;
    without it, the server does not trace."""
    prefixes = ("TIDINGS_",) if extra else ("TIDINGS_", "OTEL_")
    env = {key: value for key, value in os.environ.items() if not key.startswith(prefixes)}
    env.update(extra or {})
    env.update(
        {
            "TIDINGS_SERVER__MODE": "production",
            "TIDINGS_AUTH__SECRET": credentials.secret,
            "TIDINGS_API__KEYS": credentials.api_key,
            "TIDINGS_LOGGING__LEVEL": "warning",
            "TIDINGS_LOGGING__FORMAT": "text",
            # One connection per user here, but a rerun may reuse tokens before the server
            # has forgotten the previous run's connections.
            "TIDINGS_LIMITS__MAX_CONNECTIONS_PER_USER": "1000000",
            "TIDINGS_LIMITS__SEND_BUFFER_BYTES": str(send_buffer),
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


@dataclass(slots=True)
class Server:
    kind: ServerKind
    proc: Proc
    port: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextmanager
def start_server(
    kind: ServerKind,
    pinning: Pinning,
    credentials: Credentials,
    *,
    send_buffer: int,
    broker: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[Server]:
    """Start ``kind`` pinned to the server CPU, ``env`` added to its environment; stop it
    (by PID) when the block ends."""
    proc = Proc(
        kind.argv(broker),
        cpu=pinning.server_cpu,
        pinning=pinning,
        env=server_env(credentials, send_buffer=send_buffer, extra=env),
        name=kind.name,
    )
    try:
        port = 0
        while not port:
            try:
                line = proc.readline(60)
            except (TimeoutError, RuntimeError) as exc:
                raise RuntimeError(f"{kind.name} did not start: {exc} {proc.stderr()}") from None
            match = _LISTENING.search(line)
            if match:
                port = int(match.group(2))
        yield Server(kind, proc, port)
    finally:
        proc.stop()
        errors = proc.stderr()
        proc.discard()
        if errors and proc.popen.returncode not in (0, -15):
            print(f"[{kind.name} stderr] {errors}", file=sys.stderr)


def redis_available() -> str | None:
    """None when the Redis scenario can run, else why not."""
    if importlib.util.find_spec("tidings.brokers.redis") is None:
        return "src/tidings/brokers/redis.py does not exist yet"
    if importlib.util.find_spec("redis") is None:
        return "the redis package is not installed"
    if shutil.which("redis-server") is None:
        return "redis-server is not on PATH (the bench starts its own instance)"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def start_redis(pinning: Pinning, cpu: int | None = None) -> Iterator[tuple[Proc, str]]:
    """A private, empty redis-server (no persistence) on ``cpu`` (default: the server
    CPU); yields its URL."""
    port = _free_port()
    argv = [
        shutil.which("redis-server") or "redis-server",
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--loglevel",
        "warning",
    ]
    proc = Proc(
        argv, cpu=pinning.server_cpu if cpu is None else cpu, pinning=pinning, name="redis-server"
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.popen.poll() is not None:
                raise RuntimeError(f"redis-server did not start: {proc.stderr()}")
            time.sleep(0.05)
        yield proc, f"redis://127.0.0.1:{port}/0"
    finally:
        proc.stop()
        proc.discard()


def write_tokens(path: Path, secret: str, count: int) -> Path:
    """``count`` tokens for distinct users that may read ``bench:*``, one a line."""
    with path.open("w") as handle:
        for index in range(count):
            handle.write(
                mint_token(secret, f"bench-{index:06d}", channels=["bench:*"], ttl=6 * 3600)
            )
            handle.write("\n")
    return path
