"""The one scalable bound for "this should happen" waits in the tests.

``TIDINGS_TEST_TIMEOUT_SCALE`` (default 1) multiplies every such wait and the per-test
pytest-timeout limit (tests/conftest.py), so a slow or loaded machine can give the same
tests more time without editing them. Waits whose length is the behaviour under test
("nothing arrives within 0.3 s", a configured heartbeat) stay literal and unscaled.

No tidings import here: conftest.py reads it before any test module is collected.
"""

from __future__ import annotations

import os

__all__ = ["TIMEOUT", "TIMEOUT_SCALE", "scaled"]


def _scale() -> float:
    raw = os.environ.get("TIDINGS_TEST_TIMEOUT_SCALE", "1")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"TIDINGS_TEST_TIMEOUT_SCALE must be a number, not {raw!r}") from None
    if not value > 0:  # also refuses nan
        raise ValueError(f"TIDINGS_TEST_TIMEOUT_SCALE must be above 0, not {raw!r}")
    return value


#: The factor every bound below is multiplied by.
TIMEOUT_SCALE = _scale()


def scaled(seconds: float) -> float:
    """``seconds`` times ``TIDINGS_TEST_TIMEOUT_SCALE``: for bounds longer than TIMEOUT
    (a subprocess, a Redis cluster forming)."""
    return seconds * TIMEOUT_SCALE


#: How long a test waits for something that should happen (a message, a close, a task).
TIMEOUT = scaled(10.0)
