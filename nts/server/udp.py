"""NTP over UDP: one receive thread per socket, kernel timestamps, replies in batches.

Strategy: measured here, asyncio's per-event overhead costs a fifth of the throughput of a blocking
loop, and its datagram API cannot return ancillary data at all. So each socket gets a thread that
blocks in the kernel (the GIL is released while it waits; the asyncio thread, which runs everything
else, is idle nearly always). SO_TIMESTAMPING (software; SO_TIMESTAMPNS where it is refused) makes
the kernel attach the receive time, and a reply can ask for the time it leaves: replies noted in the
interleaved table (`core.interleave`) always, one basic reply every few milliseconds for the
correction. Those times come back on the socket's error queue, read in batches after the send (never
before it), each matched to its reply by the reply's receive field. Each listener
has its own Pipeline and owns the stats sinks it hands to it (one per writing thread: its own, and
the finisher's for deferred replies), so counters are exact and survive a reload's new pipeline;
access and rate-limit tables are shared. On Linux a thread takes up to `batch` datagrams per
recvmmsg (mmsg.py): it asks the pipeline about each, finishes the verified ones (`Seal`: transmit
timestamp, then MAC or AEAD) only after the whole batch is decided, and sends the replies with one
sendmmsg, flushing early when a timestamp has waited `hold_ns`. Elsewhere, or with batch 1, it is
recvmsg and sendto per datagram. A reload swaps the pipeline between batches; stopping shuts the
socket down, which wakes the blocked read. Deferred requests (MS-SNTP's) are handed to their
finisher once per batch, and their replies are sent from its thread. A socket bound to a wildcard
address (0.0.0.0, ::) asks the kernel for each datagram's destination address (IP_PKTINFO /
IPV6_RECVPKTINFO) and sends the reply from it: left to routing, a reply to a request sent to a
host's second address leaves from its first, and clients drop it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from ..core.decisions import Defer, Done, Finisher, Seal
from ..core.interleave import TxLag, TxTimestamps
from ..core.stats import Counters, Key, add
from ..net import format_addr
from ..wire.timestamps import ntp64_to_unix_ns
from . import hwstamp, mmsg
from .hwstamp import PhcClock
from .mmsg import kernel_timestamping

if TYPE_CHECKING:
    from ..core.pipeline import Pipeline

    MakePipeline = Callable[[Counters, Counters, "TxTimestamps | None"], Pipeline]

log = logging.getLogger("ntsd.udp")
_SO_MEMINFO = 55  # Linux: the socket's memory counters (u32 each); the ninth counts dropped datagrams
_MEMINFO_LEN = 9 * 4

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux value; absent from the socket module
_MSG_ERRQUEUE = getattr(socket, "MSG_ERRQUEUE", 0x2000)
_MSG_PROBE = 0x10  # Linux: take the send path as far as routing, send nothing (absent from the socket module)
_U64 = struct.Struct(">Q")
_SAMPLE_EVERY_NS = 5_000_000  # a basic reply's send is timed at most this often (the correction's samples)
_COLD_AFTER_NS = 1_000_000  # a request after this long without one finds the way to the wire cold
_STAMPS_KEPT = 4096  # replies whose transmit timestamp is awaited (more: the oldest are given up)
_STAMP_REQUEST = (socket.SOL_SOCKET, mmsg.SO_TIMESTAMPING, struct.pack("I", mmsg.SOF_TIMESTAMPING_TX_SOFTWARE))
_TX_BOTH = mmsg.SOF_TIMESTAMPING_TX_SOFTWARE | mmsg.SOF_TIMESTAMPING_TX_HARDWARE  # (ntp.hwtimestamp)
_STAMP_REQUEST_HW = (socket.SOL_SOCKET, mmsg.SO_TIMESTAMPING, struct.pack("I", _TX_BOTH))
MAX_DATAGRAM = 4096  # larger requests are dropped as oversize
_TIMESPEC = struct.Struct("@qq")
_ANC_SPACE = socket.CMSG_SPACE(3 * _TIMESPEC.size)  # SO_TIMESTAMPING: three timespecs (SO_TIMESTAMPNS: one)
WILDCARDS = ("0.0.0.0", "::")
_K_RECV, _K_SEND = ("io_calls", "recvmmsg"), ("io_calls", "sendmmsg")
_K_REQUESTS, _K_OVERSIZE, _K_INTERNAL = ("requests",), ("drops", "oversize"), ("drops", "internal_error")


def _error_label(err: int) -> str:
    """The metrics label for an errno: the name of the OSError subclass Python raises for it, as
    the unbatched path counts exceptions (ConnectionRefusedError, PermissionError, OSError...)."""
    return OSError(err, os.strerror(err)).__class__.__name__


def open_udp_socket(host: str, port: int, *, reuse_port: bool = False, hardware: bool = False) -> socket.socket:
    """A bound UDP socket with kernel receive timestamps enabled; `hardware`: the network card's too
    (ntp.hwtimestamp: where the card was switched on to take them)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:  # receive times, and transmit times for the replies that ask (interleaved mode, the correction)
            _timestamping(sock, hardware)
        except OSError:  # (logged by the listener, which then takes transmit times before the send only)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        if host in WILDCARDS:  # the kernel then says where each datagram was sent (replies go from there)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, mmsg.IP_PKTINFO, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _timestamping(sock: socket.socket, hardware: bool) -> None:
    if hardware:
        try:
            sock.setsockopt(socket.SOL_SOCKET, mmsg.SO_TIMESTAMPING, mmsg.TS_FLAGS | hwstamp.SOCKET_FLAGS)
            return
        except OSError as exc:
            log.warning("the kernel refused hardware timestamps on a socket (%s): software timestamps there",
                        exc.strerror)  # fmt: skip
    sock.setsockopt(socket.SOL_SOCKET, mmsg.SO_TIMESTAMPING, mmsg.TS_FLAGS)


