"""The UDP listener in-process, with and without recvmmsg/sendmmsg batching: deferred replies from an
asynchronous authenticator, plugin bugs, bursts, oversize and empty datagrams, stopping."""

from __future__ import annotations

import asyncio
import errno
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import pytest

from nts.core.clockstate import ClockSettings, server_state
from nts.core.decisions import Defer, Done, Drop, Nak, Seal
from nts.core.handler import ReplyContext, Request, RequestHandler
from nts.core.interleave import TxTimestamps
from nts.core.pipeline import Pipeline
from nts.core.plain import PlainHandler
from nts.core.stats import Counters
from nts.server import metrics as metrics_module
from nts.server import mmsg
from nts.server.udp import MAX_DATAGRAM, UdpListener, open_udp_socket
from nts.wire.timestamps import ntp64_to_unix_ns
from tests.helpers import client_request, query, wait_until


class SlowSigner(RequestHandler):
    """Defers 20-byte-trailer requests to itself as a finisher, whose thread answers after a delay
    with the header and trailer, or none (trailer 0xEE: "failed", 0xFF: "error"); it refuses
    trailers beginning 0xDD at once, as a full queue does."""

    name: ClassVar[str] = "slow"
    order: ClassVar[int] = 10

    def __init__(self) -> None:
        self.work: queue.SimpleQueue[tuple[bytes, Done]] = queue.SimpleQueue()
        self.threads: set[int] = set()
        threading.Thread(target=self._run, daemon=True).start()

    def matches(self, request: Request) -> bool:
        return len(request.trailer) == 20

    def respond(self, request: Request, ctx: ReplyContext) -> bytes | Nak | Drop | Defer:
        return Defer(self, ctx.reply_header(request.data, request.rx_ns) + request.trailer, self.name, request.client)

    def submit(self, work: Sequence[tuple[bytes, Done]]) -> list[tuple[bytes, Done]]:
        refused = [item for item in work if item[0][48] == 0xDD]
        for item in work:
            if item[0][48] != 0xDD:
                self.work.put(item)
        return refused

    def _run(self) -> None:
        while True:
            reply, done = self.work.get()
            time.sleep(0.01)  # (the signer's work, not synchronisation)
            self.threads.add(threading.get_ident())
            done(None if reply[48] in (0xEE, 0xFF) else reply, "error" if reply[48] == 0xFF else "failed")


async def _exchange(port: int, packets: list[bytes]) -> list[bytes | None]:
    loop = asyncio.get_running_loop()
    out: list[bytes | None] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        s.connect(("127.0.0.1", port))
        for packet in packets:
            await loop.sock_sendall(s, packet)
            try:
                out.append(await asyncio.wait_for(loop.sock_recv(s, 200), 1.0))
            except TimeoutError:
                out.append(None)
    return out


BATCHES = [1, pytest.param(32, marks=pytest.mark.skipif(not mmsg.available(), reason="no recvmmsg here"))]


def _listener(
    plugin: RequestHandler,
    batch: int,
    hold_ns: int = 50_000,
    host: str = "127.0.0.1",
    clock: Callable[[], int] = time.time_ns,
) -> tuple[UdpListener, Pipeline, int]:
    """An unstarted listener on a free port of `host`, with one plugin; returns it, its pipeline, the port."""
    sock = open_udp_socket(host, 0)
    state = server_state(ClockSettings(local_reference=True), None, -20, time.time_ns())

    def make(stats: Counters, deferred_stats: Counters, timestamps: TxTimestamps | None = None) -> Pipeline:
        return Pipeline(state=state, authenticators=[plugin], clock=clock, stats=stats,
                        deferred_stats=deferred_stats, timestamps=timestamps)  # fmt: skip

    listener = UdpListener(sock, make, batch=batch, hold_ns=hold_ns)
    return listener, listener.pipeline, sock.getsockname()[1]


@pytest.mark.parametrize("batch", BATCHES)
def test_deferred_replies_are_sent_from_the_finisher_and_failures_counted(batch: int) -> None:
    async def main() -> None:
        signer = SlowSigner()
        listener, pipeline, port = _listener(signer, batch)
        listener.start(asyncio.get_running_loop())
        try:
            ok = client_request() + bytes([1]) + bytes(19)
            failed = client_request() + bytes([0xEE]) + bytes(19)
            broken = client_request() + bytes([0xFF]) + bytes(19)
            full = client_request() + bytes([0xDD]) + bytes(19)
            replies = await _exchange(port, [ok, failed, broken, full, ok])
        finally:
            listener.stop()
        assert replies[0] is not None and len(replies[0]) == 68 and replies[0][48:] == ok[48:]
        assert replies[1] is None and replies[2] is None and replies[3] is None
        assert replies[4] is not None
        assert len(signer.threads) == 1 and threading.get_ident() not in signer.threads  # sent from its thread
        counts = pipeline.counters()
        assert counts[("replies", "slow")] == 2
        assert counts[("drops", "slow_failed")] == 1
        assert counts[("drops", "slow_error")] == 1
        assert counts[("drops", "slow_queue_full")] == 1
        assert counts[("deferred", "slow")] == 5
        assert counts[("requests",)] == 5

    asyncio.run(main())


