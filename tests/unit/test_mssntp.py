"""MS-SNTP: ntp_signd framing vectors, claims against MAC, and a deliberately slow fake signer."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import select
import struct
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from mssntp.auth import MsSntpPlugin, MsSntpSettings
from mssntp.signd import (
    SIGNING_FAILURE,
    SIGNING_SUCCESS,
    ReplyReader,
    SignedReply,
    check_signed,
    encode_reply,
    encode_request,
    parse_reply,
)
from mssntp.signer import SigndClient
from nts.core.stats import Counters
from nts.wire.errors import ParseError
from tests.helpers import async_wait_until

PACKET = bytes(range(48))


def test_request_vector() -> None:
    assert encode_request(0x0102, 1104, PACKET).hex() == (
        "00000040"  # length 64
        "00000000"  # version 0
        "00000000"  # SIGN_TO_CLIENT
        "0102"
        "0000"  # packet id, NDR padding
        "50040000" + PACKET.hex()  # key id 1104, little-endian
    )


def test_reply_vectors_both_ways() -> None:
    signed = PACKET + struct.pack("<I", 1104) + bytes(16)
    wire = encode_reply(SIGNING_SUCCESS, 0x0102, signed)
    assert wire.hex() == "00000050000000000000000300000102" + signed.hex()
    assert ReplyReader().feed(wire) == [SignedReply(SIGNING_SUCCESS, 0x0102, signed)]
    failure = bytes.fromhex("0000000cdeadbeef0000000400000007")  # Samba leaves version unset
    assert ReplyReader().feed(failure) == [SignedReply(SIGNING_FAILURE, 7, b"")]


def test_reader_is_incremental_and_bounded() -> None:
    wire = encode_reply(SIGNING_SUCCESS, 1, PACKET + bytes(20)) + encode_reply(SIGNING_FAILURE, 2)
    reader, got = ReplyReader(), []
    for b in wire:
        got += reader.feed(bytes([b]))
    assert [r.packet_id for r in got] == [1, 2]
    with pytest.raises(ParseError) as exc:
        ReplyReader().feed(struct.pack(">I", 5000))
    assert exc.value.code == "signd_frame"
    with pytest.raises(ParseError):
        parse_reply(bytes.fromhex("000000000000000300000001") + bytes(10))  # success, wrong size


def test_check_signed_insists_on_our_packet() -> None:
    good = SignedReply(SIGNING_SUCCESS, 5, PACKET + struct.pack("<I", 9) + bytes(16))
    assert check_signed(good, 5, 9, PACKET) == good.signed_packet
    assert check_signed(good, 6, 9, PACKET) is None  # another request's reply
    assert check_signed(good, 5, 8, PACKET) is None  # another key
    assert check_signed(good, 5, 9, bytes(48)) is None  # Samba signed something else


def _signed(packet_id: int, body: bytes) -> bytes:
    return encode_reply(SIGNING_SUCCESS, packet_id, body[16:] + body[12:16] + bytes(16))


# key id -> what a broken signer answers instead of a good reply
BROKEN: dict[int, Callable[[int, bytes], bytes]] = {
    500: lambda pid, body: struct.pack(">I", 1 << 20) + bytes(8),  # a frame too large to be Samba's
    501: lambda pid, body: encode_reply(9, pid),  # an unknown op
    502: lambda pid, body: _signed((pid + 1) & 0xFFFF, body),  # the answer to another request
    503: lambda pid, body: encode_reply(SIGNING_SUCCESS, pid, bytes(68)),  # signs some other packet
    504: lambda pid, body: _signed(pid, body) * 2,  # two answers to one request
    505: lambda pid, body: encode_reply(SIGNING_SUCCESS, pid, bytes(20)),  # a success that is too short
}


class FakeSigner:
    """A unix-socket ntp_signd stand-in: delays, refuses or hangs up, as told."""

    def __init__(self, path: Path, delay: float = 0.0) -> None:
        self.path, self.delay, self.requests = path, delay, 0
        self.on_request: Callable[[], None] = lambda: None  # e.g. to move a test's clock on
        self.server: asyncio.base_events.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def hang_up_all(self) -> None:
        """What a Samba restart does to the connections it has: closes them."""
        for writer in list(self.writers):
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                (length,) = struct.unpack(">I", await reader.readexactly(4))
                body = await reader.readexactly(length)
                self.requests += 1
                self.on_request()
                packet_id = struct.unpack_from(">H", body, 8)[0]
                key_id = struct.unpack_from("<I", body, 12)[0]
                await asyncio.sleep(self.delay)
                if key_id == 666:  # like a disabled account: hang up without a word
                    writer.close()
                    return
                if key_id == 777:  # a signer trickling its answer a byte at a time
                    for byte in encode_reply(SIGNING_SUCCESS, packet_id, body[16:] + body[12:16] + bytes(16)):
                        writer.write(bytes([byte]))
                        await writer.drain()
                        await asyncio.sleep(0.05)
                    continue
                if key_id == 404:
                    writer.write(encode_reply(SIGNING_FAILURE, packet_id))
                elif key_id in BROKEN:  # a broken or hostile signer
                    writer.write(BROKEN[key_id](packet_id, body))
                else:
                    writer.write(encode_reply(SIGNING_SUCCESS, packet_id, body[16:] + body[12:16] + bytes(16)))
                await writer.drain()
        writer.close()


@contextlib.asynccontextmanager
async def fake(delay: float = 0.0) -> AsyncIterator[FakeSigner]:
    with tempfile.TemporaryDirectory() as tmp:
        signer = FakeSigner(Path(tmp) / "socket", delay)
        signer.server = await asyncio.start_unix_server(signer.handle, str(signer.path))
        try:
            yield signer
        finally:
            await signer.hang_up_all()  # (its connections' transports end with the loop, not after it)
            # Python 3.13.0's Server cannot take a connection it accepted before close() but made a
            # transport for after (an assertion, then a TypeError in the half-made transport's
            # __del__): let the connections the kernel holds be accepted and made first
            while select.select(signer.server.sockets, [], [], 0)[0]:
                await asyncio.sleep(0)
            await asyncio.sleep(0)
            signer.server.close()
            if sys.version_info >= (3, 13):  # and those whose handler has not run yet are closed
                signer.server.close_clients()
                async with asyncio.timeout(5):
                    await signer.server.wait_closed()


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro())  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def signing(signer: FakeSigner, stats: Counters, **settings: Any) -> AsyncIterator[SigndClient]:
    """A started SigndClient on `signer`'s socket (one connection unless told), stopped after."""
    client = SigndClient(signer.path, stats, **{"connections": 1, "deadline": 1.0, **settings})
    await client.start()
    try:
        yield client
    finally:
        await client.stop()


