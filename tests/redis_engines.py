"""Real Redis Cluster and Redis Sentinel deployments for tests, run from ``redis-server``.

Every process is a child of the test process, started on free loopback ports with its own
directory (``nodes.conf``, log, AOF) under a directory the caller passes (``tmp_path``),
and stopped by PID. Nothing here touches a Redis this module did not start.

Settings are chosen for speed: a small ``cluster-node-timeout``, diskless replication
without delay, replicas that may always fail over, no replica migration and no full
coverage requirement (the other shards keep serving while one fails over).

Every wait polls a condition (``eventually``) with a short interval and a generous bound,
so that a loaded machine makes the tests slower, not flaky. ``cluster_scope`` and
``sentinel_scope`` start a deployment and always stop it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from redis_support import eventually, free_port, unavailable
from timeouts import scaled

HOST = "127.0.0.1"
SLOTS = 16384
#: Bound of every wait for cluster-wide or sentinel-wide agreement. Generous, because a
#: loaded 2-core machine stretches gossip and elections; the polls themselves are fast.
WAIT_TIMEOUT = scaled(30.0)
#: Poll interval of those waits.
POLL = 0.025
#: How long a stopped process gets between SIGTERM and SIGKILL, and after SIGKILL.
STOP_GRACE = 5.0
#: Keys moved per MIGRATE during ``migrate_slot``.
MIGRATE_BATCH = 100


class _Pending:
    """A falsy poll result that says what is still missing, for ``eventually``'s message."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"<pending: {self.reason}>"


class _PortTaken(Exception):
    """redis-server could not bind: another process took the port after free_port()."""


