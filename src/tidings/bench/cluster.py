"""A private Redis Cluster for the bench, started from the ``redis-server`` binary.

``start_cluster`` starts ``primaries`` shards of ``1 + replicas`` redis-server processes
each, on free loopback ports, pinned to the server CPU like ``start_redis``: cluster mode,
no persistence, each node's ``--cluster-config-file`` and log in a temporary directory. It
assigns the slots with ``CLUSTER ADDSLOTSRANGE`` (16384 slots split evenly), joins the
nodes with ``CLUSTER MEET``, attaches replicas with ``CLUSTER REPLICATE`` and polls, with a
bounded timeout, until every node reports ``cluster_state:ok`` and knows every other node
(and every replica's link to its primary is up). Every process it started is stopped by
PID when the block ends, whatever happened; the directory is removed.

The few commands it needs are sent over plain sockets (RESP2), so that this module needs
no Redis client library.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from tidings.bench.system import Pinning, Proc

__all__ = ["Cluster", "ClusterNode", "redis_command", "start_cluster"]

HOST = "127.0.0.1"
SLOTS = 16384
#: Bound of every wait (a node answering, the cluster agreeing); polls are short.
WAIT_TIMEOUT = 30.0
POLL = 0.02


class _ReplyError(RuntimeError):
    """Redis answered ``-ERR ...``."""


def _encode(*args: object) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _read_reply(reader: IO[bytes]) -> object:
    line = reader.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed by redis-server")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise _ReplyError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = reader.read(size + 2)
        return data[:-2].decode()
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [_read_reply(reader) for _ in range(count)]
    raise ConnectionError(f"unexpected reply {line[:40]!r}")


def redis_command(port: int, *args: object, timeout: float = 2.0) -> object:
    """Send one command to ``127.0.0.1:port`` on a connection of its own; return the reply
    (strings decoded). Raises ``OSError`` when unreachable and ``RuntimeError`` when Redis
    answers an error."""
    with socket.create_connection((HOST, port), timeout=timeout) as conn:
        conn.sendall(_encode(*args))
        with conn.makefile("rb") as stream:
            return _read_reply(stream)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def _info(text: object) -> dict[str, str]:
    """``name:value`` lines (CLUSTER INFO, INFO) as a dict."""
    result: dict[str, str] = {}
    for line in str(text).splitlines():
        name, sep, value = line.partition(":")
        if sep and not line.startswith("#"):
            result[name.strip()] = value.strip()
    return result


@dataclass(slots=True)
class ClusterNode:
    """One redis-server of the cluster: its ports, its directory and its process."""

    directory: Path
    port: int = field(default_factory=_free_port)
    bus_port: int = field(default_factory=_free_port)
    proc: Proc | None = None
    node_id: str = ""
    primary: ClusterNode | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("not started")
        return self.proc.pid

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(
                (self.directory / "redis.log").read_text(errors="replace").splitlines()[-15:]
            )
        return ""

    def ask(self, *args: object) -> object:
        return redis_command(self.port, *args)


@dataclass(slots=True)
class Cluster:
    """A started cluster: its primaries (one per shard, in slot order) and replicas."""

    primaries: list[ClusterNode]
    replicas: list[ClusterNode]
    startup_seconds: float = 0.0

    @property
    def nodes(self) -> list[ClusterNode]:
        return [*self.primaries, *self.replicas]

    @property
    def url(self) -> str:
        """The broker URL: every primary as a seed."""
        return "redis+cluster://" + ",".join(node.address for node in self.primaries)

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(node.pid for node in self.nodes)


def _options(node: ClusterNode) -> list[str]:
    return [
        "--bind",
        HOST,
        "--port",
        str(node.port),
        "--cluster-port",
        str(node.bus_port),
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        str(node.directory / "nodes.conf"),
        "--cluster-node-timeout",
        "1000",
        "--dir",
        str(node.directory),
        "--logfile",
        str(node.directory / "redis.log"),
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--loglevel",
        "warning",
        "--shutdown-timeout",
        "0",
        "--repl-diskless-sync",
        "yes",
        "--repl-diskless-sync-delay",
        "0",
    ]


def _wait(what: str, check: Callable[[], str], deadline: float, nodes: list[ClusterNode]) -> None:
    """Poll ``check()`` until it returns '' (done) or the deadline; its return value says
    what is still missing. A node that exited fails the wait at once."""
    missing = ""
    while True:
        for node in nodes:
            if node.proc is not None and node.proc.popen.poll() is not None:
                raise RuntimeError(
                    f"redis-server {node.address} exited "
                    f"({node.proc.popen.returncode}) while {what}: "
                    f"{node.log_tail()} {node.proc.stderr()}"
                )
        try:
            missing = check()
        except (OSError, RuntimeError) as exc:
            missing = repr(exc)
        if not missing:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"Redis Cluster: {what} not done within {WAIT_TIMEOUT:g} s ({missing})"
            )
        time.sleep(POLL)


def _known(text: object) -> set[str]:
    """The ids in a CLUSTER NODES reply that are past the handshake and not failed."""
    known = set()
    for line in str(text).splitlines():
        parts = line.split()
        if len(parts) >= 3 and not {"handshake", "noaddr", "fail"} & set(parts[2].split(",")):
            known.add(parts[0])
    return known


def _formed(nodes: list[ClusterNode]) -> str:
    """'' when every node says cluster_state:ok, knows all nodes and sees every replica
    as the replica of its primary, and every replica's link to its primary is up."""
    for node in nodes:
        info = _info(node.ask("CLUSTER", "INFO"))
        if info.get("cluster_state") != "ok":
            return f"{node.address}: cluster_state {info.get('cluster_state')}"
        if int(info.get("cluster_known_nodes", 0)) != len(nodes):
            return f"{node.address} knows {info.get('cluster_known_nodes')} of {len(nodes)}"
        view = {
            parts[0]: parts
            for parts in (line.split() for line in str(node.ask("CLUSTER", "NODES")).splitlines())
            if len(parts) >= 4
        }
        for other in nodes:
            if other.primary is None:
                continue
            parts = view.get(other.node_id)
            if (
                parts is None
                or "slave" not in parts[2].split(",")
                or parts[3] != other.primary.node_id
            ):
                return f"{node.address} does not yet see {other.address} as a replica"
        if node.primary is not None:
            link = _info(node.ask("INFO", "replication")).get("master_link_status")
            if link != "up":
                return f"replica {node.address}: link {link}"
    return ""


