"""Test configuration: make ``tests/helpers.py`` importable; the Redis fixtures that
many modules share."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

sys.path.insert(0, str(Path(__file__).parent))

if TYPE_CHECKING:
    from redis_support import RedisServer


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A unique key prefix on the shared Redis (REDIS_URL), removed afterwards; skips
    without Redis (fails with TIDINGS_REQUIRE_REDIS=1)."""
    from redis_support import prefix_scope

    async with prefix_scope() as prefix:
        yield prefix


@pytest.fixture
def redis_servers(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Starts private redis-servers on free ports; every one is stopped afterwards."""
    from redis_support import server_scope

    with server_scope(tmp_path) as make:
        yield make