def test_outcomes_and_recovery_after_a_hang_up() -> None:
    async def main() -> None:
        async with fake() as signer:
            stats = Counters()
            async with signing(signer, stats) as client:
                assert await client.sign(1, PACKET) == PACKET + struct.pack("<I", 1) + bytes(16)
                assert await client.sign(404, PACKET) is None
                assert await client.sign(666, PACKET) is None  # the connection is dropped...
                assert await client.sign(2, PACKET) is not None  # ...and comes back
            assert stats.counts[("mssntp_sign", "signed")] == 2
            assert stats.counts[("mssntp_sign", "refused")] == 1
            assert stats.counts[("mssntp_sign", "connection_closed")] == 1
            assert stats.counts[("mssntp_sign", "connects")] == 2

    run(main)


def test_a_broken_signer_costs_its_own_requests_and_the_connection_recovers() -> None:
    """Whatever the signer sends, the request it answers gets no reply (never a wrong one), the
    outcome is counted, a confused connection is replaced, and the next request is signed."""
    expected = {
        500: "connection_lost", 501: "connection_lost", 502: "protocol_error", 503: "refused",
        504: "protocol_error", 505: "connection_lost",
    }  # fmt: skip

    async def main() -> None:
        async with fake() as signer:
            stats = Counters()
            async with signing(signer, stats) as client:
                for key_id, outcome in expected.items():
                    before = stats.counts.get(("mssntp_sign", outcome), 0)
                    assert await client.sign(key_id, PACKET) is None
                    assert stats.counts.get(("mssntp_sign", outcome), 0) == before + 1, (key_id, stats.counts)
                    assert await client.sign(7, PACKET) == PACKET + struct.pack("<I", 7) + bytes(16)
            assert stats.counts[("mssntp_sign", "signed")] == len(expected)
            assert stats.counts[("mssntp_sign", "connects")] == 1 + 5  # all but the refusal replaced it

    run(main)


def test_a_samba_restart_costs_no_request() -> None:
    """Connections that Samba closes while they are idle (it restarted) are replaced at once, not by
    losing the next request on each of them."""

    async def main() -> None:
        async with fake() as signer:
            stats = Counters()

            def connects() -> int:
                return stats.counts.get(("mssntp_sign", "connects"), 0)

            async with signing(signer, stats, connections=2) as client:
                assert await client.sign(1, PACKET) is not None
                await async_wait_until(lambda: connects() == 2)
                await signer.hang_up_all()
                await async_wait_until(lambda: connects() == 4)
                for key_id in range(2, 6):
                    assert await client.sign(key_id, PACKET) == PACKET + struct.pack("<I", key_id) + bytes(16)
            assert stats.counts[("mssntp_sign", "idle_connection_lost")] == 2
            assert stats.counts[("mssntp_sign", "signed")] == 5
            assert ("mssntp_sign", "connection_lost") not in stats.counts

    run(main)


