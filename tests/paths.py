"""Where things are, from any rung of the test tree: the tests/ folder and the repository."""

from __future__ import annotations

from pathlib import Path

__all__ = ["DATA", "REPO", "SRC", "TESTS"]

#: tests/, where the support modules and conftest.py live.
TESTS = Path(__file__).resolve().parent
#: The repository's root.
REPO = TESTS.parent
#: src/, the package's parent.
SRC = REPO / "src"
#: tests/data/, the fixed inputs some tests read.
DATA = TESTS / "data"
