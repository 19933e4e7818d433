"""Log lines that cannot flood, and a count of the serious ones for the metrics.

Strategy: under a flood (spoofed packets, a KE connection storm) every event is still counted in
the metrics, but the log gets at most one line per event kind per `interval`, saying how many were
not written since the last one. `LINES` counts the warnings and errors each process writes, so an
operator can alert on a rise (a reload half refused, a certificate unusable, a signer gone) without
reading the log.
"""

from __future__ import annotations

import logging
import time


class LevelCounter(logging.Handler):
    """Counts the records at WARNING and above that reach the root logger, by level name."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: dict[tuple[str, ...], int] = {}
        self.reset()

    def reset(self) -> None:
        """Start from zero, with both usual levels present (a series that appears only at its first
        error has no increase in Prometheus, so an alert on it would never fire)."""
        self.counts = {("log_lines", "warning"): 0, ("log_lines", "error"): 0}

    def emit(self, record: logging.LogRecord) -> None:
        key = ("log_lines", record.levelname.lower())
        self.counts[key] = self.counts.get(key, 0) + 1

    def errors(self) -> int:
        return self.counts.get(("log_lines", "error"), 0) + self.counts.get(("log_lines", "critical"), 0)


LINES = LevelCounter()


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
