"""Prometheus text exposition of the pipeline's counters, over a tiny HTTP/1.0 endpoint.

Strategy: counters are (metric, label values...) tuples; `LABELS` names the labels of each metric
so plugins can add their own. The endpoint reads one bounded request line with a deadline and
answers GET /metrics; anything else gets 404 or 400. It is meant for a local address.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Mapping

log = logging.getLogger("ntsd.metrics")

# metric -> (label names, help text)
LABELS: dict[str, tuple[tuple[str, ...], str]] = {
    "requests": ((), "Datagrams received on NTP sockets."),
    "replies": (("auth",), "Time replies sent, by authentication mode."),
    "drops": (("reason",), "Datagrams not answered with time, by reason."),
    "kod": (("code",), "Kiss-o'-Death replies sent, by kiss code."),
    "naks": (("auth", "reason"), "Negative authentication replies sent (crypto-NAK, NTS NAK)."),
    "deferred": (("auth",), "Replies handed to an asynchronous signer."),
    "socket_errors": (("error",), "Errors reported by the NTP sockets."),
    "nts_ke": (("event",), "NTS-KE sessions: connections, outcomes (ok_aead_N, error_*), refusals, timeouts."),
}


def describe(metric: str, labels: tuple[str, ...], help_text: str) -> None:
    """Let a plugin declare a counter of its own."""
    LABELS.setdefault(metric, (labels, help_text))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(counts: Mapping[tuple[str, ...], int], gauges: Mapping[str, float]) -> str:
    by_metric: dict[str, list[tuple[tuple[str, ...], int]]] = {}
    for key, value in counts.items():
        by_metric.setdefault(key[0], []).append((key[1:], value))
    lines: list[str] = []
    for metric in sorted(by_metric):
        names, help_text = LABELS.get(metric, ((), ""))
        full = f"ntsd_{metric}_total"
        if help_text:
            lines.append(f"# HELP {full} {help_text}")
        lines.append(f"# TYPE {full} counter")
        for labels, value in sorted(by_metric[metric]):
            if labels:
                names_used = names if len(names) == len(labels) else tuple(f"l{i}" for i in range(len(labels)))
                inner = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names_used, labels, strict=True))
                lines.append(f"{full}{{{inner}}} {value}")
            else:
                lines.append(f"{full} {value}")
    for name in sorted(gauges):
        lines.append(f"# TYPE ntsd_{name} gauge")
        lines.append(f"ntsd_{name} {gauges[name]:g}")
    return "\n".join(lines) + "\n"


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
    """Serves `source()` (counts, gauges) as Prometheus text."""

    def __init__(self, source: Callable[[], tuple[Mapping[tuple[str, ...], int], Mapping[str, float]]]) -> None:
        self._source = source
        self._server: asyncio.Server | None = None

    async def start_on(self, sock: socket.socket) -> None:
        self._server = await asyncio.start_server(self._serve, sock=sock, limit=8192)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            parts = line.decode("latin-1").split()
            if len(parts) < 2 or parts[0] != "GET":
                status, body = "400 Bad Request", "bad request\n"
            elif parts[1] in ("/metrics", "/"):
                status, body = "200 OK", render(*self._source())
            else:
                status, body = "404 Not Found", "not found\n"
            payload = body.encode()
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + payload
            )
            await asyncio.wait_for(writer.drain(), 5)
        except (TimeoutError, ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()