def hardware_timestamping(sock: socket.socket) -> bool:
    """Whether `sock` asks for the network card's timestamps (open_udp_socket with `hardware`)."""
    try:
        flags = sock.getsockopt(socket.SOL_SOCKET, mmsg.SO_TIMESTAMPING)
    except OSError:
        return False
    return flags & hwstamp.SOCKET_FLAGS == hwstamp.SOCKET_FLAGS


def _reports_destination(sock: socket.socket) -> bool:
    """Whether open_udp_socket asked the kernel for each datagram's destination (wildcard addresses)."""
    if sock.family == socket.AF_INET6:
        level, option = socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO
    else:
        level, option = socket.IPPROTO_IP, mmsg.IP_PKTINFO
    try:
        return sock.getsockopt(level, option) != 0
    except OSError:
        return False


class UdpListener:
    """Serves one bound socket from its own thread through `self.pipeline`."""

    def __init__(
        self,
        sock: socket.socket,
        make_pipeline: MakePipeline,
        on_drop: Callable[[str, tuple[str, int]], None] | None = None,
        batch: int = 1,
        hold_ns: int = 0,
        correct: bool = True,
        phc: PhcClock | None = None,
    ) -> None:
        self.sock = sock
        self.local = sock.getsockname()
        self.stats = Counters()  # written by the listener's thread (and its pipeline)
        self.loop_stats = Counters()  # written where deferred replies are finished (one thread: see _finish)
        self._requests = self.stats.tally(_K_REQUESTS)
        self.stamping = kernel_timestamping(sock)
        # the network card's timestamps, converted to the system clock (ntp.hwtimestamp), if this socket has them
        self.hardware = phc.to_system if phc is not None and self.stamping and hardware_timestamping(sock) else None
        self._stamp_request = _STAMP_REQUEST_HW if self.hardware is not None else _STAMP_REQUEST
        self._stamp_alone = [self._stamp_request]  # (the control data of a timed send, built once)
        self.timestamps = TxTimestamps(cold_lag=TxLag(correct)) if self.stamping else None
        self._idle_from = 0  # when this listener last finished a reply (wall ns): a long pause makes it cold
        # replies whose kernel transmit time is awaited: receive field as sent -> (length, time stamped
        # before any correction, whether the interleaved table holds it, the lag its send is a sample
        # of, the pace it was answered at)
        self._awaited: dict[int, tuple[int, int, bool, TxLag, int]] = {}
        self._awaited_lengths: set[int] = set()
        self._last_sample = 0
        # a reply answered at once asked for its transmit time, which may come after the read that
        # follows its send (a card's, or a send the kernel queued): the next batch reads again
        self._stamped = False
        self._errqueue: mmsg.ErrorQueue | None = None  # (made on first use, in the listener's thread)
        self.stamp_mismatches = 0
        self.pipeline = make_pipeline(self.stats, self.loop_stats, self.timestamps)  # replaced by reload
        self._on_drop = on_drop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._last_error_log = 0.0
        self.batch = batch  # fixed for the socket's life (its buffers are sized by it)
        self.hold_ns = hold_ns  # read per batch: a reload may change it
        self.pktinfo = _reports_destination(sock)  # then replies must leave from the address asked

    def correct(self, on: bool) -> None:
        """Add the measured lag to basic replies' transmit time, or not (measured either way)."""
        if self.timestamps is not None:
            self.timestamps.cold_lag.enable(on)  # (the warm one is measured only: see core/interleave.py)

    def renew(self, make_pipeline: MakePipeline) -> None:
        """Serve through a new pipeline (a reload) from the next datagram on, with the same counters
        and the same interleaved-mode table (it is the socket's)."""
        self.pipeline = make_pipeline(self.stats, self.loop_stats, self.timestamps)

    def counters(self) -> dict[Key, int]:
        """Everything this listener counted, its pipelines' decisions included, and its transmit
        timestamps (as chrony's serverstats counts them)."""
        merged = self.stats.snapshot()
        add(merged, self.loop_stats.snapshot())
        t = self.timestamps
        if t is not None:
            merged[("interleaved_replies",)] = t.interleaved
            merged[("interleaved_unmatched",)] = t.unmatched
            merged[("tx_timestamps", "kernel")] = t.kernel_stamps
            merged[("tx_timestamps", "unmatched")] = self.stamp_mismatches
            merged[("interleaved_daemon_timestamps",)] = t.daemon_served
        return merged

    def gauges(self) -> dict[str, float]:
        """The interleaved table's size, and the transmit-time correction (estimate and applied)."""
        t = self.timestamps
        if t is None:
            return {}
        return {"interleaved_timestamps": len(t.entries), "tx_lag_seconds": t.lag.estimate_ns / 1e9,
                "tx_correction_seconds": t.lag.ns / 1e9, "tx_lag_idle_seconds": t.cold_lag.estimate_ns / 1e9,
                "tx_correction_idle_seconds": t.cold_lag.ns / 1e9}  # fmt: skip

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.sock.setblocking(True)
        name = f"udp {self.local[0]}:{self.local[1]}"
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def kernel_drops(self) -> int:
        """Datagrams the kernel dropped on this socket because its receive buffer was full (the server
        could not keep up); they never reach `requests`. 0 where the platform does not say."""
        if sys.platform != "linux" or self.sock.fileno() < 0:
            return 0
        try:
            info = self.sock.getsockopt(socket.SOL_SOCKET, _SO_MEMINFO, _MEMINFO_LEN)
        except OSError:
            return 0
        return int.from_bytes(info[_MEMINFO_LEN - 4 :], sys.byteorder) if len(info) >= _MEMINFO_LEN else 0

    def stop(self) -> None:
        """Stop the thread (waking its blocked read) and close the socket."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RD)  # wakes recvmsg; raises ENOTCONN on UDP, harmlessly
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        self.sock.close()

    def _run(self) -> None:
        if self.timestamps is not None:
            self.timestamps.thread = threading.get_ident()  # its table is this thread's alone
        else:
            log.warning("%s: the kernel refused SO_TIMESTAMPING: no kernel transmit timestamps, so no interleaved "
                        "mode and no transmit-time correction (receive times from SO_TIMESTAMPNS)",
                        format_addr(self.local))  # fmt: skip
        try:
            self._serve()
        except Exception:  # a bug must be loud, and must not leave a silent dead listener
            log.exception("listener on %s failed", self.local)
            raise

    def _serve(self) -> None:
        if self.batch > 1 and mmsg.available():
            return self._serve_batched()
        recvmsg = self.sock.recvmsg
        unpack = _TIMESPEC.unpack_from
        time_ns = time.time_ns
        trunc = int(socket.MSG_TRUNC)  # the enum member would make `&` a Python-level call
        space = _ANC_SPACE + mmsg.PKTINFO_SPACE if self.pktinfo else _ANC_SPACE
        while True:
            try:
                data, anc, flags, addr = recvmsg(MAX_DATAGRAM, space)
            except InterruptedError:
                continue
            except OSError as exc:  # e.g. an ICMP error queued on the socket
                if self._stopping:
                    return
                self.stats.inc(("socket_errors", exc.__class__.__name__))
                continue
            if addr is None:  # woken by shutdown()
                if self._stopping:
                    return
                continue
            self._requests.n += 1
            rx, reply_anc = 0, []
            for level, kind, payload in anc:
                if (kind == SO_TIMESTAMPNS or kind == mmsg.SO_TIMESTAMPING) and level == socket.SOL_SOCKET:
                    sec, nsec = unpack(payload)
                    rx = sec * 1_000_000_000 + nsec
                    if self.hardware is not None and len(payload) >= 3 * _TIMESPEC.size:
                        rx = mmsg.card_time(payload, 0, self.hardware) or rx
                elif (level, kind) in mmsg.PKTINFO:
                    reply_anc = [(level, kind, payload)]
            if flags & trunc:
                self.stats.inc(_K_OVERSIZE)
                continue
            self._answer(self.pipeline, data, addr, rx or time_ns(), reply_anc)

    def _answer(self, pipeline: Pipeline, data: bytes, addr: Any, rx: int, anc: list[Any]) -> None:
        """One datagram, answered at once (the reply is finished and sent before the next is read);
        `anc`: the control message that sets the reply's source address, on a wildcard socket.
        Between the transmit time read (in the pipeline) and the send, as little runs as can: what
        the send needs is worked out before."""
        timestamps = self.timestamps
        due = False  # after a pause: this reply's send may be timed for the correction (at most every few ms)
        if timestamps is not None:  # after a pause the way to the wire is cold: its own lag is added
            if rx - self._idle_from > _COLD_AFTER_NS:
                due = time.monotonic_ns() - self._last_sample >= _SAMPLE_EVERY_NS  # (the probe's controls match)
                timestamps.after_pause(self._warm(data, addr, anc, due))
            else:
                timestamps.cold = False
        try:
            decision = pipeline.handle(data, addr, rx)
        except Exception:  # a bug (in a plugin, say) costs this datagram, never the listener
            self._idle_from = time.time_ns()
            self._internal_error(addr)
            return
        if type(decision) is bytes:
            # timed: a reply in the interleaved table, or a time reply of ours when a sample is due
            # (not a Kiss-o'-Death, stratum 0, whose times are not a reply's; its receive field flagged)
            stamp = timestamps is not None and (
                timestamps.pending is not None
                or (
                    decision[1] != 0
                    and decision[39] & 1 == 1
                    and (due if timestamps.cold else time.monotonic_ns() - self._last_sample >= _SAMPLE_EVERY_NS)
                )
            )
            self._send(self.stats, decision, addr, anc, stamp)
            self._idle_from = time.time_ns()
            if stamp:
                self._await(decision)
                self._drain()
            return
        self._idle_from = time.time_ns()
        if timestamps is not None:
            timestamps.pending = None
        if type(decision) is Defer:
            self._hand_over([(pipeline, data, decision, anc)])
        elif self._on_drop is not None:
            self._on_drop(decision.reason, addr)  # type: ignore[union-attr]

    def _warm(self, data: bytes, addr: Any, anc: list[Any], stamp: bool) -> int:
        """Walk the way to the wire once before the reply's transmit time is read, and say how long
        that took (ns: the pace, see core/interleave.py): after a pause the first send to `addr`
        takes 10-20 us longer than the next and varies by a few us from one reply to another, which
        would be in the time served; a probe (MSG_PROBE: the kernel routes it and sends nothing)
        with the same control messages takes most of both out (measured: lag 25 -> 12 us, its
        median absolute deviation 3 -> 1 us)."""
        start = time.perf_counter_ns()
        with contextlib.suppress(OSError):
            self.sock.sendmsg([data], self._controls(anc, stamp), _MSG_PROBE, addr)
        return time.perf_counter_ns() - start

    def _controls(self, anc: list[Any], stamp: bool) -> list[Any]:
        """A send's control messages: the source address (`anc`, on a wildcard socket) and, with
        `stamp`, the request for the time it leaves."""
        if not stamp:
            return anc
        return [*anc, self._stamp_request] if anc else self._stamp_alone

    def _send(self, stats: Counters, reply: bytes, addr: Any, anc: list[Any], stamp: bool = False) -> None:
        """Send one reply; `stats`: the sink of the thread sending it (errors are counted there);
        `stamp`: ask the kernel for the time it leaves."""
        try:
            if stamp or anc:
                self.sock.sendmsg([reply], self._controls(anc, stamp), 0, addr)
            else:
                self.sock.sendto(reply, addr)
        except OSError as exc:
            stats.inc(("socket_errors", exc.__class__.__name__))

    def _serve_batched(self) -> None:
        batch = mmsg.Batch(self.sock, self.batch, MAX_DATAGRAM, self.pktinfo, self.stamping, self.hardware)
        timestamps = self.timestamps
        recv, messages, queue = batch.recv, batch.messages, batch.queue
        time_ns = time.time_ns
        limit = MAX_DATAGRAM
        stats, requests = self.stats, self._requests
        lengths = self._awaited_lengths  # (cleared in place, never replaced)
        counts = stats.counts
        while True:
            n = recv()
            if self._stopping:
                return
            if n < 0:
                if n != -errno.EINTR:
                    stats.inc(("socket_errors", _error_label(-n)))
                continue
            pipeline = self.pipeline
            counts[_K_RECV] = counts.get(_K_RECV, 0) + 1
            if n == 1:  # light load: answer at once, as the unbatched loop does (no send-call overhead)
                self._one(pipeline, messages(1)[0], batch.pktinfo_ancillary(0))
                continue
            handle = pipeline.handle
            hold = self.hold_ns
            if timestamps is not None:
                timestamps.cold = False  # (a batch: the server is busy)
            first = 0  # when the oldest reply waiting to be sent got its transmit timestamp
            # (only replies in the interleaved table are timed in a batch: the correction's samples
            # are replies answered at once, see _await)
            sealing: list[tuple[int, int, Seal, Any]] = []
            stamped = False  # a reply of this batch is in the interleaved table: its send is timed
            deferred: list[tuple[Pipeline, bytes, Defer, list[Any]]] = []
            requests.n += n
            for i, data, length, namelen, rx, addr in messages(n):
                if addr is None:  # not an IP peer (cannot happen on an IP socket)
                    continue
                if length > limit:
                    stats.inc(_K_OVERSIZE)
                    continue
                try:
                    decision = handle(data, addr, rx or time_ns(), True)
                except Exception:
                    self._internal_error(addr)
                    continue
                kind = type(decision)
                if kind is Seal:  # verified; finished below, after the rest of the batch
                    sealing.append((i, namelen, decision, addr))  # type: ignore[arg-type]
                elif kind is bytes:
                    if timestamps is not None and timestamps.pending is not None:  # (see the note above _await)
                        timestamps.pending = None
                        queue(i, namelen, decision, True)  # type: ignore[arg-type]
                        stamped = True
                        if len(decision) not in lengths:  # type: ignore[arg-type]
                            self._awaited_length(len(decision))  # type: ignore[arg-type]
                        if not first and not timestamps.unhurried:
                            first = time_ns()
                    else:
                        queue(i, namelen, decision)  # type: ignore[arg-type]
                        if not first:
                            first = time_ns()
                else:
                    if timestamps is not None:
                        timestamps.pending = None  # (a header built, then not sent)
                    if kind is Defer:  # handed over after the batch, all at once per loop
                        deferred.append((pipeline, data, decision, batch.pktinfo_ancillary(i)))  # type: ignore[arg-type]
                    elif self._on_drop is not None:
                        self._on_drop(decision.reason, addr)  # type: ignore[union-attr]
                if first and time_ns() - first >= hold:  # a queued timestamp must not go stale
                    self._flush(batch)
                    first = 0
            for i, namelen, pending, addr in sealing:
                try:
                    reply = pending.complete()
                except Exception:
                    self._internal_error(addr)
                    continue
                if type(reply) is bytes:
                    hurried = True
                    if timestamps is not None and timestamps.pending is not None:
                        timestamps.pending = None
                        queue(i, namelen, reply, True)
                        stamped = True
                        if len(reply) not in lengths:
                            self._awaited_length(len(reply))
                        hurried = not timestamps.unhurried
                    else:
                        queue(i, namelen, reply)
                    if hurried and not first:
                        first = time_ns()
                    if first and time_ns() - first >= hold:
                        self._flush(batch)
                        first = 0
                else:
                    if timestamps is not None:
                        timestamps.pending = None
                    if self._on_drop is not None:
                        self._on_drop(reply.reason, addr)  # type: ignore[union-attr]
            if batch.pending:
                self._flush(batch)
            self._idle_from = time_ns()
            if deferred:
                self._hand_over(deferred)
            if stamped or self._stamped:
                self._stamped = False
                self._drain()

    def _hand_over(self, deferred: list[tuple[Pipeline, bytes, Defer, list[Any]]]) -> None:
        """Give a batch's deferred requests to what finishes them (MS-SNTP's signer), in one call
        per finisher, never waiting; what a finisher refuses (its queue is full) or cannot take (it
        stopped under a reload) is counted here, not lost."""
        groups: dict[Finisher, tuple[str, list[tuple[Any, Done]]]] = {}
        for pipeline, data, d, anc in deferred:
            groups.setdefault(d.to, (d.name, []))[1].append((d.job, partial(self._finish, pipeline, data, d, anc)))
        for finisher, (name, work) in groups.items():
            try:
                refused = len(finisher.submit(work))
            except RuntimeError:  # stopped (a reload replaced the plugin)
                self.stats.inc(("drops", "deferred_stopped"), len(work))
                continue
            if refused:
                self.stats.inc(("drops", f"{name}_queue_full"), refused)

    def _one(self, pipeline: Pipeline, message: tuple[int, bytes, int, int, int, Any], anc: list[Any]) -> None:
        _, data, length, _, rx, addr = message
        self._requests.n += 1
        if addr is None:
            return
        if length > MAX_DATAGRAM:
            self.stats.inc(_K_OVERSIZE)
            return
        self._answer(pipeline, data, addr, rx or time.time_ns(), anc)

    def _flush(self, batch: mmsg.Batch) -> None:
        counts = self.stats.counts  # (not Counters.inc: a call per flush shows in a small batch's cost)
        counts[_K_SEND] = counts.get(_K_SEND, 0) + 1
        for _, err in batch.flush():
            self.stats.inc(("socket_errors", _error_label(err)))

    # A reply of a batch sent with a stamp request for the interleaved table (`_serve_batched`,
    # written out there: a call per reply showed in the profile): its entry's `pending` is cleared,
    # its length noted, and `_drain` finds the entry by the receive field (no lag sample: see _await).

    def _await(self, reply: bytes) -> None:
        """Note a reply answered at once and sent with a stamp request under its receive field,
        which `_drain` finds again in what the kernel hands back, with the time it was stamped with
        before any correction and the lag estimate (cold or warm) its send is a sample of. Replies
        of a batch are no samples: they wait for the rest of it."""
        timestamps = self.timestamps
        assert timestamps is not None
        cold = timestamps.cold
        lag = timestamps.cold_lag if cold else timestamps.lag
        pending = timestamps.pending
        if pending is not None:
            timestamps.pending = None
            key, stamped = pending
            held = True
        else:
            self._last_sample = time.monotonic_ns()
            key = int.from_bytes(reply[32:40], "big")
            stamped = ntp64_to_unix_ns(int.from_bytes(reply[40:48], "big"), time.time_ns())
            stamped -= timestamps.cold_ns if cold else lag.ns
            held = False
        awaited = self._awaited
        if len(awaited) >= _STAMPS_KEPT:
            del awaited[next(iter(awaited))]
        awaited[key] = (len(reply), stamped, held, lag, timestamps.pace if cold else 0)
        self._stamped = True
        self._awaited_length(len(reply))

    def _awaited_length(self, length: int) -> None:
        """Where to look for the receive field in what the error queue hands back: replies' lengths."""
        if length not in self._awaited_lengths:
            if len(self._awaited_lengths) > 16:
                self._awaited_lengths.clear()
            self._awaited_lengths.add(length)

    def _drain(self) -> None:
        """Read the kernel's transmit timestamps from the socket's error queue (never blocks). Each
        comes with the datagram as it left, whose receive field names the reply it belongs to."""
        if self._errqueue is None and mmsg.available():
            self._errqueue = mmsg.ErrorQueue(self.sock, 64, MAX_DATAGRAM, self.hardware)
        queue, stamped_at = self._errqueue, self._stamped_at
        while True:
            if queue is None:  # (no recvmmsg here)
                copied = self._read_error_queue()
                for data, tx, card in copied:
                    stamped_at(data, [(0, len(data), tx, card)])
                count = len(copied)
            else:
                found = queue.stamps()  # (the datagrams stay in the queue's buffer)
                stamped_at(queue.data, found)
                count = len(found)
            if count < 64:
                return

    def _read_error_queue(self) -> list[tuple[bytes, int, bool]]:
        """The unbatched read (no recvmmsg here): what the error queue holds now."""
        out: list[tuple[bytes, int, bool]] = []
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(MAX_DATAGRAM + 256, 256, _MSG_ERRQUEUE | socket.MSG_DONTWAIT)
            except OSError:  # (BlockingIOError: nothing more)
                return out
            for level, kind, payload in anc:
                if kind == mmsg.SO_TIMESTAMPING and level == socket.SOL_SOCKET and len(payload) >= _TIMESPEC.size:
                    out.append((data, *mmsg.transmit_time(payload, 0, len(payload), self.hardware)))
            if len(out) >= 64:
                return out

    def _stamped_at(self, data: Any, found: list[tuple[int, int, int, bool]]) -> None:
        """The kernel (or, `card`, the network card) sent each datagram data[start:end] in `found`
        (a reply, behind its link, IP and UDP headers) at `tx`. The card's time comes after the
        kernel's and replaces it in the interleaved table (the kernel's alone feeds the correction
        of basic replies). One call per read: a call per timestamp showed in the profile."""
        timestamps, awaited, lengths = self.timestamps, self._awaited, self._awaited_lengths
        assert timestamps is not None
        kernel, unpack = timestamps.kernel, _U64.unpack_from
        for start, end, tx, card in found:
            for length in lengths:
                if tx and end - start >= length:
                    (key,) = unpack(data, end - length + 32)  # (the reply's receive field)
                    if card:
                        if key in timestamps.entries:
                            kernel(key, tx)
                            break
                        continue
                    waited = awaited.get(key) if awaited else None
                    if waited is None:  # an interleaved-table reply sent in a batch (not awaited: see _await)
                        if kernel(key, tx):
                            break
                        continue
                    if waited[0] == length:
                        del awaited[key]
                        waited[3].sample(tx - waited[1], waited[4])
                        if waited[2]:
                            kernel(key, tx)
                        break
            else:
                self.stamp_mismatches += 1

    def _internal_error(self, addr: tuple[str, int]) -> None:
        self.stats.inc(_K_INTERNAL)
        now = time.monotonic()
        if now - self._last_error_log > 60:  # the traceback once a minute at most
            self._last_error_log = now
            log.exception("internal error handling a datagram from %s (dropped; further ones are only counted "
                          "for a minute)", addr[0])  # fmt: skip

    def _finish(
        self, pipeline: Pipeline, request: bytes, d: Defer, anc: list[Any], reply: bytes | None, reason: str
    ) -> None:
        """A deferred reply, back from its finisher (on the finisher's thread, the one writer of
        `loop_stats`): guarded and counted by the pipeline, then sent."""
        final = pipeline.check_deferred(request, reply, d.name, reason)
        if final is not None:
            self._send(self.loop_stats, final, d.client, anc)