class Exploding(RequestHandler):
    """A plugin with a bug: raises on requests whose trailer starts with 0xEE."""

    name: ClassVar[str] = "exploding"
    order: ClassVar[int] = 10

    def matches(self, request: Request) -> bool:
        return len(request.trailer) == 20

    def respond(self, request: Request, ctx: ReplyContext) -> bytes | Nak | Drop | Defer:
        if request.trailer[0] == 0xEE:
            raise RuntimeError("plugin bug")
        return ctx.reply_header(request.data, request.rx_ns) + request.trailer


@pytest.mark.parametrize("batch", BATCHES)
def test_a_plugin_bug_costs_one_datagram_not_the_listener(batch: int) -> None:
    async def main() -> None:
        listener, pipeline, port = _listener(Exploding(), batch)
        listener.start(asyncio.get_running_loop())
        try:
            bad = client_request() + bytes([0xEE]) + bytes(19)
            good = client_request() + bytes([1]) + bytes(19)
            replies = await _exchange(port, [bad, good, bad, good])
        finally:
            listener.stop()
        assert [r is not None for r in replies] == [False, True, False, True]
        assert pipeline.counters()[("drops", "internal_error")] == 2

    asyncio.run(main())


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("hold_ns", [0, 10**9])
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_a_burst_is_answered_in_full_to_each_sender(batch: int, hold_ns: int, host: str) -> None:
    """200 requests from two sockets sent before any is read: every one answered, to its own sender,
    with its own origin timestamp (batched sends must not mix up slots or addresses)."""

    async def main() -> None:
        listener, pipeline, port = _listener(PlainHandler(), batch, hold_ns, host)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        clients = [socket.socket(family, socket.SOCK_DGRAM) for _ in range(2)]
        try:
            for c in clients:
                c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
                c.bind((host, 0))
                c.settimeout(5)
            sent: list[set[int]] = [set(), set()]
            for n in range(200):
                clients[n % 2].sendto(client_request(transmit=n + 1), (host, port))
                sent[n % 2].add(n + 1)
            listener.start(asyncio.get_running_loop())  # all 200 are queued: batches are full
            got: list[set[int]] = [set(), set()]
            for k, c in enumerate(clients):
                while len(got[k]) < len(sent[k]):
                    reply = await asyncio.get_running_loop().run_in_executor(None, c.recv, 200)
                    assert len(reply) == 48 and reply[0] & 7 == 4
                    got[k].add(int.from_bytes(reply[24:32], "big"))
            assert got == sent
        finally:
            listener.stop()
            for c in clients:
                c.close()
        counts = pipeline.counters()
        assert counts[("requests",)] == 200
        if batch > 1:  # some datagrams shared calls (recvmmsg: one per batch; sendmmsg: one per flush)
            assert 1 <= counts[("io_calls", "recvmmsg")] <= 200 // batch + 1 and counts[("io_calls", "sendmmsg")] >= 1
        else:
            assert ("io_calls", "recvmmsg") not in counts

    asyncio.run(main())


@pytest.mark.parametrize("batch", BATCHES)
def test_oversize_and_empty_datagrams_are_counted_drops(batch: int) -> None:
    async def main() -> None:
        listener, pipeline, port = _listener(PlainHandler(), batch, 0)
        listener.start(asyncio.get_running_loop())
        try:
            replies = await _exchange(port, [bytes(MAX_DATAGRAM + 1), b"", client_request()])
        finally:
            listener.stop()
        assert replies[0] is None and replies[1] is None and replies[2] is not None
        counts = pipeline.counters()
        assert counts[("drops", "oversize")] == 1
        assert counts[("drops", "too_short")] == 1
        assert counts[("requests",)] == 3

    asyncio.run(main())