def _pdeathsig() -> Callable[[], None] | None:
    """A ``preexec_fn`` that SIGKILLs the child when the test process dies (Linux only).

    ``stop()`` is the normal way out; this is for a test run that never reaches it (a crash,
    or pytest-timeout's ``thread`` method, which ends with ``os._exit``), so that no
    redis-server outlives it.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL)

    return preexec


_PREEXEC = _pdeathsig()


def _binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        unavailable("redis-server is not installed")
        raise AssertionError("unreachable")  # unavailable() always raises
    return binary


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(reply: Sequence[Any]) -> dict[str, str]:
    """A flat RESP2 ``[name, value, name, value, ...]`` reply (SENTINEL MASTER) as a dict."""
    items = [_text(item) for item in reply]
    return dict(zip(items[::2], items[1::2], strict=True))


def _info_lines(text: str) -> dict[str, str]:
    """``name:value`` lines (CLUSTER INFO, INFO) as a dict."""
    result: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and not line.startswith("#"):
            result[name.strip()] = value.strip()
    return result


# -- one redis-server --------------------------------------------------------------------


@dataclass(eq=False)
class EngineNode:
    """One redis-server (or ``--sentinel``) process this harness started, held by PID.

    ``port`` and ``directory`` stay the same across ``kill()`` and ``start()``, so a
    cluster node comes back with its ``nodes.conf`` (its identity) and a sentinel with
    the config file it rewrote.
    """

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    #: redis-server arguments besides port, bind, dir, log and persistence.
    options: list[str] = field(default_factory=list)
    #: Cluster bus port (``cluster-port``), for cluster nodes: chosen free like ``port``
    #: rather than ``port + 10000``, which may be taken or above 65535.
    bus_port: int | None = None
    #: Sentinel config body (everything but ``port``/``bind``/``dir``/``logfile``); when
    #: set, the node runs as ``redis-server sentinel.conf --sentinel``.
    sentinel_config: str | None = None
    paused: bool = False
    _started: bool = field(default=False, repr=False)
    _stopped_by_us: bool = field(default=False, repr=False)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def live(self) -> bool:
        """Running and not paused: it can answer now.

        Raises when the process exited although this harness did not kill or stop it, so
        that a crash shows up as the server's own log instead of as a timeout.
        """
        if self.process is None or self._stopped_by_us:
            return False
        if self.process.poll() is not None:
            raise AssertionError(
                f"{self.address} exited unexpectedly with "
                f"{self.process.returncode}:\n{self.log_tail()}"
            )
        return not self.paused

    @property
    def log_path(self) -> Path:
        return self.directory / (
            "sentinel.log" if self.sentinel_config is not None else "redis.log"
        )

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's log and of its stdout/stderr, for failure messages."""
        parts = []
        for path in (self.log_path, self.directory / "stdout.log"):
            with contextlib.suppress(OSError):
                parts.extend(path.read_text(errors="replace").splitlines()[-lines:])
        return "\n".join(parts)

    def client(
        self, *, decode: bool = True, timeout: float = 2.0, **options: Any
    ) -> aioredis.Redis:
        """A plain client of this one node; close it, or use it as ``async with``.

        No retries: the harness polls, and a retry with backoff against a killed node
        would only make each poll slow.
        """
        return aioredis.Redis(
            host=HOST,
            port=self.port,
            protocol=2,
            decode_responses=decode,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            driver_info=None,
            **options,
        )

    async def ask(self, *command: Any, decode: bool = True, timeout: float = 2.0) -> Any:
        """Send one command on a connection of its own and return the raw reply."""
        async with self.client(decode=decode, timeout=timeout) as client:
            return await client.execute_command(*command)

    def _arguments(self, binary: str) -> list[str]:
        if self.sentinel_config is not None:
            config = self.directory / "sentinel.conf"
            if not self._started:
                # Not on a restart: Sentinel rewrites it (its id, the replicas and
                # sentinels it found, a new primary), and a restart must read that.
                config.write_text(
                    f"port {self.port}\nbind {HOST}\ndir {self.directory}\n"
                    f"logfile {self.log_path}\n{self.sentinel_config}"
                )
            return [binary, str(config), "--sentinel"]
        arguments = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--dir",
            str(self.directory),
            "--logfile",
            str(self.log_path),
            "--save",
            "",
            # Redis 7 lets a primary wait up to 10 s on SIGTERM for lagging
            # replicas; stop() should not.
            "--shutdown-timeout",
            "0",
            *self.options,
        ]
        if self.bus_port is not None:
            arguments += ["--cluster-port", str(self.bus_port)]
        return arguments

    async def start(self) -> None:
        """Start (or restart) the process and wait until it answers PING."""
        binary = _binary()
        if self.running:
            raise AssertionError(f"{self.address} is already running")
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            self._spawn(binary)
            try:
                await eventually(self._answers, timeout=WAIT_TIMEOUT, interval=POLL)
            except _PortTaken:
                if self._started:
                    raise AssertionError(
                        f"{self.address} cannot restart: its port was taken meanwhile"
                    ) from None
                # free_port() only said the port was free a moment ago; pick again.
                self.port = free_port()
                if self.bus_port is not None:
                    self.bus_port = free_port()
                continue
            self._started = True
            return
        raise AssertionError(f"no free port for {self.directory} after 5 attempts")

    def _spawn(self, binary: str) -> None:
        if not self._started:
            # A failed first attempt's log would still say "Address already in use".
            for stale in (self.log_path, self.directory / "stdout.log"):
                stale.unlink(missing_ok=True)
        with open(self.directory / "stdout.log", "ab") as output:
            self.process = subprocess.Popen(
                self._arguments(binary),
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                preexec_fn=_PREEXEC,
            )
        self.paused = False
        self._stopped_by_us = False

    async def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            tail = self.log_tail()
            if "Address already in use" in tail and not self._started:
                raise _PortTaken(self.address)
            raise AssertionError(
                f"{self.address} exited with {self.process.returncode} while starting:\n{tail}"
            )
        try:
            if not await self.ask("PING", timeout=1.0):
                return False
            info = await self.ask("INFO", "server", timeout=1.0)
        except (OSError, RedisError):
            # Not listening yet, or LOADING an AOF.
            return False
        if int(info["process_id"]) != self.process.pid:
            # Another process answers on our port (free_port() can hand two nodes of
            # one cluster the same port): ours will exit with "Address already in use",
            # and a harness that took the other for it would configure one node twice.
            if self._started:
                raise AssertionError(f"{self.address} is answered by another process")
            self.process.kill()
            self.process.wait(STOP_GRACE)
            raise _PortTaken(self.address)
        return True

    def kill(self) -> None:
        """``kill -9`` and wait for the exit: no shutdown, no final write."""
        if self.running:
            self._stopped_by_us = True
            os.kill(self.pid, signal.SIGKILL)
            assert self.process is not None
            self.process.wait(STOP_GRACE)
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP: the process keeps its sockets but answers nothing."""
        os.kill(self.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        stop_all([self])


def stop_all(nodes: Iterable[EngineNode]) -> None:
    """Stop these processes: SIGCONT (if paused), SIGTERM, then SIGKILL after a grace.

    All are signalled first and reaped afterwards, so stopping N processes takes about
    as long as stopping the slowest one.
    """
    signalled = []
    for node in nodes:
        if node.running:
            node._stopped_by_us = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(node.pid, signal.SIGCONT)
                os.kill(node.pid, signal.SIGTERM)
            signalled.append(node)
        node.paused = False
    deadline = time.monotonic() + STOP_GRACE
    for node in signalled:
        assert node.process is not None
        try:
            node.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            node.process.kill()
            node.process.wait(STOP_GRACE)


# -- Redis Cluster -----------------------------------------------------------------------


def _crc16(data: bytes) -> int:
    """CRC16-CCITT (XMODEM), the checksum Redis Cluster hashes keys with."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        crc &= 0xFFFF
    return crc


