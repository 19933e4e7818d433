"""The asyncio client for Samba's ntp_signd socket.

Strategy: `connections` workers each keep one unix-socket connection and carry one request at a
time: Samba answers in order and, for a disabled or non-trust account, drops the connection
without a reply, so one request per connection confines that loss to the request that caused it.
Requests wait in one bounded queue (full: refused at once); each has a deadline covering queueing
and signing; a worker whose connection fails or stalls reconnects with exponential backoff
(0.1 s doubling to 5 s), so signing resumes soon after Samba restarts, with no restart of ours. An
idle connection is watched too, so one that Samba closed (a restart) is replaced before a request
would be lost on it.
Every outcome is counted by reason; the signing delay is summed for an average in the metrics.
Nothing here blocks the event loop, so NTS, MAC and plain clients are unaffected by Samba.
The transmit time a client is served must not depend on other clients: a request may carry a
builder instead of a packet, called by the worker right before the request goes to Samba, so the
time spent queued is never in it; the builder is given `compensation_ns()`, an estimate of Samba's
round trip alone (write to signed reply, a running average), capped at `max_compensation_ns` and
halved for every `COMPENSATION_HALF_LIFE_S` without a fresh measurement, so neither a burst nor a
slow spell can move the time served by more than the cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nts.core.stats import Counters
from nts.wire.errors import ParseError

from .signd import ReplyReader, SignedReply, check_signed, encode_request

log = logging.getLogger("ntsd.mssntp")
BACKOFF_START = 0.1
BACKOFF_MAX = 5.0
MAX_COMPENSATION_NS = 1_000_000  # the most the transmit time is moved on for Samba's round trip
COMPENSATION_HALF_LIFE_S = 10.0
Builder = Callable[[int], bytes]  # compensation (ns) -> the 48-byte reply to sign


@dataclass
class _Job:
    key_id: int
    packet: bytes | Builder
    future: asyncio.Future[bytes | None]
    queued: float = field(default_factory=time.monotonic)


class SigndClient:
    """Signs 48-byte replies through ntp_signd; `sign` returns the 68-byte packet or None."""

    def __init__(
        self,
        path: Path,
        stats: Counters,
        connections: int = 4,
        queue_size: int = 256,
        deadline: float = 1.0,
        max_compensation_ns: int = MAX_COMPENSATION_NS,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.path = path
        self.stats = stats
        self.connections = connections
        self.deadline = deadline
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(queue_size)
        self._workers: list[asyncio.Task[None]] = []
        self._next_id = 0
        self.connected = 0
        self.last_failure = ""
        self.max_compensation_ns = max_compensation_ns
        self.clock = clock
        self.round_trip_ns = 0  # running average of Samba's round trips (EWMA, 1/8), measured...
        self._measured_at = 0  # ...last at this clock() reading

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._workers = [loop.create_task(self._worker(i)) for i in range(self.connections)]

    async def stop(self) -> None:
        for task in self._workers:
            task.cancel()
        for outcome in await asyncio.gather(*self._workers, return_exceptions=True):
            if not isinstance(outcome, (asyncio.CancelledError, type(None))):  # a stop must not fail on it
                log.debug("ntp_signd connection ended with %r while stopping", outcome)
        self._workers = []
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_result(None)

    def compensation_ns(self) -> int:
        """Samba's recent round trip, capped, halved per half-life since it was last measured."""
        if not self.round_trip_ns:
            return 0
        age_s = max(0, self.clock() - self._measured_at) / 1e9
        return int(min(self.round_trip_ns, self.max_compensation_ns) * 0.5 ** (age_s / COMPENSATION_HALF_LIFE_S))

    async def sign(self, key_id: int, packet: bytes | Builder) -> bytes | None:
        """The signed 68-byte packet, or None. `packet`: the reply to sign, or a builder called with
        `compensation_ns()` right before the request is written to Samba."""
        future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Job(key_id, packet, future))
        except asyncio.QueueFull:
            self._count("queue_full")
            return None
        try:
            async with asyncio.timeout(self.deadline):  # (3.11's wait_for can swallow a cancellation)
                return await asyncio.shield(future)
        except TimeoutError:
            if not future.done():
                future.cancel()  # a worker that has not taken it yet will skip it
            self._count("timeout")
            return None

    def _count(self, outcome: str) -> None:
        self.stats.inc(("mssntp_sign", outcome))

    async def _worker(self, index: int) -> None:
        backoff = BACKOFF_START
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.path))
            except OSError as exc:
                self._note_failure(f"cannot connect to {self.path}: {exc.strerror or exc}")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = BACKOFF_START
            self.connected += 1
            if self.last_failure:
                log.info("connected to ntp_signd at %s again", self.path)
                self.last_failure = ""
            self._count("connects")
            try:
                await self._serve(reader, writer)
            except (OSError, asyncio.IncompleteReadError, ParseError, TimeoutError) as exc:
                why = f"{exc.__class__.__name__} ({exc})" if str(exc) else exc.__class__.__name__
                self._note_failure(f"ntp_signd connection lost: {why}")
            finally:
                self.connected -= 1
                writer.close()
                with contextlib.suppress(OSError, ConnectionError):
                    await writer.wait_closed()

    def _note_failure(self, message: str) -> None:
        if message != self.last_failure:  # one line per kind of failure, not one per retry
            log.warning("%s; MS-SNTP requests are dropped until it is back", message)
            self.last_failure = message

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frames = ReplyReader()
        while True:
            job = await self._next_job(reader)
            if job.future.done():  # timed out while queued
                continue
            packet_id = self._next_id = (self._next_id + 1) & 0xFFFF
            packet = job.packet if isinstance(job.packet, bytes) else job.packet(self.compensation_ns())
            sent = self.clock()
            writer.write(encode_request(packet_id, job.key_id, packet))
            try:
                replies: list[SignedReply] = []
                # one deadline for the whole exchange (not wait_for: see sign()), not one per read: a
                # signer trickling a frame byte by byte must not hold the connection past it
                async with asyncio.timeout(self.deadline * 2):
                    await writer.drain()
                    while not replies:
                        chunk = await reader.read(4096)
                        if not chunk:
                            self._finish(job, None, "connection_closed")  # Samba: disabled account and such
                            raise ConnectionResetError("closed by ntp_signd")
                        replies = frames.feed(chunk)
            except BaseException:
                self._finish(job, None, "connection_lost")
                raise
            if len(replies) != 1 or replies[0].packet_id != packet_id:  # out of step: start afresh
                self._finish(job, None, "protocol_error")
                raise ConnectionResetError("ntp_signd replied out of step")
            signed = check_signed(replies[0], packet_id, job.key_id, packet)
            if signed is not None:
                self._measured(self.clock() - sent)
            self._finish(job, signed, "signed" if signed is not None else "refused")

    async def _next_job(self, reader: asyncio.StreamReader) -> _Job:
        """The next request, while watching the idle connection: ntp_signd closing it (a Samba restart)
        is noticed and the connection replaced now, rather than by losing the next request on it."""
        get = asyncio.ensure_future(self._queue.get())
        watch = asyncio.ensure_future(reader.read(1))
        try:
            await asyncio.wait((get, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            pending = [task for task in (get, watch) if not task.done()]
            for task in pending:
                task.cancel()  # safe for both: a queued request or buffered byte stays where it was
            if pending:  # let them end before the stream is read again (one reader at a time)
                await asyncio.wait(pending)
        if watch.cancelled():
            return get.result()
        if not get.cancelled():  # both at once: the request waits for the next connection
            job = get.result()
            try:
                self._queue.put_nowait(job)
            except asyncio.QueueFull:
                self._finish(job, None, "connection_lost")
        self._count("idle_connection_lost")
        data = watch.result()  # raises the connection's error, if it failed
        raise ConnectionResetError("data from ntp_signd while idle" if data else "closed by ntp_signd while idle")

    def _finish(self, job: _Job, result: bytes | None, outcome: str) -> None:
        if job.future.done():
            return
        job.future.set_result(result)
        self._count(outcome)
        if result is not None:  # the whole delay (queue + Samba), for the metrics
            self.stats.inc(("mssntp_sign_delay_us",), int((time.monotonic() - job.queued) * 1e6))

    def _measured(self, round_trip_ns: int) -> None:
        self.round_trip_ns += (round_trip_ns - self.round_trip_ns) // 8 if self.round_trip_ns else round_trip_ns
        self._measured_at = self.clock()
