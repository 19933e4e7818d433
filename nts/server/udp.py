"""NTP over UDP: sockets read from the event loop with kernel receive timestamps.

Strategy: asyncio's datagram protocol cannot return ancillary data and costs several times a bare
loop, so each socket is non-blocking, registered with `loop.add_reader`, and drained in batches with
`recvmsg` (SO_TIMESTAMPNS gives the kernel's receive time as the cmsg). The per-packet path does
nothing but call the pipeline and send what it returns; the pipeline is looked up once per batch so
a reload can swap it between batches without touching the socket.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..core.decisions import Defer, Stats

if TYPE_CHECKING:
    from ..core.pipeline import Pipeline

log = logging.getLogger("ntsd.udp")

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux value; absent from the socket module
MAX_DATAGRAM = 4096  # larger requests are dropped as oversize
BATCH = 64  # datagrams handled per readiness event before yielding to the loop
_TIMESPEC = struct.Struct("@qq")
_ANC_SPACE = socket.CMSG_SPACE(_TIMESPEC.size)


def open_udp_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A bound, non-blocking UDP socket with kernel receive timestamps enabled."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class UdpListener:
    """Serves one bound socket through `get_pipeline()`'s current pipeline."""

    def __init__(
        self,
        sock: socket.socket,
        get_pipeline: Callable[[], Pipeline],
        on_drop: Callable[[str, tuple[str, int]], None] | None = None,
    ) -> None:
        self.sock = sock
        self.local = sock.getsockname()
        self._get_pipeline = get_pipeline
        self._on_drop = on_drop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.sock.fileno(), self._on_readable)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
            self._loop = None
        for task in self._tasks:
            task.cancel()
        self.sock.close()

    def _on_readable(self) -> None:
        pipeline = self._get_pipeline()
        handle = pipeline.handle
        recvmsg = self.sock.recvmsg
        sendto = self.sock.sendto
        unpack = _TIMESPEC.unpack_from
        local = self.local
        for _ in range(BATCH):
            try:
                data, anc, flags, addr = recvmsg(MAX_DATAGRAM, _ANC_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. ICMP errors reported on the socket
                pipeline.stats.inc(("socket_errors", exc.__class__.__name__))
                return
            if anc:
                sec, nsec = unpack(anc[0][2])
                rx = sec * 1_000_000_000 + nsec
            else:
                rx = time.time_ns()
            if flags & socket.MSG_TRUNC:
                pipeline.stats.inc(("drops", "oversize"))
                continue
            decision = handle(data, addr, rx, local)
            if type(decision) is bytes:
                try:
                    sendto(decision, addr)
                except OSError as exc:
                    pipeline.stats.inc(("socket_errors", exc.__class__.__name__))
            elif type(decision) is Defer:
                self._defer(pipeline, data, decision)
            elif self._on_drop is not None:
                self._on_drop(decision.reason, addr)  # type: ignore[union-attr]

    def _defer(self, pipeline: Pipeline, request: bytes, d: Defer) -> None:
        assert self._loop is not None
        task = self._loop.create_task(self._complete(pipeline, request, d))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _complete(self, pipeline: Pipeline, request: bytes, d: Defer) -> None:
        try:
            reply = await d.authenticator.complete(d.job)
            reason = "failed"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a plugin failure must cost one reply, never the listener
            log.warning("%s: deferred reply failed: %s", d.authenticator.name, exc)
            reply, reason = None, "error"
        final = pipeline.check_deferred(request, reply, d.authenticator.name, reason)
        if final is not None:
            try:
                self.sock.sendto(final, d.client)
            except OSError as exc:
                pipeline.stats.inc(("socket_errors", exc.__class__.__name__))

