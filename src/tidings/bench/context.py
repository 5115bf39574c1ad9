"""What every run of a scenario needs: its ``Context`` (the generator, pinning,
credentials and tuning knobs), the ``RunError`` that says a run produced no figure, and
starting a run's server and load generator and waiting for its connections.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tidings.bench.generator import Generator
from tidings.bench.servers import CHANNEL, Credentials, Server, ServerKind, start_server
from tidings.bench.system import Pinning

__all__ = [
    "GEN_BOTTLENECK_PERCENT",
    "Context",
    "RunError",
    "connect_all",
    "generator_for",
    "server_for",
]

#: A figure is a lower bound when the load generator used more than this share of its core.
GEN_BOTTLENECK_PERCENT = 90.0


class RunError(RuntimeError):
    """A run could not produce its figure (connections refused, server died, ...)."""


@dataclass(slots=True)
class Context:
    """What every run needs: the generator, pinning, credentials and tuning knobs."""

    exe: Path
    pinning: Pinning
    credentials: Credentials
    tokens: dict[int, Path]
    send_buffer: int = 64 * 1024 * 1024
    batch: int = 50
    publishers: int = 4
    concurrency: int = 100
    setup_timeout: float = 180.0
    #: More environment for every server under test (``--otel``: its ``OTEL_*``).
    server_env: dict[str, str] = field(default_factory=dict)

    @property
    def cores(self) -> list[int | None]:
        return [self.pinning.server_cpu, self.pinning.load_cpu]

    def tokens_for(self, count: int) -> Path:
        best = min((n for n in self.tokens if n >= count), default=None)
        if best is None:
            raise RunError(f"no token file for {count} connections")
        return self.tokens[best]


def server_for(
    ctx: Context, kind: ServerKind, broker: str | None = None
) -> contextlib.AbstractContextManager[Server]:
    """``kind`` started for a run of ``ctx`` (on ``broker``, when given)."""
    return start_server(
        kind,
        ctx.pinning,
        ctx.credentials,
        send_buffer=ctx.send_buffer,
        broker=broker,
        env=ctx.server_env,
    )


def generator_for(
    ctx: Context,
    server: Server,
    kind: ServerKind,
    conns: int,
    *,
    subscribe: bool,
    sample_every: int,
    concurrency: int | None = None,
) -> Generator:
    """A load generator of ``conns`` connections to ``server``, pinned to the load CPU."""
    return Generator(
        ctx.exe,
        port=server.port,
        mode=kind.gen_mode,
        conns=conns,
        tokens=ctx.tokens_for(conns),
        path=kind.ws_path,
        channel=CHANNEL,
        subscribe=subscribe,
        concurrency=concurrency or ctx.concurrency,
        sample_every=sample_every,
        pinning=ctx.pinning,
        setup_timeout=ctx.setup_timeout,
    )


def connect_all(gen: Generator, server: Server, wanted: int) -> Any:
    """Wait for the generator's connections; a ``RunError`` if fewer than ``wanted``."""
    ready = gen.ready()
    if ready.ok < wanted:
        detail = ready.last_error or "unknown"
        raise RunError(
            f"only {ready.ok} of {wanted} connections became ready "
            f"({ready.failed} failed: {ready.fail}; last: {detail}); "
            f"server: {server.proc.stderr()[-300:]}"
        )
    return ready