@dataclass(frozen=True)
class _Entry:
    """One line of CLUSTER NODES."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    slots: tuple[tuple[int, int], ...]
    #: ``[slot->-id]`` / ``[slot-<-id]``: only on the ``myself`` line of a node that is
    #: migrating or importing.
    moving: frozenset[int]

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "handshake", "noaddr"})

    def owns(self, slot: int) -> bool:
        return any(low <= slot <= high for low, high in self.slots)


def _parse_nodes(text: str) -> dict[str, _Entry]:
    entries = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        slots, moving = [], set()
        for token in parts[8:]:
            if token.startswith("["):
                moving.add(int(token[1:].split("-", 1)[0]))
                continue
            low, _, high = token.partition("-")
            slots.append((int(low), int(high or low)))
        address = parts[1].split("@", 1)[0]
        entries[parts[0]] = _Entry(
            node_id=parts[0],
            port=int(address.rsplit(":", 1)[1] or 0),
            flags=frozenset(parts[2].split(",")),
            master_id=None if parts[3] == "-" else parts[3],
            slots=tuple(sorted(slots)),
            moving=frozenset(moving),
        )
    return entries


class ClusterEngine:
    """A Redis Cluster of ``primaries`` shards, each with ``replicas`` replicas."""

    def __init__(
        self,
        directory: Path,
        primaries: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 1000,
        appendonly: bool = False,
    ) -> None:
        if primaries < 1 or replicas < 0:
            raise ValueError("need at least one primary and no negative replica count")
        self.directory = directory
        self.node_timeout_ms = node_timeout_ms
        options = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(node_timeout_ms),
            # A replica may always fail over, however long it was cut off.
            "--cluster-replica-validity-factor",
            "0",
            # Shards stay as built: no replica moves to another primary, and a primary
            # that gives away its last slot stays a primary.
            "--cluster-allow-replica-migration",
            "no",
            # The other shards keep serving while one fails over.
            "--cluster-require-full-coverage",
            "no",
            "--repl-diskless-sync",
            "yes",
            "--repl-diskless-sync-delay",
            "0",
            "--appendonly",
            "yes" if appendonly else "no",
        ]
        if appendonly:
            options += ["--appendfsync", "always"]
        self._nodes = [
            EngineNode(directory / f"node-{index}", options=list(options), bus_port=free_port())
            for index in range(primaries * (1 + replicas))
        ]
        self._seeds = self._nodes[:primaries]
        # Shard i: primary i, replicas primaries + i*replicas ...
        self._layout = {
            primary: self._nodes[primaries + i * replicas : primaries + (i + 1) * replicas]
            for i, primary in enumerate(self._seeds)
        }
        self._ids: dict[str, EngineNode] = {}

    # -- addresses ----------------------------------------------------------------------

    @property
    def nodes(self) -> list[EngineNode]:
        return list(self._nodes)

    @property
    def seeds(self) -> list[str]:
        """The addresses of the primaries the cluster was built with."""
        return [node.address for node in self._seeds]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(self.seeds)

    def node_id(self, node: EngineNode) -> str:
        for node_id, known in self._ids.items():
            if known is node:
                return node_id
        raise KeyError(node.address)

    @staticmethod
    def keyslot(key: str | bytes) -> int:
        """The hash slot of ``key`` (with ``{hash tag}`` rules), computed locally."""
        data = key.encode() if isinstance(key, str) else key
        start = data.find(b"{")
        if start != -1:
            end = data.find(b"}", start + 1)
            if end > start + 1:
                data = data[start + 1 : end]
        return _crc16(data) % SLOTS

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start every node, build the shards and wait until the cluster is settled."""
        await asyncio.gather(*(node.start() for node in self._nodes))
        for node in self._nodes:
            self._ids[await node.ask("CLUSTER", "MYID")] = node
        count = len(self._seeds)
        bounds = [i * SLOTS // count for i in range(count + 1)]
        for index, node in enumerate(self._nodes):
            # Distinct epochs from the start, as redis-cli does, so that no epoch
            # collision has to be resolved (slowly) before the views agree.
            await node.ask("CLUSTER", "SET-CONFIG-EPOCH", index + 1)
        for index, primary in enumerate(self._seeds):
            await primary.ask("CLUSTER", "ADDSLOTSRANGE", bounds[index], bounds[index + 1] - 1)
        first = self._nodes[0]
        for node in self._nodes[1:]:
            await first.ask("CLUSTER", "MEET", HOST, node.port, node.bus_port)
        await eventually(self._everyone_met, timeout=WAIT_TIMEOUT, interval=POLL)
        for primary, replicas in self._layout.items():
            for replica in replicas:
                await replica.ask("CLUSTER", "REPLICATE", self.node_id(primary))
        await self.wait_ok()

    def stop(self) -> None:
        """Stop every process this cluster started."""
        stop_all(self._nodes)

    async def restart(self, node: EngineNode) -> None:
        """Start a killed node again; wait until it rejoined and the cluster is settled.

        A primary that failed over comes back as a replica of the node that took its
        slots (its ``nodes.conf`` keeps its identity; its data comes by full sync).
        """
        await node.start()
        await self.wait_ok()

    # -- what the cluster says ----------------------------------------------------------

    def _live(self) -> list[EngineNode]:
        return [node for node in self._nodes if node.live]

    async def _view_of(self, node: EngineNode) -> dict[str, _Entry]:
        return _parse_nodes(await node.ask("CLUSTER", "NODES"))

    async def _view(self) -> dict[str, _Entry]:
        """CLUSTER NODES of the first live node that answers."""
        errors = []
        for node in self._live():
            try:
                return await self._view_of(node)
            except (OSError, RedisError) as error:
                errors.append(f"{node.address}: {error!r}")
        raise AssertionError(f"no live cluster node answers: {errors}")

    def _node(self, node_id: str | None) -> EngineNode | None:
        return self._ids.get(node_id) if node_id is not None else None

    async def primaries(self) -> list[EngineNode]:
        """The current primaries (as the first live node sees them), without dead ones."""
        view = await self._view()
        found = {
            self._node(entry.node_id)
            for entry in view.values()
            if entry.is_master and not entry.failed
        }
        return [node for node in self._nodes if node in found and node.running]

    async def primary_of_slot(self, slot: int) -> EngineNode:
        """The node that owns ``slot`` (as the first live node sees it)."""
        view = await self._view()
        for entry in view.values():
            node = self._node(entry.node_id)
            if entry.is_master and entry.owns(slot) and node is not None:
                return node
        raise AssertionError(f"slot {slot} has no owner")

    async def replicas_of(self, primary: EngineNode) -> list[EngineNode]:
        """The running replicas of ``primary`` (as the first live node sees them)."""
        primary_id = self.node_id(primary)
        view = await self._view()
        found = {
            self._node(entry.node_id)
            for entry in view.values()
            if entry.master_id == primary_id and not entry.is_master and not entry.failed
        }
        return [node for node in self._nodes if node in found and node.running]

    async def _everyone_met(self) -> bool | _Pending:
        want = set(self._ids)
        for node in self._nodes:
            try:
                view = await self._view_of(node)
            except (OSError, RedisError) as error:
                return _Pending(f"{node.address}: {error!r}")
            known = {node_id for node_id, entry in view.items() if not entry.failed}
            if known != want:
                return _Pending(f"{node.address} knows {len(known)} of {len(want)} nodes")
        return True

    async def _state(
        self, node: EngineNode
    ) -> tuple[dict[str, str], dict[str, _Entry], dict[str, Any]]:
        async with node.client() as client:
            info = _info_lines(await client.execute_command("CLUSTER", "INFO"))
            view = _parse_nodes(await client.execute_command("CLUSTER", "NODES"))
            replication = await client.info("replication")
        return info, view, replication

    async def _settled(self) -> bool | _Pending:
        """Every live node: cluster_state ok, the same topology, all slots at live
        primaries, every replica's link up and seen online by its primary; dead nodes
        marked failed everywhere."""
        live = self._live()
        live_ids = {self.node_id(node) for node in live}
        dead_ids = (
            set(self._ids) - live_ids - {self.node_id(node) for node in self._nodes if node.paused}
        )
        answers = await asyncio.gather(
            *(self._state(node) for node in live), return_exceptions=True
        )
        topology = None
        states = {}
        for node, answer in zip(live, answers, strict=True):
            if isinstance(answer, BaseException):
                if isinstance(answer, OSError | RedisError):
                    return _Pending(f"{node.address}: {answer!r}")
                raise answer
            info, view, replication = answer
            states[node] = (view, replication)
            if info.get("cluster_state") != "ok":
                return _Pending(f"{node.address}: cluster_state {info.get('cluster_state')}")
            for node_id in dead_ids:
                if node_id in view and "fail" not in view[node_id].flags:
                    return _Pending(
                        f"{node.address} does not yet see {self._ids[node_id].address} as failed"
                    )
            shape = {}
            for node_id in live_ids:
                entry = view.get(node_id)
                if entry is None or entry.failed:
                    return _Pending(
                        f"{node.address} sees {self._ids[node_id].address} "
                        f"as {entry and sorted(entry.flags)}"
                    )
                shape[node_id] = (
                    "master" if entry.is_master else "replica",
                    entry.master_id,
                    entry.slots,
                )
            if topology is None:
                topology = shape
            elif shape != topology:
                return _Pending(f"{node.address} disagrees on the topology")
        if topology is None:
            return _Pending("no live node")
        covered = sum(
            high - low + 1
            for role, _, slots in topology.values()
            if role == "master"
            for low, high in slots
        )
        if covered != SLOTS:
            return _Pending(f"{covered} of {SLOTS} slots at live primaries")
        for node_id, (role, master_id, _) in topology.items():
            if role != "replica":
                continue
            node, primary = self._ids[node_id], self._node(master_id)
            if primary is None or primary not in states:
                return _Pending(f"{node.address} replicates a node that is not live")
            replication = states[node][1]
            if (
                replication.get("master_link_status") != "up"
                or replication.get("master_port") != primary.port
            ):
                return _Pending(f"{node.address}: link to {primary.address} not up")
            online = {
                entry.get("port")
                for name, entry in states[primary][1].items()
                if name.startswith("slave")
                and isinstance(entry, dict)
                and entry.get("state") == "online"
            }
            if node.port not in online:
                return _Pending(f"{primary.address} does not list {node.address} online")
        return True

    async def wait_ok(self, timeout: float = WAIT_TIMEOUT) -> None:
        """Wait until the cluster is settled: every live node says ``cluster_state:ok``
        and agrees on the topology, all 16384 slots are at live primaries, every replica
        is in sync, and the dead nodes are marked failed."""
        await eventually(self._settled, timeout=timeout, interval=POLL)

    # -- faults and changes -------------------------------------------------------------

    async def kill_primary(self, primary: EngineNode) -> EngineNode:
        """SIGKILL ``primary``; return the replica promoted in its place, once every
        surviving node routes its slots there and the cluster is settled."""
        view = await self._view()
        primary_id = self.node_id(primary)
        entry = view.get(primary_id)
        if entry is None or not entry.is_master or not entry.slots:
            raise ValueError(f"{primary.address} is not a primary with slots")
        candidates = {
            node_id
            for node_id, other in view.items()
            if other.master_id == primary_id and not other.failed
        }
        if not candidates:
            raise ValueError(f"{primary.address} has no replica to promote")
        slots = entry.slots
        primary.kill()

        async def promoted() -> EngineNode | _Pending:
            owners = set()
            for node in self._live():
                try:
                    async with node.client() as client:
                        view = _parse_nodes(await client.execute_command("CLUSTER", "NODES"))
                        # CLUSTER SLOTS is what cluster clients route by.
                        routes = await client.execute_command("CLUSTER", "SLOTS")
                except (OSError, RedisError) as error:
                    return _Pending(f"{node.address}: {error!r}")
                owner = {
                    other.node_id
                    for other in view.values()
                    if other.is_master
                    and not other.failed
                    and all(other.owns(low) and other.owns(high) for low, high in slots)
                }
                if len(owner) != 1 or not owner <= candidates:
                    return _Pending(f"{node.address} has no promoted replica yet")
                port = self._ids[next(iter(owner))].port
                routed = {
                    (int(route[0]), int(route[1])) for route in routes if int(route[2][1]) == port
                }
                if not all(any(a <= low and high <= b for a, b in routed) for low, high in slots):
                    return _Pending(f"{node.address} does not route the slots to {port}")
                owners |= owner
            if len(owners) != 1:
                return _Pending(f"the survivors disagree on the new primary: {owners}")
            return self._ids[owners.pop()]

        new = await eventually(promoted, timeout=WAIT_TIMEOUT, interval=POLL)
        assert isinstance(new, EngineNode)  # eventually() returns only a truthy result
        await self.wait_ok()
        return new

    async def migrate_slot(self, slot: int, target: EngineNode) -> None:
        """Move ``slot`` and its keys to primary ``target`` the way redis-cli reshards,
        and wait until every live node agrees that ``target`` owns it."""
        source = await self.primary_of_slot(slot)
        if source is target:
            return
        target_id, source_id = self.node_id(target), self.node_id(source)
        if target not in await self.primaries():
            raise ValueError(f"{target.address} is not a primary")
        await target.ask("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        await source.ask("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        while True:
            # Keys as bytes: they need not be UTF-8.
            keys = await source.ask("CLUSTER", "GETKEYSINSLOT", slot, MIGRATE_BATCH, decode=False)
            if not keys:
                break
            await source.ask(
                "MIGRATE",
                HOST,
                target.port,
                "",
                0,
                10_000,
                "KEYS",
                *keys,
                decode=False,
                timeout=scaled(15.0),
            )
        # Target first, then source, then everyone else: the order redis-cli uses, so
        # that no node redirects to a node that does not yet accept the slot.
        others = [node for node in await self.primaries() if node not in (source, target)]
        for node in (target, source, *others):
            await node.ask("CLUSTER", "SETSLOT", slot, "NODE", target_id)

        async def agreed() -> bool | _Pending:
            for node in self._live():
                try:
                    view = await self._view_of(node)
                except (OSError, RedisError) as error:
                    return _Pending(f"{node.address}: {error!r}")
                owners = [
                    entry.node_id for entry in view.values() if entry.is_master and entry.owns(slot)
                ]
                if owners != [target_id]:
                    return _Pending(f"{node.address} says slot {slot} is at {owners}")
                if any(slot in entry.moving for entry in view.values()):
                    return _Pending(f"{node.address} still migrates slot {slot}")
            return True

        await eventually(agreed, timeout=WAIT_TIMEOUT, interval=POLL)
        await self.wait_ok()


# -- Redis Sentinel ----------------------------------------------------------------------


class SentinelEngine:
    """A primary with ``replicas`` replicas, watched by three sentinels (quorum 2)."""

    def __init__(
        self,
        directory: Path,
        service: str = "tidings-test",
        replicas: int = 1,
        down_after_ms: int = 500,
        failover_timeout_ms: int = 2000,
        appendonly: bool = False,
    ) -> None:
        if replicas < 1:
            raise ValueError("a failover needs at least one replica")
        self.directory = directory
        self.service = service
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        options = [
            "--repl-diskless-sync",
            "yes",
            "--repl-diskless-sync-delay",
            "0",
            "--appendonly",
            "yes" if appendonly else "no",
        ]
        if appendonly:
            options += ["--appendfsync", "always"]
        self._primary = EngineNode(directory / "primary", options=list(options))
        self._replicas = [
            EngineNode(directory / f"replica-{index}", options=list(options))
            for index in range(replicas)
        ]
        self._data_nodes = [self._primary, *self._replicas]
        self.sentinels = [EngineNode(directory / f"sentinel-{index}") for index in range(3)]

    @property
    def url(self) -> str:
        return (
            "redis+sentinel://"
            + ",".join(node.address for node in self.sentinels)
            + f"/{self.service}"
        )

    @property
    def primary(self) -> EngineNode:
        return self._primary

    @property
    def replicas(self) -> list[EngineNode]:
        return list(self._replicas)

    @property
    def nodes(self) -> list[EngineNode]:
        """Every process: the data nodes (primary first as built) and the sentinels."""
        return [*self._data_nodes, *self.sentinels]

    async def start(self) -> None:
        """Start primary, replicas and sentinels; wait until every sentinel knows the
        primary, every replica and the two other sentinels."""
        await self._primary.start()
        for replica in self._replicas:
            # Set once the primary's port is final (start() may have picked another).
            replica.options += ["--replicaof", HOST, str(self._primary.port)]
        await asyncio.gather(*(replica.start() for replica in self._replicas))
        # Sentinels find replicas in the primary's INFO, read as soon as they connect:
        # the replicas must be attached by then, or they are found 10 s later.
        await eventually(self._replicated, timeout=WAIT_TIMEOUT, interval=POLL)
        for sentinel in self.sentinels:
            sentinel.sentinel_config = (
                f"sentinel monitor {self.service} {HOST} {self._primary.port} 2\n"
                f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {self.service} 1\n"
            )
        await asyncio.gather(*(sentinel.start() for sentinel in self.sentinels))
        await eventually(self._watching, timeout=WAIT_TIMEOUT, interval=POLL)

    def stop(self) -> None:
        """Stop every process: the sentinels first, so that none starts a failover."""
        stop_all(self.sentinels)
        stop_all(self._data_nodes)

    async def _replicated(self) -> bool | _Pending:
        try:
            primary = await self._primary.ask("INFO", "replication")
            online = {
                entry.get("port")
                for name, entry in primary.items()
                if name.startswith("slave")
                and isinstance(entry, dict)
                and entry.get("state") == "online"
            }
            for replica in self._replicas:
                if not replica.live:
                    continue
                info = await replica.ask("INFO", "replication")
                if (
                    info.get("master_port") != self._primary.port
                    or info.get("master_link_status") != "up"
                ):
                    return _Pending(f"{replica.address}: link to the primary not up")
                if replica.port not in online:
                    return _Pending(f"the primary does not list {replica.address} online")
        except (OSError, RedisError) as error:
            return _Pending(repr(error))
        return True

    async def _watching(self) -> bool | _Pending:
        want_replicas = {replica.address for replica in self._replicas}
        for sentinel in self.sentinels:
            others = {node.address for node in self.sentinels if node is not sentinel}
            try:
                async with sentinel.client() as client:
                    master = _fields(
                        await client.execute_command("SENTINEL", "MASTER", self.service)
                    )
                    replicas = [
                        _fields(entry)
                        for entry in await client.execute_command(
                            "SENTINEL", "REPLICAS", self.service
                        )
                    ]
                    peers = [
                        _fields(entry)
                        for entry in await client.execute_command(
                            "SENTINEL", "SENTINELS", self.service
                        )
                    ]
            except (OSError, RedisError) as error:
                return _Pending(f"sentinel {sentinel.address}: {error!r}")
            if (
                f"{master['ip']}:{master['port']}" != self._primary.address
                or master["flags"] != "master"
            ):
                return _Pending(f"sentinel {sentinel.address}: master {master}")
            seen = {
                f"{entry['ip']}:{entry['port']}"
                for entry in replicas
                if entry["flags"] == "slave" and entry.get("master-link-status") == "ok"
            }
            if seen != want_replicas:
                return _Pending(f"sentinel {sentinel.address} sees replicas {seen}")
            met = {
                f"{entry['ip']}:{entry['port']}" for entry in peers if entry["flags"] == "sentinel"
            }
            if met != others:
                return _Pending(f"sentinel {sentinel.address} sees sentinels {met}")
        return True

    async def current_primary_address(self) -> str:
        """``host:port`` of the primary, as the first sentinel that answers says."""
        errors = []
        for sentinel in self.sentinels:
            if not sentinel.live:
                continue
            try:
                host, port = await sentinel.ask("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
            except (OSError, RedisError, TypeError, ValueError) as error:
                errors.append(f"{sentinel.address}: {error!r}")
                continue
            return f"{host}:{port}"
        raise AssertionError(f"no sentinel answers: {errors}")

    async def kill_primary(self) -> EngineNode:
        """SIGKILL the primary; return the replica promoted in its place, once every
        sentinel names it and it answers ROLE as a master."""
        old = self._primary
        candidates = {replica.address: replica for replica in self._replicas if replica.live}
        old.kill()

        async def switched() -> EngineNode | _Pending:
            named = set()
            for sentinel in self.sentinels:
                if not sentinel.live:
                    continue
                try:
                    host, port = await sentinel.ask(
                        "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service
                    )
                except (OSError, RedisError) as error:
                    return _Pending(f"sentinel {sentinel.address}: {error!r}")
                named.add(f"{host}:{port}")
            if len(named) != 1 or not named <= candidates.keys():
                return _Pending(f"the sentinels name {sorted(named)}")
            new = candidates[named.pop()]
            try:
                role = await new.ask("ROLE")
            except (OSError, RedisError) as error:
                return _Pending(f"{new.address}: {error!r}")
            if _text(role[0]) != "master":
                return _Pending(f"{new.address} answers ROLE {role[0]}")
            return new

        new = await eventually(switched, timeout=WAIT_TIMEOUT, interval=POLL)
        assert isinstance(new, EngineNode)  # eventually() returns only a truthy result
        self._primary = new
        self._replicas = [replica for replica in self._replicas if replica is not new]
        if self._replicas:
            # With more replicas, the sentinels repoint them one by one (parallel-syncs).
            await eventually(self._replicated, timeout=WAIT_TIMEOUT, interval=POLL)
        return new


# -- scopes ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def cluster_scope(directory: Path, **options: Any) -> AsyncIterator[ClusterEngine]:
    """A started :class:`ClusterEngine` (``options`` as its keywords), always stopped."""
    engine = ClusterEngine(directory, **options)
    try:
        await engine.start()
        yield engine
    finally:
        engine.stop()


@contextlib.asynccontextmanager
async def sentinel_scope(directory: Path, **options: Any) -> AsyncIterator[SentinelEngine]:
    """A started :class:`SentinelEngine` (``options`` as its keywords), always stopped."""
    engine = SentinelEngine(directory, **options)
    try:
        await engine.start()
        yield engine
    finally:
        engine.stop()


__all__ = [
    "ClusterEngine",
    "EngineNode",
    "SentinelEngine",
    "cluster_scope",
    "sentinel_scope",
    "stop_all",
]