@pytest.fixture
def sockets() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A bound server socket (kernel timestamps on) and a client socket, both on 127.0.0.1."""
    server = open_udp_socket("127.0.0.1", 0)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.settimeout(5)
    yield server, client
    server.close()
    client.close()


@pytest.mark.skipif(not mmsg.available(), reason="no recvmmsg here")
def test_batch_slots_carry_data_address_and_kernel_time(sockets: tuple[socket.socket, socket.socket]) -> None:
    server, client = sockets
    batch = mmsg.Batch(server, 8, 100)
    before = time.time_ns()
    payloads = [b"one", b"", bytes(range(100)), bytes(150)]
    for p in payloads:
        client.sendto(p, server.getsockname())
    got = []
    while len(got) < len(payloads):
        n = batch.recv()
        assert n > 0
        got += [((data, length, namelen, rx), addr, i) for i, data, length, namelen, rx, addr in batch.messages(n)]
    after = time.time_ns()
    for p, ((data, length, namelen, rx), addr, _) in zip(payloads, got, strict=True):
        assert addr == client.getsockname() and namelen == 16
        assert before <= rx <= after
        assert length == len(p) if len(p) <= 100 else length > 100  # longer than the limit: flagged
        assert data == p[:101]
    for (_, _, namelen, _), _, i in reversed(got[:3]):
        batch.queue(i, namelen, b"reply %d" % i)
    assert batch.flush() == []
    replies = {client.recv(100) for _ in range(3)}
    assert replies == {b"reply %d" % i for _, _, i in got[:3]}


class CountingVerifier(Exploding):
    """Counts the requests it verified; the reply is finished (and its time read) by the Seal."""

    name: ClassVar[str] = "slowverify"
    verified = 0

    def respond(self, request: Request, ctx: ReplyContext) -> Seal:  # type: ignore[override]
        self.verified += 1
        return Seal(lambda: ctx.reply_header(request.data, request.rx_ns) + request.trailer)


@pytest.mark.skipif(not mmsg.available(), reason="no recvmmsg here")
def test_batched_replies_are_timestamped_after_the_whole_batch_is_verified() -> None:
    """Ten requests in one receive batch: every transmit timestamp is read after the whole batch is
    verified, just before the send (sealed late), not between verifications. The clock the pipeline
    is given notes, each time it is read, how many requests were verified by then."""
    verifier = CountingVerifier()
    verified_when_read: list[int] = []

    def clock() -> int:
        verified_when_read.append(verifier.verified)
        return time.time_ns()

    async def main() -> None:
        listener, pipeline, port = _listener(verifier, 32, 10**9, clock=clock)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.settimeout(5)
            for n in range(10):  # queued before the listener reads: one batch
                c.sendto(client_request(transmit=n + 1) + bytes([1]) + bytes(19), ("127.0.0.1", port))
            listener.start(asyncio.get_running_loop())
            try:
                replies = [await asyncio.get_running_loop().run_in_executor(None, c.recv, 200) for _ in range(10)]
            finally:
                listener.stop()
        assert len(replies) == 10 and verified_when_read == [10] * 10
        assert pipeline.counters()[("replies", "slowverify")] == 10

    asyncio.run(main())


@pytest.mark.skipif(not mmsg.available(), reason="no recvmmsg here")
def test_a_batch_of_interleaved_replies_shares_one_send_call_even_with_no_hold() -> None:
    """max_hold_us 0 sends a reply as soon as its transmit time is read; an interleaved reply reads
    none (its transmit time is an earlier reply's kernel time), so a whole batch of them leaves in
    one sendmmsg, each with the earlier reply's time, while a basic reply in the batch is not held."""

    async def main() -> None:
        listener, _, port = _listener(PlainHandler(), 32, 0)
        table = listener.timestamps
        if table is None:
            pytest.skip("no kernel timestamping here")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.settimeout(5)
            requests = []
            for n in range(20):  # entries as earlier replies to this client left them, kernel-stamped
                key = ((n + 1) << 8) | 1
                table.entries[key] = ["127.0.0.1", 1_700_000_000_000_000_000 + n * 1000, True]
                requests.append(client_request()[:24] + struct.pack(">QQQ", key, 0xAAAA0000 + n, 0xBBBB0000 + n))
            requests.insert(10, client_request(transmit=0xCCCC))  # one basic request among them
            for r in requests:  # queued before the listener reads: one batch
                c.sendto(r, ("127.0.0.1", port))
            listener.start(asyncio.get_running_loop())
            try:
                replies = [await asyncio.get_running_loop().run_in_executor(None, c.recv, 200) for _ in requests]
            finally:
                listener.stop()
        origins = {struct.unpack_from(">Q", r, 24)[0]: r for r in replies}
        assert set(origins) == {0xAAAA0000 + n for n in range(20)} | {0xCCCC}
        for n in range(20):  # origin: the request's receive field; transmit: the earlier reply's time
            tx = struct.unpack_from(">Q", origins[0xAAAA0000 + n], 40)[0]
            assert ntp64_to_unix_ns(tx, time.time_ns()) // 1000 == 1_700_000_000_000_000 + n
        counts = listener.counters()
        assert counts[("interleaved_replies",)] == 20 and counts[("requests",)] == 21
        # the basic reply was sent at once (hold 0): one call up to it, one for the rest
        assert counts[("io_calls", "recvmmsg")] == 1 and counts[("io_calls", "sendmmsg")] == 2

    asyncio.run(main())


@pytest.mark.skipif(not mmsg.available(), reason="no recvmmsg here")
def test_a_datagram_that_cannot_be_sent_does_not_stop_the_rest_of_its_batch(
    sockets: tuple[socket.socket, socket.socket],
) -> None:
    server, client = sockets
    batch = mmsg.Batch(server, 4, 100)
    client.sendto(b"ping", server.getsockname())
    assert batch.recv() == 1
    ((i, _, _, namelen, _, _),) = batch.messages(1)
    batch.queue(i, namelen, b"first")
    batch.queue(i, 0, b"nowhere")  # no destination on an unconnected socket: EDESTADDRREQ
    batch.queue(i, namelen, b"last")
    assert batch.flush() == [(1, errno.EDESTADDRREQ)]  # (index in the queue, errno)
    assert [client.recv(100), client.recv(100)] == [b"first", b"last"]


def test_metrics_endpoint_bounds_idle_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """Idle connections to the metrics port cannot pile up (they would hold descriptors the NTS-KE
    listener needs): past MAX_CLIENTS they are closed at once, and each is dropped after the
    request deadline; a scrape still works afterwards."""
    monkeypatch.setattr(metrics_module, "REQUEST_DEADLINE", 0.5)

    async def main() -> None:
        server = metrics_module.MetricsServer(lambda: ({("requests",): 7}, {}))
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        port = listener.getsockname()[1]
        await server.start_on(listener)
        try:
            idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(metrics_module.MAX_CLIENTS + 8)]
            closed_at_once = 0
            for reader, _ in idle[metrics_module.MAX_CLIENTS :]:
                assert await asyncio.wait_for(reader.read(), 0.3) == b""  # EOF, not a wait for the deadline
                closed_at_once += 1
            assert closed_at_once == 8 and server.refused == 8 and server.active == metrics_module.MAX_CLIENTS
            for reader, _ in idle[: metrics_module.MAX_CLIENTS]:  # dropped at the deadline, not kept
                assert await asyncio.wait_for(reader.read(), 2) == b""
            for _, writer in idle:
                writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
            assert b"ntsd_requests_total 7" in await asyncio.wait_for(reader.read(), 2)
            writer.close()
            assert server.active == 0
        finally:
            await server.stop()

    asyncio.run(main())


