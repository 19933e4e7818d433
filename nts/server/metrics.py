"""Prometheus text exposition of the pipeline's counters, over a tiny HTTP/1.0 endpoint.

Strategy: counters are (metric, label values...) tuples; `Descriptions` names the labels of each
metric and says what it and each gauge mean, merged from their owners' tables (the core's, the
shell's below, each plugin's `COUNTERS`/`GAUGES`) when the server starts. The endpoint reads one
bounded request line with a deadline and answers GET /metrics; anything else gets 404 or 400. It is
meant for a local address; where it is exposed, idle connections could otherwise hold descriptors
the NTS-KE listener needs, so at most `MAX_CLIENTS` are served at once (more are closed at once) and
the request line must come within `REQUEST_DEADLINE` seconds (a scraper sends it at once).
"""

from __future__ import annotations

import asyncio
import json
import logging
import platform
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.decisions import drop_reasons
from ..core.stats import CORE_COUNTERS, CORE_GAUGES, CORE_SERIES, CounterHelp, GaugeHelp, Key, SeriesHelp
from .procstats import HELP as PROCESS_HELP

log = logging.getLogger("ntsd.metrics")
MAX_CLIENTS = 32
REQUEST_DEADLINE = 2.0


# The shell's own counters and gauges (the core's are in nts.core.stats, plugins' on their classes).
SHELL_COUNTERS: CounterHelp = {
    "socket_errors": (("error",), "Errors reported by the NTP sockets."),
    "kernel_drops": (
        (),
        "Datagrams the kernel dropped, receive buffers full (not in requests): more load than served.",
    ),
    "io_calls": (("call",), "Batched listeners' recvmmsg and sendmmsg calls (requests per recvmmsg: the mean batch)."),
    "log_lines": (("level",), "Log lines written at warning level and above, by level (all processes)."),
    "interleaved_replies": ((), "Replies sent in interleaved mode (RFC 9769): transmit time of the previous reply."),
    "interleaved_unmatched": ((), "Requests that looked interleaved but named no reply of theirs: basic replies."),
    "interleaved_daemon_timestamps": ((), "Interleaved replies with the daemon's time (the kernel's not yet read)."),
    "tx_timestamps": (("source",), "Kernel transmit timestamps read (kernel), or that matched no reply (unmatched)."),
    "reloads": (
        ("outcome",),
        "Configuration reloads (SIGHUP): applied, failed (refused, or in part), unconfirmed (a worker too slow).",
    ),
}
SHELL_GAUGES: GaugeHelp = {
    "uptime_seconds": "Seconds since the server started.",
    "interleaved_timestamps": "Replies whose transmit time is kept for interleaved mode (per socket, bounded).",
    "tx_lag_seconds": "Median time from a reply's transmit timestamp to the kernel's, under load (measured).",
    "tx_correction_seconds": "What basic replies' transmit time is moved on by under load (0: measured only).",
    "tx_lag_idle_seconds": "Median time from a reply's transmit timestamp to the kernel's after a pause (measured).",
    "tx_correction_idle_seconds": "What basic replies' transmit time is moved on by after a pause, their median "
    "(correct_transmit; each reply's is the lag at its pace).",
    "workers": "Worker processes serving NTP.",
    "config_last_reload_successful": "1 when the last reload applied all of the files (or none was made), else 0.",
    "config_last_reload_success_timestamp_seconds": "When the files were last applied in full (start or reload).",
}


SHELL_SERIES: SeriesHelp = {
    "socket_errors": (("OSError",), ("ConnectionRefusedError",), ("PermissionError",)),
    "io_calls": (("recvmmsg",), ("sendmmsg",)),
    "tx_timestamps": (("kernel",), ("unmatched",)),
}


def zero_series(owners: Iterable[SeriesHelp], prefixes_off: Iterable[str] = ()) -> list[Key]:
    """The counter keys to serve at zero until counted: the core's and the shell's, each owner's
    (the configured plugins' SERIES) and a drop series for every drop reason the code knows, but
    those of plugins not configured (`prefixes_off`: their names)."""
    off = tuple(f"{name}_" for name in prefixes_off)
    keys: list[Key] = [("drops", reason) for reason in drop_reasons() if not reason.startswith(off)]
    for table in (CORE_SERIES, SHELL_SERIES, *owners):
        keys += [(metric, *labels) for metric, all_labels in table.items() for labels in all_labels]
    return keys


