"""Log lines that cannot flood: one line per kind of event per interval, with the count left out.

Strategy: under a flood (spoofed packets, a KE connection storm) every event is still counted in
the metrics, but the log gets at most one line per event kind per `interval`, saying how many were
not written since the last one.
"""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, interval: float = 10.0, level: int = logging.INFO) -> None:
        self._log = logger
        self._interval = interval
        self._level = level
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self._interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last[kind] = now
        more = self._suppressed.pop(kind, 0)
        if more:
            self._log.log(self._level, message + " (%d more since the last such line)", *args, more)
        else:
            self._log.log(self._level, message, *args)
