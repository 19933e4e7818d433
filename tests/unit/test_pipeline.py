"""The association core, driven with bytes and a fake clock (no sockets)."""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from typing import ClassVar

import pytest

from nts.core.clockstate import ClockSettings, server_state
from nts.core.decisions import Defer, Done, Drop, Nak, Seal
from nts.core.handler import ReplyContext, Request, RequestHandler
from nts.core.pipeline import Pipeline
from nts.core.plain import PlainHandler
from nts.core.policy import AccessPolicy, KissLimiter, NetworkSet, RateLimiter, RateSettings
from nts.wire.packet import parse_packet
from nts.wire.timestamps import unix_ns_to_ntp64
from tests.helpers import client_request

T0 = 1_800_000_000 * 10**9
CLIENT = ("192.0.2.7", 40000)
STATE = server_state(ClockSettings(stratum=1, reference_id=b"LOCL", local_reference=True), None, -23, T0)


class FakeClock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def make(**kw: object) -> Pipeline:
    kw.setdefault("authenticators", [PlainHandler()])
    return Pipeline(state=STATE, clock=FakeClock(T0 + 1000), **kw)  # type: ignore[arg-type]


def test_plain_reply_fields() -> None:
    p = make()
    req = client_request(version=4, transmit=0x0102030405060708, poll=10)
    reply = p.handle(req, CLIENT, T0)
    assert isinstance(reply, bytes) and len(reply) == 48
    h = parse_packet(reply).header
    assert (h.leap, h.version, h.mode, h.stratum, h.poll, h.precision) == (0, 4, 4, 1, 10, -23)
    assert h.reference_id == b"LOCL"
    assert h.origin_ts == 0x0102030405060708
    assert h.receive_ts == unix_ns_to_ntp64(T0) | 1  # flagged as ours (interleaved mode, RFC 9769)
    assert h.transmit_ts == unix_ns_to_ntp64(T0 + 1000) & ~1
    assert p.counters()[("replies", "none")] == 1


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_reply_echoes_version(version: int) -> None:
    reply = make().handle(client_request(version=version), CLIENT, T0)
    assert isinstance(reply, bytes)
    assert parse_packet(reply).header.version == version


@pytest.mark.parametrize(
    ("mode", "reason"),
    [(0, "mode_0"), (2, "mode_2"), (4, "mode_4"), (5, "mode_5"), (6, "mode_6"), (7, "mode_7")],
)
def test_only_modes_3_and_1_are_answered(mode: int, reason: str) -> None:
    p = make()
    req = bytes([(4 << 3) | mode]) + client_request()[1:]
    assert p.handle(req, CLIENT, T0) == Drop(reason)
    assert p.counters()[("drops", reason)] == 1


def test_short_ntpq_probe_is_counted_as_mode_6_and_short_client_as_short() -> None:
    assert make().handle(bytes.fromhex("160200010000000000000000"), CLIENT, T0) == Drop("mode_6")
    assert make().handle(client_request()[:47], CLIENT, T0) == Drop("too_short")
    assert make().handle(b"", CLIENT, T0) == Drop("too_short")


@pytest.mark.parametrize("version", [0, 5, 7])
def test_bad_versions_dropped(version: int) -> None:
    assert make().handle(client_request(version=version), CLIENT, T0) == Drop("bad_version")


def test_malformed_body_dropped_with_code() -> None:
    assert make().handle(client_request() + bytes(7), CLIENT, T0) == Drop("malformed_trailer")


def test_era_rollover_timestamps() -> None:
    after_2036 = 2_085_978_496 * 10**9 + 5 * 10**9
    assert unix_ns_to_ntp64(after_2036) == 5 << 32
    reply = Pipeline(state=STATE, clock=FakeClock(after_2036), authenticators=[PlainHandler()]).handle(
        client_request(), CLIENT, after_2036
    )
    assert isinstance(reply, bytes)
    assert parse_packet(reply).header.receive_ts == 5 << 32 | 1


def nets(*cidrs: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(c) for c in cidrs]


def test_denied_client_gets_deny_kod() -> None:
    p = make(access=AccessPolicy(deny=nets("192.0.2.0/24")))
    reply = p.handle(client_request(), CLIENT, T0)
    assert isinstance(reply, bytes)
    h = parse_packet(reply).header
    assert (h.stratum, h.reference_id, h.leap) == (0, b"DENY", 3)
    assert p.counters()[("kod", "DENY")] == 1


