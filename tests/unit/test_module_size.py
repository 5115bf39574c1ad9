"""No module of ``src/tidings`` grows past 500 lines: a longer one is split into coherent
modules (the house rule), not left to grow."""

from __future__ import annotations

from paths import SRC

PACKAGE = SRC / "tidings"
MAX_LINES = 500
#: The composition root stays small: coordination lives in modules of its own
#: (subscriptions.py, personal.py, commands.py, sweep.py).
GATEWAY_MAX_LINES = 300


def test_no_module_over_500_lines() -> None:
    """Every ``.py`` file under src/tidings has at most 500 lines."""
    sizes = {
        path.relative_to(PACKAGE).as_posix(): len(path.read_text().splitlines())
        for path in sorted(PACKAGE.rglob("*.py"))
    }
    assert "auth.py" in sizes  # the walk found the package
    too_long = {name: lines for name, lines in sizes.items() if lines > MAX_LINES}
    assert too_long == {}


def test_gateway_stays_under_300_lines() -> None:
    """gateway.py, the composition root, has fewer than 300 lines."""
    lines = len((PACKAGE / "gateway.py").read_text().splitlines())
    assert lines < GATEWAY_MAX_LINES