@pytest.mark.skipif(not mmsg.available(), reason="no recvmmsg here")
def test_a_batched_reply_can_carry_its_source_address_and_a_stamp_request(
    sockets: tuple[socket.socket, socket.socket],
) -> None:
    """The stamp request followed the 28-byte IPv4 pktinfo message unaligned: the kernel refused that
    datagram (EINVAL) and the reply was lost (one in a burst of 64, where a wildcard socket was timed)."""
    server, client = sockets
    server.setsockopt(socket.IPPROTO_IP, mmsg.IP_PKTINFO, 1)
    batch = mmsg.Batch(server, 4, 100, pktinfo=True, timestamping=True)
    client.sendto(b"ping", server.getsockname())
    assert batch.recv() == 1
    ((i, _, _, namelen, _, _),) = batch.messages(1)
    assert batch.pktinfo_bytes(i)  # (rx may be 0: the kernel enables receive timestamps lazily)
    batch.queue(i, namelen, b"timed reply", stamp=True)
    batch.queue(i, namelen, b"plain reply")
    assert batch.flush() == []
    assert {client.recv(100), client.recv(100)} == {b"timed reply", b"plain reply"}
    before = time.time_ns()
    ((data, tx, card),) = mmsg.ErrorQueue(server, 8, 100).read()  # the timed one only, read in one call
    assert data.endswith(b"timed reply") and before - 10**9 < tx <= time.time_ns() and not card
    assert mmsg.ErrorQueue(server, 8, 100).read() == []  # (nothing more queued: no block, no error)


