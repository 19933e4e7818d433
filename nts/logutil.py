"""Log lines that cannot flood, a count of the serious ones for the metrics, and the log's formats.

Strategy: under a flood (spoofed packets, a KE connection storm) every event is still counted in
the metrics, but the log gets at most one line per event kind per `interval`, saying how many were
not written since the last one. `LINES` counts the warnings and errors each process writes, so an
operator can alert on a rise (a reload half refused, a certificate unusable, a signer gone) without
reading the log.

Formats: `text` (local time with its UTC offset, then `ntsd[PID]`, and the worker when there are
workers), the same without time and with syslog priority prefixes (`<6>`) when standard error is
the journal (systemd sets JOURNAL_STREAM; journald then keeps each line's level and adds the time
itself), and `json`, one object per line, for log shippers. With workers, the first worker speaks
for all of them: the others write only their own warnings, errors and debug lines (`CONTEXT`), so a reload is
logged once and the supervisor names what serves where.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

ALIKE = {"alike": True}  # `extra=` for a warning every process would write the same way (the clock state)
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class Context(logging.Filter):
    """Names the process on each record (`role`: '' or ' worker 2/4'); in a worker that does not speak
    for all (`quiet`), lets through only warnings and errors of its own (and debug lines, when the
    log level asks for them)."""

    def __init__(self) -> None:
        super().__init__()
        self.role, self.quiet = "", False

    def worker(self, index: int, count: int) -> None:
        self.role, self.quiet = f" worker {index + 1}/{count}", index > 0

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = self.role
        if not self.quiet:
            return True
        return not getattr(record, "alike", False) and not logging.INFO <= record.levelno < logging.WARNING


CONTEXT = Context()


def _local_time(created: float) -> str:
    """2026-12-05T02:22:28.561+0000: local time that says which zone it is in."""
    tm = time.localtime(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", tm) + f".{int(created % 1 * 1000):03d}" + time.strftime("%z", tm)


class TextFormatter(logging.Formatter):
    def __init__(self, journal: bool = False) -> None:
        super().__init__("%(message)s")
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        role = getattr(record, "role", "")
        if self.journal:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{record.name}{role}: {text}"
        return f"{_local_time(record.created)} ntsd[{record.process}]{role} {record.levelname} {record.name}: {text}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": _local_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        role = getattr(record, "role", "")
        if role:
            out["worker"] = role.strip().removeprefix("worker ")
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def stderr_is_journal() -> bool:
    """Whether standard error is connected to journald (JOURNAL_STREAM names its device:inode)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def formatter(fmt: str, to_stderr: bool) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    return TextFormatter(journal=to_stderr and stderr_is_journal())


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