@dataclass(frozen=True)
class Descriptions:
    """Label names and help text of every metric the server may serve."""

    counters: dict[str, tuple[tuple[str, ...], str]] = field(default_factory=dict)
    gauges: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, owners: Iterable[tuple[CounterHelp, GaugeHelp]]) -> Descriptions:
        """The core's and the shell's, then each owner's (a plugin class's COUNTERS and GAUGES)."""
        merged = cls({**CORE_COUNTERS, **SHELL_COUNTERS}, {**CORE_GAUGES, **SHELL_GAUGES})
        for counters, gauges in owners:
            for name, described in counters.items():
                merged.counters.setdefault(name, described)
            for name, text in gauges.items():
                merged.gauges.setdefault(name, text)
        return merged


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(
    counts: Mapping[tuple[str, ...], int], gauges: Mapping[str, float], described: Descriptions | None = None
) -> str:
    described = described if described is not None else Descriptions.of(())
    by_metric: dict[str, list[tuple[tuple[str, ...], int]]] = {}
    for key, value in counts.items():
        by_metric.setdefault(key[0], []).append((key[1:], value))
    lines: list[str] = []
    for metric in sorted(by_metric):
        names, help_text = described.counters.get(metric, ((), ""))
        # counted in whole microseconds, shown in seconds (Prometheus's base unit)
        scale = 1e-6 if metric.endswith("_us") else None
        full = f"ntsd_{metric.removesuffix('_us') + '_seconds' if scale else metric}_total"
        if help_text:
            lines.append(f"# HELP {full} {help_text}")
        lines.append(f"# TYPE {full} counter")
        for labels, value in sorted(by_metric[metric]):
            shown = _number(value * scale) if scale else str(value)
            if labels:
                names_used = names if len(names) == len(labels) else tuple(f"l{i}" for i in range(len(labels)))
                inner = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names_used, labels, strict=True))
                lines.append(f"{full}{{{inner}}} {shown}")
            else:
                lines.append(f"{full} {shown}")
    for name in sorted(gauges):
        if name in described.gauges:
            lines.append(f"# HELP ntsd_{name} {described.gauges[name]}")
        lines.append(f"# TYPE ntsd_{name} gauge")
        lines.append(f"ntsd_{name} {_number(gauges[name])}")
    return "\n".join(lines) + "\n"


def render_process(values: Mapping[str, float]) -> str:
    """Process metrics under the names client libraries give them (no ntsd_ prefix)."""
    lines = []
    for name, value in values.items():
        kind, text = PROCESS_HELP[name]
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {_number(value)}"]
    return "\n".join(lines) + "\n" if lines else ""


def build_info(version: str) -> str:
    """ntsd_build_info: 1, with what the server is built of as labels (for dashboards and fleets)."""
    from OpenSSL import SSL  # here: importing this module must not initialise OpenSSL (see tlsconf)

    openssl = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(errors="replace")
    labels = {"version": version, "python": platform.python_version(), "openssl": openssl}
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    return (f"# HELP ntsd_build_info The ntsd version, and the Python and OpenSSL it runs on.\n"
            f"# TYPE ntsd_build_info gauge\nntsd_build_info{{{inner}}} 1\n")  # fmt: skip


def _number(value: float) -> str:
    """Every digit kept (%g's six lost an uptime's seconds after 11 days, and a timestamp's minutes)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def parse_text(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (for `ntsd status` and tests)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


class MetricsServer:
    """Serves `source()` (counts, gauges) as Prometheus text, and plugin reports as JSON."""

    def __init__(
        self,
        source: Callable[[], tuple[Mapping[tuple[str, ...], int], Mapping[str, float]]],
        reports: Callable[[], Mapping[str, Any]] = dict,
        described: Descriptions | None = None,
        reports_on: bool = False,
        extra: Callable[[], str] = str,
    ) -> None:
        self._source = source
        self._extra = extra  # more exposition text, as is (process metrics, build info)
        self._reports = reports
        self._described = described if described is not None else Descriptions.of(())
        self.reports_on = reports_on  # /report/NAME names clients and keys: off unless configured
        self._server: asyncio.Server | None = None
        self.active = 0
        self.refused = 0

    async def start_on(self, sock: socket.socket) -> None:
        self._server = await asyncio.start_server(self._serve, sock=sock, limit=8192)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.active >= MAX_CLIENTS:
            self.refused += 1
            writer.close()
            return
        self.active += 1
        try:
            async with asyncio.timeout(REQUEST_DEADLINE):  # not wait_for, which can swallow a cancellation
                line = await reader.readline()
            parts = line.decode("latin-1").split()
            if len(parts) < 2 or parts[0] != "GET":
                status, body = "400 Bad Request", "bad request\n"
            elif parts[1] in ("/metrics", "/"):
                status, body = "200 OK", render(*self._source(), self._described) + self._extra()
            elif parts[1].startswith("/report/") and not self.reports_on:
                status, body = "404 Not Found", "reports are off (metrics.reports: false)\n"
            elif parts[1].startswith("/report/") and parts[1][8:] in (reports := self._reports()):
                status, body = "200 OK", json.dumps(reports[parts[1][8:]], indent=1) + "\n"
            elif parts[1].startswith("/report/"):
                known = ", ".join(sorted(reports)) or "none: no section that keeps one is configured"
                status, body = "404 Not Found", f"no report {parts[1][8:]!r} (reports: {known})\n"
            else:
                status, body = "404 Not Found", "not found\n"
            payload = body.encode()
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            async with asyncio.timeout(5):
                await writer.drain()
        except (TimeoutError, ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            self.active -= 1
            writer.close()
