"""Self-tests of the Redis Cluster and Sentinel harness in ``redis_engines``."""

from __future__ import annotations

from pathlib import Path

import pytest
from redis.exceptions import MovedError

from redis_engines import ClusterEngine, cluster_scope, sentinel_scope


async def test_cluster_forms_and_serves_hash_tagged_keys(tmp_path: Path) -> None:
    """A 3x1 cluster forms, keyslot() agrees with CLUSTER KEYSLOT, and a key is served."""
    async with cluster_scope(tmp_path) as cluster:
        primaries = await cluster.primaries()
        assert len(primaries) == 3
        for primary in primaries:
            assert len(await cluster.replicas_of(primary)) == 1
        assert cluster.url == "redis+cluster://" + ",".join(cluster.seeds)
        for node in cluster.nodes:
            assert (node.directory / "nodes.conf").exists()

        key = "{tidings}:stream"
        owner = await cluster.primary_of_slot(ClusterEngine.keyslot(key))
        async with owner.client() as client:
            # Hash tags, empty tags, a second tag, bytes and non-ASCII, against the server.
            for probe in (
                key,
                "{tidings}:other",
                "123456789",
                "foo",
                "{}x",
                "a{b}c{d}",
                "{",
                "x}{y",
                "ключ",
                b"\xff{\x00}",
            ):
                server = await client.execute_command("CLUSTER", "KEYSLOT", probe)
                assert ClusterEngine.keyslot(probe) == server, probe
            assert ClusterEngine.keyslot("123456789") == 0x31C3
            await client.set(key, "value")
            assert await client.get(key) == "value"
        other = next(node for node in primaries if node is not owner)
        async with other.client() as client:
            # redis-py turns the MOVED reply into MovedError("<slot> <host:port>").
            with pytest.raises(MovedError, match=f"^{ClusterEngine.keyslot(key)} {owner.address}$"):
                await client.get(key)
    # Leaving the scope stopped every process.
    assert all(
        node.process is not None and node.process.poll() is not None for node in cluster.nodes
    )


async def test_cluster_kill_primary_promotes_its_replica(tmp_path: Path) -> None:
    """kill_primary promotes the replica, which holds the replicated key; restart rejoins."""
    async with cluster_scope(tmp_path) as cluster:
        key = "{killed}:key"
        slot = ClusterEngine.keyslot(key)
        primary = await cluster.primary_of_slot(slot)
        [replica] = await cluster.replicas_of(primary)
        async with primary.client() as client:
            await client.set(key, "before")
            # Acknowledged by the replica, so the failover cannot lose it.
            assert await client.execute_command("WAIT", 1, 1000) == 1

        promoted = await cluster.kill_primary(primary)

        assert promoted is replica
        assert await cluster.primary_of_slot(slot) is promoted
        async with promoted.client() as client:
            assert (await client.execute_command("ROLE"))[0] == "master"
            assert await client.get(key) == "before"
            await client.set(key, "after")

        await cluster.restart(primary)
        assert await cluster.replicas_of(promoted) == [primary]
        async with primary.client() as client:
            assert (await client.execute_command("ROLE"))[0] == "slave"


async def test_cluster_migrate_slot_moves_keys(tmp_path: Path) -> None:
    """migrate_slot moves a slot with keys: the target serves them, the source says MOVED."""
    async with cluster_scope(tmp_path) as cluster:
        slot = ClusterEngine.keyslot("{moved}")
        source = await cluster.primary_of_slot(slot)
        target = next(node for node in await cluster.primaries() if node is not source)
        # More keys than one MIGRATE batch carries.
        keys = [f"{{moved}}:{index}" for index in range(250)]
        async with source.client() as client:
            await client.mset({key: key.upper() for key in keys})

        await cluster.migrate_slot(slot, target)

        assert await cluster.primary_of_slot(slot) is target
        async with target.client() as client:
            assert await client.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 250
            assert await client.mget(keys) == [key.upper() for key in keys]
        async with source.client() as client:
            assert await client.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
            with pytest.raises(MovedError, match=f"^{slot} {target.address}$"):
                await client.get(keys[0])


async def test_sentinel_kill_primary_fails_over_to_the_replica(tmp_path: Path) -> None:
    """Sentinel kill_primary: the sentinels name the old replica, a master with the data."""
    async with sentinel_scope(tmp_path) as sentinel:
        old = sentinel.primary
        [replica] = sentinel.replicas
        assert await sentinel.current_primary_address() == old.address
        assert sentinel.url == (
            "redis+sentinel://"
            + ",".join(node.address for node in sentinel.sentinels)
            + "/tidings-test"
        )
        async with old.client() as client:
            await client.set("before", "failover")
            # Acknowledged by the replica, so the failover cannot lose it.
            assert await client.execute_command("WAIT", 1, 1000) == 1

        promoted = await sentinel.kill_primary()

        assert promoted is replica
        assert sentinel.primary is replica
        assert await sentinel.current_primary_address() == replica.address
        async with replica.client() as client:
            assert (await client.execute_command("ROLE"))[0] == "master"
            assert await client.get("before") == "failover"
            await client.set("after", "failover")