def test_slow_signer_deadline_and_queue_bound() -> None:
    async def main() -> None:
        async with fake(delay=0.3) as signer:
            stats = Counters()
            async with signing(signer, stats, queue_size=3, deadline=0.1) as client:
                results = await asyncio.gather(*(client.sign(i, PACKET) for i in range(10)))
            assert results == [None] * 10
            assert stats.counts[("mssntp_sign", "queue_full")] >= 6  # one in flight, 3 queued
            assert stats.counts[("mssntp_sign", "timeout")] >= 1
            # every request ended by the queue bound or the deadline: none waited for the slow signer
            assert stats.counts[("mssntp_sign", "queue_full")] + stats.counts[("mssntp_sign", "timeout")] == 10
            assert ("mssntp_sign", "signed") not in stats.counts
            assert signer.requests <= 2  # timed-out queued requests were never sent

    run(main)


def test_no_signer_means_no_reply_fast() -> None:
    async def main() -> None:
        stats = Counters()
        client = SigndClient(Path("/nonexistent/ntp_signd/socket"), stats, connections=1, deadline=0.05)
        await client.start()
        try:
            assert await client.sign(1, PACKET) is None
        finally:
            await client.stop()
        assert stats.counts[("mssntp_sign", "timeout")] == 1

    run(main)


def test_claims_mssntp_vs_mac(tmp_path: Path) -> None:
    import ipaddress

    from legacy.mac import MacPlugin, MacSettings
    from nts.core.handler import Request

    keys = tmp_path / "ntp.keys"
    keys.write_text("7 MD5 sevenseven\n")
    os.chmod(keys, 0o600)
    mac = MacPlugin(MacSettings(keys=keys))
    ms = MsSntpPlugin(MsSntpSettings(networks=(ipaddress.ip_network("10.0.0.0/8"),)))

    def req(key_be: bytes, client: str) -> Request:
        return Request(bytes([0x1B]) + bytes(67), (), key_be + bytes(16), (client, 123), 0)

    domain_rid = struct.pack("<I", 1104)
    assert (mac.matches(req(domain_rid, "10.1.1.1")), ms.matches(req(domain_rid, "10.1.1.1"))) == (1, 2)
    assert (mac.matches(req(struct.pack(">I", 7), "10.1.1.1")), ms.matches(req(struct.pack(">I", 7), "10.1.1.1"))) == (
        2,
        2,
    )
    assert ms.matches(req(domain_rid, "192.0.2.1")) == 0  # not the domain: MS-SNTP stays silent
    assert MsSntpPlugin(MsSntpSettings()).matches(req(domain_rid, "10.1.1.1")) == 0  # off by default


def test_the_rate_table_is_bounded_reported_and_kept_across_reloads() -> None:
    import dataclasses
    import ipaddress

    from nts.core.handler import Request

    settings = MsSntpSettings(networks=(ipaddress.ip_network("10.0.0.0/8"),), max_clients=16)
    ms = MsSntpPlugin(settings)
    trailer = struct.pack("<I", 1104) + bytes(16)
    for i in range(40):  # more addresses than the bound: the table drops its older half when full
        ms.respond(Request(bytes([0x1B]) + bytes(47), (), trailer, (f"10.0.0.{i}", 123), i), None)  # type: ignore[arg-type]
    tracked = ms.gauges()["mssntp_rate_limit_clients"]
    assert 8 <= tracked <= 16
    assert ms.reconfigure(dataclasses.replace(settings, networks=(ipaddress.ip_network("10.0.0.0/16"),)))
    assert ms.gauges()["mssntp_rate_limit_clients"] == tracked  # a reload of other settings keeps the table
    assert ms.reconfigure(dataclasses.replace(settings, max_clients=64))
    assert ms.gauges()["mssntp_rate_limit_clients"] == 0  # a new bound: a new table
    for i in range(40):
        ms.respond(Request(bytes([0x1B]) + bytes(47), (), trailer, (f"10.0.0.{i}", 123), i), None)  # type: ignore[arg-type]
    assert ms.gauges()["mssntp_rate_limit_clients"] == 40