def test_without_kernel_timestamping_the_listener_says_so_and_serves(caplog: pytest.LogCaptureFixture) -> None:
    """A kernel (or platform) that refuses SO_TIMESTAMPING: logged, and basic replies as before."""
    from nts.core.plain import PlainHandler
    from nts.server import udp

    real = udp.kernel_timestamping
    udp.kernel_timestamping = lambda sock: False  # as where setsockopt(SO_TIMESTAMPING) failed
    try:
        listener, _, port = _listener(PlainHandler(), 1)
    finally:
        udp.kernel_timestamping = real

    async def main() -> None:
        listener.start(asyncio.get_running_loop())
        try:
            reply = await asyncio.to_thread(query, port, client_request())
            assert reply is not None and len(reply) == 48
        finally:
            listener.stop()

    with caplog.at_level("WARNING", "ntsd.udp"):
        asyncio.run(main())
    assert listener.timestamps is None
    assert "the kernel refused SO_TIMESTAMPING: no kernel transmit timestamps" in caplog.text


@pytest.mark.parametrize("batch", BATCHES)
def test_replies_after_a_pause_feed_the_cold_lag_and_back_to_back_ones_the_warm(batch: int) -> None:
    """The lag from a reply's transmit time to the kernel's is measured apart after a pause (cold,
    and corrected for, each sample with the pace of its probe) and under load (warm, measured
    only): each request is judged by the time since the listener last answered."""
    listener, _, port = _listener(PlainHandler(), batch)
    loop = asyncio.new_event_loop()
    listener.start(loop)
    try:
        stamps = listener.timestamps
        assert stamps is not None
        for _ in range(8):
            time.sleep(0.01)  # (not synchronisation: the pause is what makes the next request cold)
            assert query(port, client_request()) is not None
        wait_until(lambda: len(stamps.cold_lag.samples) == 8, what="eight cold samples")
        assert not stamps.lag.samples
        assert all(0 < pace < 50_000_000 for pace in stamps.cold_lag.paces)  # (each with its probe's duration)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(1.0)
            end = time.monotonic() + 0.05
            while time.monotonic() < end:  # back to back for 50 ms: a sample every 5 ms, all warm
                s.sendto(client_request(), ("127.0.0.1", port))
                s.recv(100)
        wait_until(lambda: len(stamps.lag.samples) >= 5, what="warm samples")
        assert len(stamps.cold_lag.samples) <= 9  # (the first of the run may count as cold)
        assert stamps.cold_lag.ns > 0 and stamps.lag.ns == 0 and stamps.lag.estimate_ns > 0
        assert not any(stamps.lag.paces)  # (no probe when warm)
    finally:
        listener.stop()
        loop.close()


class _Watched(socket.socket):
    """A listener's socket that notes each send: a probe (MSG_PROBE) or a real one."""

    events: list[str]

    def sendmsg(self, buffers: Any, ancdata: Any = (), flags: int = 0, address: Any = None) -> int:
        self.events.append("probe" if flags & 0x10 else "send")
        return super().sendmsg(buffers, ancdata, flags, address)


@pytest.mark.parametrize("batch", BATCHES)
def test_after_a_pause_the_way_to_the_wire_is_walked_before_the_transmit_time_is_read(batch: int) -> None:
    """A request after a pause: the listener probes the send path to its client (MSG_PROBE, which
    sends nothing) before the pipeline reads the clock for the reply, so the cold path's extra
    microseconds are not in the time served; the client still gets exactly one datagram."""
    events: list[str] = []
    plain = open_udp_socket("127.0.0.1", 0)
    sock = _Watched(fileno=plain.detach())
    sock.events = events
    state = server_state(ClockSettings(local_reference=True), None, -20, time.time_ns())

    def clock() -> int:
        events.append("clock")
        return time.time_ns()

    def make(stats: Counters, deferred_stats: Counters, timestamps: TxTimestamps | None = None) -> Pipeline:
        return Pipeline(state=state, authenticators=[PlainHandler()], clock=clock, stats=stats,
                        deferred_stats=deferred_stats, timestamps=timestamps)  # fmt: skip

    listener = UdpListener(sock, make, batch=batch, hold_ns=50_000)
    if listener.timestamps is None:
        pytest.skip("no kernel timestamping here")
    port = sock.getsockname()[1]
    loop = asyncio.new_event_loop()
    listener.start(loop)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.settimeout(1.0)
            for n in range(3):
                time.sleep(0.005)  # (not synchronisation: the pause is what makes the request cold)
                c.sendto(client_request(transmit=n + 1), ("127.0.0.1", port))
                assert int.from_bytes(c.recv(100)[24:32], "big") == n + 1
            c.setblocking(False)
            with pytest.raises(BlockingIOError):  # nothing more came (a probe sends nothing)
                c.recv(100)
    finally:
        listener.stop()
        loop.close()
    assert events == ["probe", "clock", "send"] * 3
