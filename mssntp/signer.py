"""The client of Samba's ntp_signd socket: a thread of its own, niced, with a plain epoll loop.

Strategy: signing must not slow the other replies, and on a busy domain controller it is most of
the server's work, so it is kept cheap and out of the way. The UDP listeners hand requests over
with `submit` (a deque append and one write to a wake-up pipe per batch, never a wait); a thread
at a lower CPU priority (`NICE`, per thread on Linux) runs an epoll loop over the connections to
Samba and calls each request's `done` with the signed reply or None, from that thread alone. An
asyncio version (streams, a task, a future and a timeout per request) cost about 170 us of Python
per signed reply and kept the core busy, so plain clients sharing it lost half their replies/s;
this loop costs a fraction of that, and the interpreter lock is held only in short steps
between system calls.

`connections` connections each carry one request at a time: Samba answers in order and, for a
disabled or non-trust account, drops the connection without a reply, so one request per
connection confines that loss to the request that caused it. Requests wait in one bounded queue
(full: refused at once, in `submit`); each has a deadline covering queueing and signing; an
exchange not answered within twice the deadline resets its connection; a connection that fails
reconnects with exponential backoff (0.1 s doubling to 5 s), so signing resumes soon after Samba
restarts, with no restart of ours. An idle connection is watched too, so one that Samba closed (a
restart) is replaced before a request would be lost on it. Every outcome is counted by reason
(`stats`, written by the thread alone); the signing delay is summed for an average.

The transmit time a client is served must not depend on other clients: a request may carry a
builder instead of a packet, called right before the request goes to Samba, so the time spent
queued is never in it; the builder is given `compensation_ns()`, an estimate of Samba's round trip
alone (write to signed reply, a running average), capped at `max_compensation_ns` and halved for
every `COMPENSATION_HALF_LIFE_S` without a fresh measurement, so neither a burst nor a slow spell
can move the time served by more than the cap.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nts.core.stats import Counters
from nts.wire.errors import ParseError

from .signd import ReplyReader, check_signed, encode_request

log = logging.getLogger("ntsd.mssntp")
BACKOFF_START = 0.1
BACKOFF_MAX = 5.0
MAX_COMPENSATION_NS = 1_000_000  # the most the transmit time is moved on for Samba's round trip
COMPENSATION_HALF_LIFE_S = 10.0
NICE = 10  # how much lower than the serving threads (CFS weights: about 1 to 9 under contention)
Builder = Callable[[int], bytes]  # compensation (ns) -> the 48-byte reply to sign
Done = Callable[[bytes | None, str], None]  # the signed packet (None: none), and why not
_IDLE = select.EPOLLIN | getattr(select, "EPOLLRDHUP", 0)


class _Job:
    __slots__ = ("done", "due", "finished", "key_id", "packet", "queued")

    def __init__(self, key_id: int, packet: bytes | Builder, done: Done, queued: int, due: int) -> None:
        self.key_id, self.packet, self.done = key_id, packet, done
        self.queued, self.due = queued, due  # monotonic ns: taken, and its deadline
        self.finished = False


class _Connection:
    __slots__ = ("backoff", "frames", "job", "packet", "packet_id", "retry_at", "sent", "sock", "started")

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.job: _Job | None = None  # the request in flight on it
        self.packet = b""  # ...the packet sent for it, its id, and when (monotonic ns)
        self.packet_id = 0
        self.sent = 0  # (by the signer's clock, for Samba's round trip)
        self.started = 0  # (monotonic ns, for the exchange's deadline)
        self.frames = ReplyReader()
        self.retry_at = 0  # when to connect again (monotonic ns), while sock is None
        self.backoff = BACKOFF_START


class SigndClient:
    """Signs 48-byte replies through ntp_signd on a thread of its own. `submit` (any thread) hands
    requests over; `sign` awaits one from an event loop."""

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
        self.queue_size = queue_size
        self.deadline = deadline  # (read by the thread; a reload may change it)
        self.max_compensation_ns = max_compensation_ns
        self.clock = clock
        self.connected = 0
        self.last_failure = ""
        self.niced = False
        self.round_trip_ns = 0  # running average of Samba's round trips (EWMA, 1/8), measured...
        self._measured_at = 0  # ...last at this clock() reading
        self._inbox: collections.deque[_Job] = collections.deque()  # appended by any thread, taken by ours
        self._refusals = 0  # refused in submit (any thread, under the lock), counted by ours
        self._refusals_lock = threading.Lock()
        self._next_check = 0  # when a deadline or reconnection is next due (monotonic ns)
        self._queue: collections.deque[_Job] = collections.deque()  # the thread's, in order of arrival
        self._conns = [_Connection() for _ in range(connections)]
        self._by_fd: dict[int, _Connection] = {}
        self._next_id = 0
        self._poller: Any = None
        self._wake_r = self._wake_w = -1
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- any thread

    def submit(self, work: Sequence[tuple[tuple[int, bytes | Builder], Done]]) -> list[Any]:
        """Take requests ((key id, packet or builder), done) to sign; each `done` is called once, on
        the signer's thread. Returns those refused (the queue is full): the caller counts them, and
        their `done` is never called. RuntimeError: not running."""
        if self._thread is None or self._stopping:
            raise RuntimeError("the MS-SNTP signer is not running")
        refused = []
        inbox, room = self._inbox, self.queue_size
        now = time.monotonic_ns()
        due = now + int(self.deadline * 1e9)
        for (key_id, packet), done in work:
            if len(inbox) + len(self._queue) >= room:
                refused.append(((key_id, packet), done))
            else:
                inbox.append(_Job(key_id, packet, done, now, due))
        if refused:
            with self._refusals_lock:
                self._refusals += len(refused)
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")  # (a full pipe has woken it already)
        return refused

    async def sign(self, key_id: int, packet: bytes | Builder) -> bytes | None:
        """The signed 68-byte packet, or None (refused, failed, late), awaited from an event loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes | None] = loop.create_future()

        def settle(signed: bytes | None) -> None:
            if not future.done():
                future.set_result(signed)

        def done(signed: bytes | None, _why: str) -> None:
            with contextlib.suppress(RuntimeError):  # (the loop closed meanwhile)
                loop.call_soon_threadsafe(settle, signed)

        try:
            if self.submit([((key_id, packet), done)]):
                return None
        except RuntimeError:
            return None
        return await future

    def compensation_ns(self) -> int:
        """Samba's recent round trip, capped, halved per half-life since it was last measured."""
        if not self.round_trip_ns:
            return 0
        age_s = max(0, self.clock() - self._measured_at) / 1e9
        return int(min(self.round_trip_ns, self.max_compensation_ns) * 0.5 ** (age_s / COMPENSATION_HALF_LIFE_S))

    async def start(self) -> None:
        self._poller = select.epoll()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poller.register(self._wake_r, select.EPOLLIN)
        self._stopping = False
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="mssntp signing", daemon=True)
        self._thread.start()
        ready.wait()

    async def stop(self) -> None:
        """End the thread: requests not yet signed get None; the connections are closed."""
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")
        await asyncio.get_running_loop().run_in_executor(None, thread.join, 10)
        self._thread = None
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._poller.close()

    # -- the signer's thread

    def _run(self, ready: threading.Event) -> None:
        if hasattr(os, "setpriority"):
            try:  # on Linux, per thread (a thread is a task with its own nice value)
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
                self.niced = True
            except OSError as exc:  # (a seccomp filter without setpriority, say)
                log.debug("MS-SNTP signing: cannot lower the thread's priority: %s", exc)
        ready.set()
        try:
            self._loop()
        except Exception:  # a bug must be loud; what waits gets no reply, never a wrong one
            log.exception("MS-SNTP signing failed: no MS-SNTP replies until ntsd restarts")
        finally:
            self._close_all()

    def _loop(self) -> None:
        by_fd, poll, wake = self._by_fd, self._poller.poll, self._wake_r
        monotonic_ns = time.monotonic_ns
        while not self._stopping:
            for fd, _events in poll(max(self._next_check - monotonic_ns(), 0) / 1e9):
                if fd == wake:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake, 4096)
                else:
                    conn = by_fd.get(fd)
                    if conn is not None:
                        self._readable(conn)
            now = monotonic_ns()
            self._take()
            if now >= self._next_check:  # (the deadlines and reconnections only when one is due)
                self._sweep(now)
            queue = self._queue
            if queue:
                for conn in self._conns:
                    if conn.sock is not None and conn.job is None:
                        self._send(conn, queue.popleft())
                        if not queue:
                            break

    def _take(self) -> None:
        """Queue the requests handed over (and count those refused for a full queue)."""
        self._count_refusals()
        inbox = self._inbox
        if inbox:
            self._next_check = min(self._next_check, inbox[0].due)
            queue = self._queue
            while inbox:
                queue.append(inbox.popleft())

    def _count_refusals(self) -> None:
        if self._refusals:
            with self._refusals_lock:
                refused, self._refusals = self._refusals, 0
            self._count("queue_full", refused)

    def _sweep(self, now: int) -> None:
        """End the requests past their deadline (queued or in flight), reset exchanges unanswered in
        twice the deadline, connect where it is time; then note when the next of these is due."""
        queue = self._queue
        while queue and queue[0].due <= now:  # in order of arrival: the oldest first
            self._finish(queue.popleft(), None, "timeout")
        stall = int(2 * self.deadline * 1e9)
        for conn in self._conns:
            job = conn.job
            if conn.sock is None:
                if conn.retry_at <= now:
                    self._connect(conn, now)
            elif job is not None:
                if not job.finished and job.due <= now:
                    self._finish(job, None, "timeout")  # (its answer, should it come, is discarded)
                if now - conn.started > stall:  # a stalled or trickling signer
                    self._lost(conn, "connection_lost", "no answer in twice the deadline")
                    self._connect(conn, now)
        soonest = now + 1_000_000_000
        if queue:
            soonest = min(soonest, queue[0].due)
        for conn in self._conns:
            if conn.sock is None:
                soonest = min(soonest, conn.retry_at)
            elif conn.job is not None:
                soonest = min(soonest, conn.started + stall)
                if not conn.job.finished:
                    soonest = min(soonest, conn.job.due)
        self._next_check = soonest

    def _connect(self, conn: _Connection, now: int) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.connect(str(self.path))
        except OSError as exc:  # (a full backlog, EAGAIN, counts as a failure too)
            sock.close()
            self._note_failure(f"cannot connect to {self.path}: {exc.strerror or exc}")
            conn.retry_at = now + int(conn.backoff * 1e9)
            conn.backoff = min(conn.backoff * 2, BACKOFF_MAX)
            self._next_check = min(self._next_check, conn.retry_at)
            return
        conn.sock, conn.backoff, conn.frames = sock, BACKOFF_START, ReplyReader()
        self._by_fd[sock.fileno()] = conn
        self._poller.register(sock.fileno(), _IDLE)
        self.connected += 1
        if self.last_failure:
            log.info("connected to ntp_signd at %s again", self.path)
            self.last_failure = ""
        self._count("connects")

    def _send(self, conn: _Connection, job: _Job) -> None:
        assert conn.sock is not None
        packet_id = self._next_id = (self._next_id + 1) & 0xFFFF
        packet = job.packet if isinstance(job.packet, bytes) else job.packet(self.compensation_ns())
        frame = encode_request(packet_id, job.key_id, packet)
        conn.job, conn.packet, conn.packet_id = job, packet, packet_id
        conn.sent, conn.started = self.clock(), time.monotonic_ns()
        self._next_check = min(self._next_check, job.due)
        try:
            if conn.sock.send(frame) != len(frame):  # (a fresh request on an idle connection always fits)
                raise BlockingIOError("ntp_signd's socket buffer is full")
        except OSError as exc:
            self._lost(conn, "connection_lost", f"{exc.__class__.__name__} ({exc})")

    def _readable(self, conn: _Connection) -> None:
        assert conn.sock is not None
        try:
            data = conn.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError as exc:
            data, why = b"", f"{exc.__class__.__name__} ({exc})"
        else:
            why = "closed by ntp_signd"
        job = conn.job
        if job is None:  # Samba closed an idle connection (a restart): replaced now, no request lost
            self._count("idle_connection_lost")
            self._lost(conn, "", "data from ntp_signd while idle" if data else f"{why} while idle")
            return
        if not data:
            self._lost(conn, "connection_closed", why)  # Samba: a disabled account and such
            return
        try:
            replies = conn.frames.feed(data)
        except ParseError as exc:
            self._lost(conn, "connection_lost", f"ParseError ({exc})")
            return
        if not replies:
            return  # (the rest of the frame is still to come)
        if len(replies) != 1 or replies[0].packet_id != conn.packet_id:  # out of step: start afresh
            self._lost(conn, "protocol_error", "ntp_signd replied out of step")
            return
        conn.job = None
        signed = check_signed(replies[0], conn.packet_id, job.key_id, conn.packet)
        if signed is not None:
            self._measured(self.clock() - conn.sent)
        self._finish(job, signed, "signed" if signed is not None else "refused")

    def _lost(self, conn: _Connection, outcome: str, why: str) -> None:
        """Close a connection whose exchange failed (`outcome` counted for its request, if any) and
        connect again on the next turn."""
        if conn.job is not None:
            self._finish(conn.job, None, outcome)
            conn.job = None
        self._note_failure(f"ntp_signd connection lost: {why}")
        self._close(conn)
        conn.retry_at = self._next_check = 0  # (connect again on the next turn)

    def _close(self, conn: _Connection) -> None:
        if conn.sock is not None:
            self._by_fd.pop(conn.sock.fileno(), None)
            conn.sock.close()  # (closing takes it out of the epoll set)
            conn.sock = None
            self.connected -= 1

    def _close_all(self) -> None:
        self._count_refusals()
        for conn in self._conns:
            if conn.job is not None:
                self._finish(conn.job, None, "")
                conn.job = None
            self._close(conn)
        for queue in (self._inbox, self._queue):
            while queue:
                self._finish(queue.popleft(), None, "")

    def _finish(self, job: _Job, signed: bytes | None, outcome: str) -> None:
        if job.finished:
            return
        job.finished = True
        if outcome:
            self._count(outcome)
        if signed is not None:  # the whole delay (queue + Samba), for the metrics
            self.stats.inc(("mssntp_sign_delay_us",), (time.monotonic_ns() - job.queued) // 1000)
        try:
            job.done(signed, "failed")
        except Exception:  # a bug there costs this reply only
            log.exception("MS-SNTP: finishing a signed reply failed")

    def _count(self, outcome: str, n: int = 1) -> None:
        self.stats.inc(("mssntp_sign", outcome), n)

    def _note_failure(self, message: str) -> None:
        if message != self.last_failure:  # one line per kind of failure, not one per retry
            log.warning("%s; MS-SNTP requests are dropped until it is back", message)
            self.last_failure = message

    def _measured(self, round_trip_ns: int) -> None:
        self.round_trip_ns += (round_trip_ns - self.round_trip_ns) // 8 if self.round_trip_ns else round_trip_ns
        self._measured_at = self.clock()