def test_a_reload_keeps_the_signer_connections_and_counters() -> None:
    """SIGHUP replaced the plugin, so every reload tore down the connections to Samba, failed the
    requests waiting for a signature and reset the MS-SNTP counters; now it applies in place."""
    import dataclasses
    import ipaddress

    async def main() -> None:
        async with fake() as signer:
            settings = MsSntpSettings(socket=signer.path, networks=(ipaddress.ip_network("10.0.0.0/8"),), connections=2)
            plugin = MsSntpPlugin(settings)
            await plugin.start()
            try:
                assert await plugin.client.sign(1, PACKET) is not None
                client = plugin.client
                wider = dataclasses.replace(settings, networks=(ipaddress.ip_network("0.0.0.0/0"),), deadline=2.0)
                assert plugin.reconfigure(wider)
                assert plugin.client is client and client.deadline == 2.0
                assert "192.0.2.1" in plugin.networks
                assert await plugin.client.sign(2, PACKET) is not None
                assert plugin.counters()[("mssntp_sign", "signed")] == 2
                assert plugin.counters()[("mssntp_sign", "connects")] == 2  # the same two connections
                assert not plugin.reconfigure(dataclasses.replace(wider, connections=3))  # needs a new client
            finally:
                await plugin.stop()

    run(main)


def test_stop_never_hangs_whatever_the_signer_is_doing() -> None:
    """Stopping (at shutdown, or a reload replacing the client) while requests are signed and Samba
    hangs up at random moments. With asyncio.wait_for, a cancellation arriving as a read completed
    was swallowed now and then (Python 3.11), the worker went on waiting for requests, and stop()
    with it: a stuck shutdown or reload. Seeded: a failure replays."""
    rng = random.Random(1)

    async def trial() -> None:
        async with fake() as signer:
            client = SigndClient(signer.path, Counters(), connections=4, deadline=0.3)
            await client.start()
            pending: list[asyncio.Future[bytes | None]] = []
            for _ in range(rng.randrange(1, 30)):
                pending += [
                    asyncio.ensure_future(client.sign(rng.randrange(100), PACKET)) for _ in range(rng.randrange(6))
                ]
                if rng.random() < 0.2:
                    await signer.hang_up_all()
                await asyncio.sleep(rng.choice([0, 0, 0.0001, 0.001, 0.003]))
            async with asyncio.timeout(3):
                await client.stop()
            async with asyncio.timeout(3):
                await asyncio.gather(*pending)

    async def main() -> None:
        for _ in range(40):
            await trial()

    run(main)


def test_a_sweep_of_machine_accounts_from_one_address_is_refused_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    """Timeroast: one address had 29 distinct RIDs signed in 22 s (the packet rate limit let them
    through). Now the plugin hands Samba 4 accounts per address per hour and drops the rest."""
    import ipaddress

    from nts.core.decisions import Defer, Drop
    from nts.core.handler import Request

    ms = MsSntpPlugin(MsSntpSettings(networks=(ipaddress.ip_network("10.0.0.0/8"),), rate=100, burst=100))
    answers = []
    for rid in range(29):
        trailer = struct.pack("<I", 1100 + rid) + bytes(16)
        request = Request(bytes([0x1B]) + bytes(47), (), trailer, ("10.0.0.9", 123), rid * 760_000_000)
        answers.append(ms.respond(request, None))  # type: ignore[arg-type]
    assert [type(a) for a in answers] == [Defer] * 4 + [Drop] * 25
    assert answers[-1] == Drop("mssntp_accounts_per_client")
    assert "a password-harvesting sweep (Timeroast)?" in caplog.text
    assert ms.gauges()["mssntp_account_clients"] == 1


class StepClock:
    """A monotonic clock that moves only when told (the fake signer moves it by its "work")."""

    def __init__(self) -> None:
        self.now = 10**12

    def __call__(self) -> int:
        return self.now


def test_a_burst_cannot_move_the_time_served() -> None:
    """A burst from the domain's networks left +58-65 ms in later replies (the compensation averaged
    queue waits). Now the reply is built as its request goes to Samba, and moved on only by Samba's
    own round trip, capped (1 ms): here Samba takes 10 ms of the test's clock per request, a burst of
    30 queues for 300 ms, and no reply is moved by more than the cap."""

    async def main(cap: int) -> list[int]:
        clock, given = StepClock(), []

        def build(delay: int) -> bytes:
            given.append(delay)
            return struct.pack(">Q", delay) + bytes(40)

        async with fake() as signer:

            def work() -> None:
                clock.now += 10_000_000

            signer.on_request = work
            client = SigndClient(signer.path, Counters(), 1, 64, 5.0, max_compensation_ns=cap, clock=clock)
            await client.start()
            try:
                results = await asyncio.gather(*(client.sign(i + 1, build) for i in range(30)))
            finally:
                await client.stop()
        assert all(r is not None for r in results)
        return given

    assert run_value(main(1_000_000)) == [0] + [1_000_000] * 29  # the first: nothing measured yet
    assert run_value(main(10**9)) == [0] + [10_000_000] * 29  # uncapped: Samba's 10 ms, never the queue


