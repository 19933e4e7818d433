"""The log's formats: text with the zone, journald priorities without time, JSON; workers' roles."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import pytest

from nts.logutil import ALIKE, Context, JsonFormatter, TextFormatter, stderr_is_journal


def record(level: int = logging.INFO, message: str = "serving NTP on %s", **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("ntsd", level, __file__, 1, message, ("127.0.0.1:123",), None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_text_lines_carry_the_time_zone() -> None:
    """The time had no zone: a log read next to another host's could not be lined up."""
    line = TextFormatter().format(record())
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d{4} ntsd\[\d+\] INFO ntsd: serving NTP on 127\.0\.0\.1:123", line
    ), line


@pytest.mark.parametrize(("level", "prefix"), [(logging.ERROR, "<3>"), (logging.WARNING, "<4>"), (logging.INFO, "<6>")])
def test_under_journald_lines_have_priorities_and_no_time(level: int, prefix: str) -> None:
    assert TextFormatter(journal=True).format(record(level, role=" worker 2/2")) == (
        f"{prefix}ntsd worker 2/2: serving NTP on 127.0.0.1:123"
    )


def test_journal_stream_is_recognised_only_when_it_is_our_standard_error() -> None:
    st = os.fstat(2)
    code = "from nts.logutil import stderr_is_journal; print(stderr_is_journal())"
    for stream, expected in ((f"{st.st_dev}:{st.st_ino}", "True"), ("1:2", "False"), ("junk", "False")):
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "JOURNAL_STREAM": stream},
                             stdout=subprocess.PIPE, text=True).stdout  # fmt: skip
        assert out.strip() == expected, stream
    assert stderr_is_journal() is ("JOURNAL_STREAM" in os.environ and stderr_is_journal())


def test_json_lines_are_one_object_each() -> None:
    doc = json.loads(JsonFormatter().format(record(logging.WARNING, role=" worker 1/4")))
    assert doc["level"] == "warning" and doc["message"] == "serving NTP on 127.0.0.1:123"
    assert doc["worker"] == "1/4" and doc["logger"] == "ntsd" and doc["pid"] == os.getpid()
    assert "\n" not in JsonFormatter().format(record(message="two\nlines %s"))


def test_only_the_first_worker_speaks_for_all() -> None:
    first, other = Context(), Context()
    first.worker(0, 2)
    other.worker(1, 2)
    assert first.filter(record()) and not other.filter(record())  # info: once
    assert other.filter(record(logging.ERROR))  # its own troubles: always
    assert other.filter(record(logging.DEBUG))  # asked for everything: everything
    assert not other.filter(record(logging.WARNING, **ALIKE))  # the same clock warning as the first's
    assert first.filter(record(logging.WARNING, **ALIKE))
