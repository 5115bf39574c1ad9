"""Log lines about expected outages: one line each (a warning unless told otherwise),
rate-limited per kind.

A broker outage is an expected event in a deployment, not a bug: it deserves one line
with the reason, not a traceback per connection. During an outage the same failure
repeats for every connection and every command, so each kind of line is written at most
once per interval, and the next one says how many were left out meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["OutageLog"]

#: Seconds between two lines of one kind.
INTERVAL = 10.0
#: Kinds remembered at once; kinds are fixed strings in the code, so this is only a bound.
MAX_KINDS = 64


class OutageLog:
    """Rate-limited lines: ``warn(kind, reason)`` logs ``"<kind>: <reason>"`` at ``level``
    unless a line of the same ``kind`` was logged less than ``interval`` seconds ago; the
    next line logged for that kind counts the ones left out.

    ``kind`` must come from a fixed set (it is a dictionary key) and neither it nor
    ``reason`` may hold secrets: reasons are the messages of ``TidingsError`` instances,
    which name no password, token or key.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = INTERVAL,
        *,
        clock: Callable[[], float] = time.monotonic,
        level: int = logging.WARNING,
    ) -> None:
        self._logger = logger
        self._level = level
        self._interval = interval
        self._clock = clock
        # kind -> (when its last line was logged, lines suppressed since)
        self._kinds: dict[str, tuple[float, int]] = {}

    def warn(self, kind: str, reason: str) -> None:
        now = self._clock()
        last = self._kinds.get(kind)
        if last is not None and now - last[0] < self._interval:
            self._kinds[kind] = (last[0], last[1] + 1)
            return
        suppressed = last[1] if last is not None else 0
        if last is None and len(self._kinds) >= MAX_KINDS:
            self._kinds.pop(next(iter(self._kinds)))
        self._kinds[kind] = (now, 0)
        if suppressed:
            self._logger.log(
                self._level,
                "%s: %s (%d more since the previous such line, not logged)",
                kind,
                reason,
                suppressed,
            )
        else:
            self._logger.log(self._level, "%s: %s", kind, reason)
