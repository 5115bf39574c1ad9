"""Test configuration: each test marked with its rung (the folder it is in, see
tests/README.md); the per-test time limit scaled by ``TIDINGS_TEST_TIMEOUT_SCALE``; the
Redis fixtures that many modules share."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

# tests/ is on sys.path through pytest's ``pythonpath`` setting (pyproject.toml).
try:
    from timeouts import TIMEOUT_SCALE
except ValueError as exc:  # a bad TIDINGS_TEST_TIMEOUT_SCALE: one line, no traceback
    raise pytest.UsageError(str(exc)) from None

if TYPE_CHECKING:
    from redis_support import RedisServer


def _scaled_timeout(item: pytest.Item) -> pytest.MarkDecorator | None:
    """The item's pytest-timeout limit (its marker, else ``--timeout`` or the ini value)
    times TIMEOUT_SCALE, as a marker; None when there is no limit to scale."""
    marker = item.get_closest_marker("timeout")
    kwargs: dict[str, object] = {}
    base: object = None
    if marker is not None:
        kwargs = dict(marker.kwargs)
        base = marker.args[0] if marker.args else kwargs.pop("timeout", None)
    if base is None:
        base = item.config.getoption("timeout", None) or item.config.getini("timeout")
    try:
        seconds = float(base)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if seconds <= 0:  # 0 switches the limit off; scaling keeps it off
        return None
    return pytest.mark.timeout(seconds * TIMEOUT_SCALE, **kwargs)


#: The rungs of the ladder, cheapest first: a folder of tests/ and a marker each.
RUNGS = ("unit", "inprocess", "server", "redis", "browser")
#: Fixtures that need Redis: a test using one is marked ``redis`` on any rung.
REDIS_FIXTURES = frozenset({"redis_prefix", "redis_servers"})
TESTS = Path(__file__).resolve().parent


def _rung(item: pytest.Item) -> str | None:
    """The rung folder ``item``'s module is in; None for a test outside tests/.

    A test module in tests/ but in no rung's folder is refused: it would run in no rung
    (``make test`` runs the rungs by marker), so it must not go unnoticed.
    """
    try:
        parts = item.path.resolve().relative_to(TESTS).parts
    except ValueError:
        return None
    if len(parts) > 1 and parts[0] in RUNGS:
        return parts[0]
    raise pytest.UsageError(
        f"{item.path}: a test module belongs in one of the rung folders tests/"
        f"{{{','.join(RUNGS)}}}/ (see tests/README.md)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks every test with its rung, so ``pytest -m unit`` runs the unit rung; scales
    the per-test limit with the waits inside it (one scale for every bound)."""
    for item in items:
        rung = _rung(item)
        if rung is not None:
            item.add_marker(rung)
        # Test functions have fixturenames; other kinds of item do not.
        fixtures = getattr(item, "fixturenames", ())
        if rung != "redis" and REDIS_FIXTURES.intersection(fixtures):
            item.add_marker("redis")
        if TIMEOUT_SCALE != 1:
            scaled = _scaled_timeout(item)
            if scaled is not None:
                # In front of the item's own markers: get_closest_marker finds it first.
                item.add_marker(scaled, append=False)


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
