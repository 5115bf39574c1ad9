"""Unit tests for tidings.outages: one warning line per kind and interval, counting the
lines it left out."""

from __future__ import annotations

import logging

import pytest

from fakes import FakeClock
from tidings.outages import MAX_KINDS, OutageLog

LOGGER = logging.getLogger("tests.outages")


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The messages logged through LOGGER."""
    return [r.getMessage() for r in caplog.records if r.name == LOGGER.name]


def test_repeats_within_the_interval_are_counted_not_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first line of a kind is logged; repeats within the interval are not, and the
    next line after it says how many were left out."""
    caplog.set_level("WARNING", logger=LOGGER.name)
    clock = FakeClock()
    log = OutageLog(LOGGER, 10.0, clock=clock)
    log.warn("broker down at connect", "timed out")
    for _ in range(4):
        clock.advance(2.0)
        log.warn("broker down at connect", "timed out")
    assert lines(caplog) == ["broker down at connect: timed out"]
    clock.advance(2.0)  # 10 s after the first line
    log.warn("broker down at connect", "connection refused")
    assert lines(caplog)[1:] == [
        "broker down at connect: connection refused (4 more since the previous such line, "
        "not logged)"
    ]
    assert all(r.levelname == "WARNING" and r.exc_info is None for r in caplog.records)


def test_kinds_are_limited_separately(caplog: pytest.LogCaptureFixture) -> None:
    """Each kind has its own interval: a second kind is logged at once."""
    caplog.set_level("WARNING", logger=LOGGER.name)
    clock = FakeClock()
    log = OutageLog(LOGGER, 10.0, clock=clock)
    log.warn("a", "x")
    log.warn("b", "y")
    log.warn("a", "x")
    assert lines(caplog) == ["a: x", "b: y"]


def test_kinds_remembered_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    """More kinds than MAX_KINDS forget the oldest, which is then logged again."""
    caplog.set_level("WARNING", logger=LOGGER.name)
    log = OutageLog(LOGGER, 10.0, clock=FakeClock())
    for index in range(MAX_KINDS + 1):
        log.warn(f"kind {index}", "r")
    assert len(log._kinds) == MAX_KINDS
    log.warn("kind 0", "r")
    assert lines(caplog).count("kind 0: r") == 2


def test_lines_at_another_level(caplog: pytest.LogCaptureFixture) -> None:
    """With ``level`` the lines are written at that level, rate-limited alike."""
    caplog.set_level("INFO", logger=LOGGER.name)
    log = OutageLog(LOGGER, 10.0, clock=FakeClock(), level=logging.INFO)
    for _ in range(3):
        log.warn("continuity lost for a channel", "telling its subscribers")
    assert lines(caplog) == ["continuity lost for a channel: telling its subscribers"]
    assert [r.levelname for r in caplog.records] == ["INFO"]