@contextlib.contextmanager
def start_cluster(
    pinning: Pinning, primaries: int = 3, replicas: int = 0, *, cpu: int | None = None
) -> Iterator[Cluster]:
    """A private Redis Cluster of ``primaries`` shards with ``replicas`` replicas each,
    on ``cpu`` (default: the server CPU); ready (``cluster_state:ok`` everywhere) when the
    block starts, and stopped (every process by PID) and removed when it ends.

    Raises ``RuntimeError`` when ``redis-server`` is missing, a node exits, or the cluster
    is not formed within ``WAIT_TIMEOUT`` seconds.
    """
    if primaries < 1 or replicas < 0:
        raise ValueError("need at least one primary and no negative replica count")
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not on PATH")
    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="tidings-bench-cluster-"))
    heads = [ClusterNode(work / f"node-{i}") for i in range(primaries)]
    tails = [
        ClusterNode(work / f"node-{primaries + i * replicas + j}", primary=head)
        for i, head in enumerate(heads)
        for j in range(replicas)
    ]
    cluster = Cluster(heads, tails)
    nodes = cluster.nodes
    try:
        for node in nodes:
            node.directory.mkdir()
            node.proc = Proc(
                [binary, *_options(node)],
                cpu=pinning.server_cpu if cpu is None else cpu,
                pinning=pinning,
                name=f"redis-server:{node.port}",
            )
        deadline = time.monotonic() + WAIT_TIMEOUT

        def answering() -> str:
            for node in nodes:
                if node.ask("PING") != "PONG":
                    return f"{node.address} does not answer PING"
            return ""

        _wait("starting", answering, deadline, nodes)
        for index, node in enumerate(nodes):
            node.node_id = str(node.ask("CLUSTER", "MYID"))
            # Distinct epochs from the start, as redis-cli does: no collision to resolve.
            node.ask("CLUSTER", "SET-CONFIG-EPOCH", index + 1)
        bounds = [i * SLOTS // primaries for i in range(primaries + 1)]
        for index, head in enumerate(heads):
            head.ask("CLUSTER", "ADDSLOTSRANGE", bounds[index], bounds[index + 1] - 1)
        for node in nodes[1:]:
            nodes[0].ask("CLUSTER", "MEET", HOST, node.port, node.bus_port)

        everyone = {node.node_id for node in nodes}

        def met() -> str:
            for node in nodes:
                known = _known(node.ask("CLUSTER", "NODES"))
                if not everyone <= known:
                    return f"{node.address} knows {len(known & everyone)} of {len(nodes)}"
            return ""

        _wait("meeting", met, deadline, nodes)
        for head in heads:
            for tail in tails:
                if tail.primary is head:
                    tail.ask("CLUSTER", "REPLICATE", head.node_id)
        _wait("forming", lambda: _formed(nodes), deadline, nodes)
        cluster.startup_seconds = round(time.monotonic() - began, 2)
        yield cluster
    finally:
        for node in nodes:
            if node.proc is not None:
                with contextlib.suppress(ProcessLookupError, OSError):
                    node.proc.popen.terminate()
        for node in nodes:
            if node.proc is not None:
                node.proc.stop()
                node.proc.discard()
        shutil.rmtree(work, ignore_errors=True)