def test_client_outside_allow_list_gets_rstr_or_nothing() -> None:
    p = make(access=AccessPolicy(allow=nets("10.0.0.0/8")))
    reply = p.handle(client_request(), CLIENT, T0)
    assert isinstance(reply, bytes) and parse_packet(reply).header.reference_id == b"RSTR"
    quiet = make(access=AccessPolicy(allow=nets("10.0.0.0/8")), deny_kod=False)
    assert quiet.handle(client_request(), CLIENT, T0) == Drop("access_denied")
    assert isinstance(quiet.handle(client_request(), ("10.1.2.3", 1), T0), bytes)


def test_deny_and_rstr_kods_are_rate_limited_per_address() -> None:
    """A spoofed denied source got 10,000 DENY replies in 2 s (an unlimited 1:1 reflector): now at
    most one KoD per address per kod_interval, the rest dropped and counted."""
    kods = KissLimiter(1.0, 1000)
    p = make(access=AccessPolicy(deny=nets("192.0.2.0/24"), allow=nets("192.0.2.0/24", "10.0.0.0/8")), deny_kods=kods)
    step = 200_000  # 10,000 requests in 2 s from each of two spoofed victims
    replies = {"192.0.2.7": 0, "198.51.100.1": 0}
    for i in range(10_000):
        for victim in replies:
            replies[victim] += isinstance(p.handle(client_request(), (victim, 123), T0 + i * step), bytes)
    assert replies == {"192.0.2.7": 2, "198.51.100.1": 2}  # at 0 s and 1 s
    counts = p.counters()
    assert (counts[("kod", "DENY")], counts[("kod", "RSTR")]) == (2, 2)
    assert counts[("drops", "access_denied")] == 20_000
    assert isinstance(p.handle(client_request(), ("10.1.2.3", 1), T0), bytes)  # the allowed are served


def test_rate_limit_answers_rate_kod_then_drops() -> None:
    p = make(rate=RateLimiter(RateSettings(rate=1, burst=2, kod=True, kod_interval=1)))
    outcomes = [p.handle(client_request(), CLIENT, T0) for _ in range(4)]
    assert all(isinstance(o, bytes) for o in outcomes[:2])
    third = outcomes[2]
    assert isinstance(third, bytes) and parse_packet(third).header.reference_id == b"RATE"
    assert outcomes[3] == Drop("rate_limited")
    # one second later the client has earned one request again
    assert isinstance(p.handle(client_request(), CLIENT, T0 + 10**9), bytes)


def test_require_auth_refuses_plain_requests() -> None:
    p = make(require_auth=NetworkSet(nets("192.0.2.0/24")))
    assert p.handle(client_request(), CLIENT, T0) == Drop("auth_required")
    assert isinstance(p.handle(client_request(), ("198.51.100.1", 1), T0), bytes)


class TrailerAuth(RequestHandler):
    """A test plugin that answers requests with a 20-byte trailer, to exercise dispatch."""

    name: ClassVar[str] = "test"
    order: ClassVar[int] = 10

    def __init__(self, answer: str) -> None:
        self.answer = answer

    def matches(self, request: Request) -> bool:
        return len(request.trailer) == 20

    def submit(self, work: Sequence[tuple[object, Done]]) -> list[object]:  # (a Finisher)
        return []

    def respond(self, request: Request, ctx: ReplyContext) -> bytes | Nak | Drop | Defer | Seal:
        if self.answer == "time":
            return ctx.reply_header(request.data, request.rx_ns) + request.trailer
        if self.answer == "long":
            return ctx.reply_header(request.data, request.rx_ns) + bytes(40)
        if self.answer == "nak":
            return Nak(ctx.reply_header(request.data, request.rx_ns) + bytes(4), "bad_mac")
        if self.answer == "defer":
            return Defer(self, None, self.name, request.client)
        if self.answer in ("seal", "seal_long"):
            extra = bytes(40) if self.answer == "seal_long" else request.trailer
            return Seal(lambda: ctx.reply_header(request.data, request.rx_ns) + extra)
        return Drop("test_refused")


def test_dispatch_by_shape_and_reply_guard() -> None:
    req = client_request() + bytes(20)
    p = make(authenticators=[PlainHandler(), TrailerAuth("time")])
    reply = p.handle(req, CLIENT, T0)
    assert isinstance(reply, bytes) and len(reply) == 68
    assert p.counters()[("replies", "test")] == 1
    long = make(authenticators=[PlainHandler(), TrailerAuth("long")])
    assert long.handle(req, CLIENT, T0) == Drop("reply_too_long")
    nak = make(authenticators=[TrailerAuth("nak")])
    out = nak.handle(req, CLIENT, T0)
    assert isinstance(out, bytes) and len(out) == 52
    assert nak.counters()[("naks", "test", "bad_mac")] == 1
    deferred = make(authenticators=[TrailerAuth("defer")])
    d = deferred.handle(req, CLIENT, T0)
    assert isinstance(d, Defer) and d.name == "test"
    assert deferred.check_deferred(req, None, "test") is None
    assert deferred.check_deferred(req, bytes(68), "test") == bytes(68)
    assert deferred.check_deferred(req, bytes(69), "test") is None
    counts = deferred.counters()
    assert counts[("drops", "test_failed")] == 1 and counts[("replies", "test")] == 1
    assert counts[("drops", "reply_too_long")] == 1