def test_the_compensation_decays_without_fresh_measurements() -> None:
    clock = StepClock()
    client = SigndClient(Path("/nonexistent"), Counters(), clock=clock)
    assert client.compensation_ns() == 0
    client._measured(800_000)
    assert client.compensation_ns() == 800_000
    clock.now += 10 * 10**9
    assert client.compensation_ns() == 400_000
    clock.now += 20 * 10**9
    assert client.compensation_ns() == 100_000
    client._measured(5_000_000)  # a slow spell: the average rises, the correction stays capped
    assert client.compensation_ns() == 1_000_000


def run_value(coro: Awaitable[list[int]]) -> list[int]:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_a_trickling_signer_does_not_hold_a_connection_past_the_deadline() -> None:
    """The signer's time-out was per read: a frame sent a byte every 50 ms (about 4 s in all) held
    the connection, and every request behind it, far past the job's deadline. Now the exchange as a
    whole has one."""

    async def main() -> None:
        async with fake() as signer:
            stats = Counters()
            async with signing(signer, stats, deadline=0.2) as client:
                assert await client.sign(777, PACKET) is None  # the job's own deadline
                # given up at twice the deadline and replaced (the whole answer would take ~4 s)
                await async_wait_until(lambda: stats.counts.get(("mssntp_sign", "connects")) == 2, 2.0)
                assert await client.sign(1, PACKET) is not None  # a fresh connection serves the next

    run(main)


def test_with_workers_each_takes_its_share_of_the_new_account_budget() -> None:
    import ipaddress

    from nts.core.policy import AccessPolicy, Shared

    ms = MsSntpPlugin(MsSntpSettings(networks=(ipaddress.ip_network("10.0.0.0/8"),), new_accounts_burst=500))
    assert (ms.accounts.limits.new_rate, ms.accounts.limits.new_burst) == (2.0, 500)
    ms.share(Shared(AccessPolicy(), workers=4))
    assert (ms.accounts.limits.new_rate, ms.accounts.limits.new_burst) == (0.5, 125)


def test_signing_runs_on_a_niced_thread_of_its_own_and_stops_with_the_plugin() -> None:
    """The plugin hands a request over (a Defer to its signer) without waiting; the signer builds
    the reply as the request goes to Samba and calls back, on its own niced thread, with the
    signed reply; stopping the plugin ends that thread."""
    import ipaddress
    import threading
    import time

    from mssntp.signer import NICE
    from nts.core.clockstate import ClockSettings, Replies, server_state
    from nts.core.decisions import Defer
    from nts.core.handler import Request

    ctx = Replies(server_state(ClockSettings(local_reference=True), None, -20, time.time_ns()), time.time_ns)
    request = Request(bytes([0x1B]) + bytes(47), (), struct.pack("<I", 1104) + bytes(16), ("10.1.2.3", 123), 1)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with fake() as signer:
            settings = MsSntpSettings(socket=signer.path, networks=(ipaddress.ip_network("10.0.0.0/8"),))
            plugin = MsSntpPlugin(settings)
            await plugin.start()
            try:
                decision = plugin.respond(request, ctx)
                assert isinstance(decision, Defer) and decision.to is plugin.client
                got: asyncio.Future[tuple[bytes | None, int, int]] = loop.create_future()

                def done(signed: bytes | None, _why: str) -> None:
                    tid = threading.get_native_id()
                    where = (signed, tid, os.getpriority(os.PRIO_PROCESS, tid))
                    loop.call_soon_threadsafe(got.set_result, where)

                assert plugin.client.submit([(decision.job, done)]) == []
                signed, tid, nice = await asyncio.wait_for(got, 5)
                assert signed is not None and len(signed) == 68 and signed[48:52] == struct.pack("<I", 1104)
                assert tid != threading.get_native_id()
                assert nice == os.getpriority(os.PRIO_PROCESS, 0) + NICE and plugin.client.niced
                thread = plugin.client._thread
            finally:
                await plugin.stop()
            assert thread is not None and not thread.is_alive()
            with pytest.raises(RuntimeError):  # stopped: the listener counts what it could not hand over
                plugin.client.submit([(decision.job, done)])

    run(main)