class FastAuth(TrailerAuth):
    """Answers 20-byte trailers whose first byte is 1 on the fast path, the rest on the general path."""

    def fast(self, data: bytes, client: tuple[str, int], rx_ns: int, ctx: ReplyContext) -> Seal | None:
        if len(data) != 68 or data[48] != 1:
            return None
        return Seal(lambda: ctx.reply_header(data, rx_ns) + b"fast" + bytes(16))


@pytest.mark.parametrize("path", ["general", "fast"])
def test_a_seal_reads_the_transmit_time_when_finished_and_counts_then(path: str) -> None:
    """With `late`, a verified request is a Seal: nothing is counted and no time read until seal()."""
    clock = FakeClock(T0 + 1000)
    p = Pipeline(state=STATE, clock=clock, authenticators=[FastAuth("seal")])
    req = client_request() + bytes([1 if path == "fast" else 2]) + bytes(19)
    pending = p.handle(req, CLIENT, T0, late=True)
    assert isinstance(pending, Seal) and pending.limit == 68
    assert ("replies", "test") not in p.counters()
    clock.now = T0 + 5_000_000  # the rest of the batch was verified meanwhile
    reply = pending.complete()
    assert isinstance(reply, bytes) and len(reply) == 68
    assert struct.unpack_from(">Q", reply, 40)[0] == unix_ns_to_ntp64(T0 + 5_000_000) & ~1  # transmit: when sealed
    assert (reply[48:52] == b"fast") == (path == "fast")
    assert p.counters()[("replies", "test")] == 1
    now = p.handle(req, CLIENT, T0)  # without `late`: finished at once
    assert isinstance(now, bytes) and p.counters()[("replies", "test")] == 2


def test_a_seal_that_grows_the_reply_is_dropped() -> None:
    p = make(authenticators=[TrailerAuth("seal_long")])
    pending = p.handle(client_request() + bytes(20), CLIENT, T0, late=True)
    assert isinstance(pending, Seal)
    assert pending.complete() == Drop("reply_too_long")
    assert p.counters()[("drops", "reply_too_long")] == 1 and ("replies", "test") not in p.counters()


def test_no_authenticator_for_the_shape() -> None:
    p = make()  # plain only: a MAC-shaped request has no taker
    assert p.handle(client_request() + bytes(20), CLIENT, T0) == Drop("no_authenticator")


def test_plain_answers_unknown_extension_fields() -> None:
    field = struct.pack(">HH", 0x7777, 28) + bytes(24)
    reply = make().handle(client_request() + field, CLIENT, T0)
    assert isinstance(reply, bytes) and len(reply) == 48


def test_reply_header_timestamps_and_echoes() -> None:
    from nts.core.clockstate import Replies, ServerState

    state = ServerState(0, 2, -20, 0x10, 0x20, b"KERN", 0x0102030405060708)
    rx_ns = 1_700_000_000 * 10**9 + 500_000_000
    replies = Replies(state, FakeClock(rx_ns + 1000))
    request = bytes([0x1B, 0, 10, 0]) + bytes(36) + bytes(range(8))
    reply = replies.reply_header(request, rx_ns, tx_delay_ns=500)
    assert reply[:4] == bytes([0x1C, 2, 10, 0xEC])  # leap 0, version 3 (the request's), mode 4; poll echoed
    assert reply[4:16] == bytes.fromhex("00000010 00000020") + b"KERN"
    assert reply[16:24] == bytes.fromhex("0102030405060708") and reply[24:32] == bytes(range(8))
    # the receive timestamp with its lowest bit set, the transmit one with it clear (RFC 9769's flag)
    assert reply[32:48] == struct.pack(">QQ", unix_ns_to_ntp64(rx_ns) | 1, unix_ns_to_ntp64(rx_ns + 1500) & ~1)
    assert unix_ns_to_ntp64(rx_ns) == (1_700_000_000 + 2_208_988_800) << 32 | 1 << 31
