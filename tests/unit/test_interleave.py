"""Interleaved mode's server side, sans-IO: which requests get interleaved replies, and the table's bounds."""

from __future__ import annotations

import random
import statistics
import struct

from nts.core.clockstate import Replies, ServerState
from nts.core.interleave import TxLag, TxTimestamps
from nts.wire.packet import parse_packet
from nts.wire.timestamps import unix_ns_to_ntp64

STATE = ServerState(0, 1, -20, 0, 0, b"LOCL", 0)
T = 1_800_000_000 * 10**9


def request(origin: int = 0, receive: int = 0, transmit: int = 0x1234, mode: int = 3, version: int = 4) -> bytes:
    return (
        struct.pack(">BBbb", version << 3 | mode, 0, 6, 0) + bytes(20) + struct.pack(">QQQ", origin, receive, transmit)
    )


def server(client: str = "192.0.2.1", now: int = T) -> tuple[Replies, TxTimestamps]:
    table = TxTimestamps(max_entries=4, lag=TxLag(enabled=False))
    replies = Replies(STATE, lambda: now, table)
    replies.client = client
    return replies, table


def test_an_interleaved_exchange_quotes_the_kernel_time_of_the_earlier_reply() -> None:
    replies, table = server()
    first = parse_packet(replies.reply_header(request(), T - 10_000)).header  # a new client: origin 0
    assert first.receive_ts & 1 and not first.transmit_ts & 1 and not table.entries  # basic: nothing kept
    second_req = request(origin=first.receive_ts, receive=0xAAAA, transmit=0xBBBB)
    second = parse_packet(replies.reply_header(second_req, T - 5_000)).header
    assert second.origin_ts == 0xBBBB  # basic (nothing known yet), but from now on this client is timed
    assert table.pending == (second.receive_ts, T)
    table.kernel(second.receive_ts, T + 7_000)  # the kernel says when reply 2 left
    third = parse_packet(
        replies.reply_header(request(origin=second.receive_ts, receive=0xCCCC, transmit=0xDDDD), T)
    ).header
    assert third.origin_ts == 0xCCCC  # the request's receive field (the client's receive time of reply 2)
    assert third.transmit_ts == unix_ns_to_ntp64(T + 7_000) & ~1  # when reply 2 really left
    assert third.receive_ts == unix_ns_to_ntp64(T) | 1
    assert table.interleaved == 1 and second.receive_ts not in table.entries  # used up


def test_no_request_reads_another_clients_timestamps_and_the_table_stays_bounded() -> None:
    replies, table = server()
    assert table.exchange(0x77 | 1, 0x55 | 1, "192.0.2.1", T) is None  # (nothing under 0x77: noted only)
    table.kernel(0x55 | 1, T + 1)
    replies.client = "198.51.100.9"  # another address quoting that entry: a basic reply
    reply = parse_packet(replies.reply_header(request(origin=0x55 | 1, receive=1, transmit=2), T)).header
    assert reply.origin_ts == 2 and table.unmatched == 2 and 0x55 | 1 in table.entries
    for i in range(100):  # a flood of interleaved-looking requests: the table keeps its bound
        replies.reply_header(request(origin=(2 * i + 1) << 8 | 1, receive=1, transmit=2), T + i)
    assert len(table.entries) <= 4


def test_basic_clients_cost_no_entry_and_version_3_or_equal_fields_are_basic() -> None:
    replies, table = server()
    for req in (request(origin=0x100), request(origin=0x101, receive=5, transmit=5), request(0x101, 5, 6, version=3)):
        assert parse_packet(replies.reply_header(req, T)).header.origin_ts == struct.unpack_from(">Q", req, 40)[0]
    assert not table.entries and table.pending is None


def test_symmetric_active_requests_get_symmetric_passive_replies() -> None:
    replies, _ = server()
    assert parse_packet(replies.reply_header(request(mode=1), T)).header.mode == 2
    assert parse_packet(replies.kiss(request(mode=1), b"RATE", T)).header.mode == 2
    assert parse_packet(replies.reply_header(request(mode=3), T)).header.mode == 4


def test_the_lag_estimate_is_a_median_and_ignores_absurd_samples() -> None:
    lag = TxLag()
    for sample in (10_000, 11_000, 9_000, 50_000_000, -5, 10_500, 9_500, 10_000, 10_200, 9_900):
        lag.sample(sample)
    assert lag.ns == lag.estimate_ns == 10_000 and len(lag.samples) == 8
    off = TxLag(enabled=False)
    off.sample(10_000)
    assert off.ns == 0 and off.estimate_ns == 10_000


def test_only_replies_after_a_pause_are_corrected_by_the_lag_measured_after_pauses() -> None:
    """A warm server's lag (1-2 us here) swung with the load when it was applied; a cold one's
    (5-11 us) is what basic replies after a pause are early by. Each is measured apart, and only
    the cold one is added: to basic replies and to the basic answers of the interleaved path."""
    cold, warm = TxLag(), TxLag(enabled=False)
    for _ in range(8):
        cold.sample(9_000)
        warm.sample(1_500)
    table = TxTimestamps(max_entries=4, lag=warm, cold_lag=cold)
    assert (cold.ns, warm.ns, warm.estimate_ns) == (9_000, 0, 1_500)

    def sent_at(req: bytes) -> int:
        return parse_packet(Replies(STATE, lambda: T, table).reply_header(req, T - 10_000)).header.transmit_ts

    table.after_pause(30_000)
    assert sent_at(request()) == unix_ns_to_ntp64(T + 9_000) & ~1
    first = sent_at(request(origin=0x101, receive=5, transmit=6))  # interleaved-looking, nothing known: basic
    assert first == unix_ns_to_ntp64(T + 9_000) & ~1
    table.cold = False
    assert sent_at(request()) == unix_ns_to_ntp64(T) & ~1
    assert sent_at(request(origin=0x103, receive=5, transmit=6)) == unix_ns_to_ntp64(T) & ~1


def test_no_correction_until_eight_samples_so_a_start_costs_nothing() -> None:
    """The first replies after a start are slow to leave (60 us and more, once): one or two such
    samples were the whole estimate, and the next idle replies went out that much late."""
    lag = TxLag()
    lag.sample(60_000)
    for _ in range(6):
        lag.sample(8_000)
    assert lag.ns == 0 and lag.estimate_ns == 8_000
    lag.sample(8_000)
    assert lag.ns == 8_000


def test_a_reply_after_a_pause_is_corrected_by_the_lag_of_requests_answered_at_its_pace() -> None:
    """Measured here: one cold request in six ran 1.4 times faster (its probe 30 us against 40, its
    lag 14 us against 21). All samples' median corrects the fast ones by 7 us too much; the
    samples whose pace was nearest get each right."""
    cold = TxLag()
    for i in range(120):
        fast = i % 6 == 0
        cold.sample((14_000 if fast else 21_000) + (i % 5) * 100, (30_000 if fast else 40_000) + (i % 7) * 300)
    assert 21_000 <= cold.ns <= 21_400  # (all samples')
    assert 14_000 <= cold.expect(30_500) <= 14_400 and 21_000 <= cold.expect(40_500) <= 21_400
    assert 21_000 <= cold.expect(90_000) <= 21_400 and 14_000 <= cold.expect(1_000) <= 14_400
    table = TxTimestamps(max_entries=4, cold_lag=cold)
    table.after_pause(31_000)
    assert table.cold and table.pace == 31_000 and 14_000 <= table.cold_ns <= 14_400
    sent = Replies(STATE, lambda: T, table).reply_header(request(), T - 50_000)
    assert parse_packet(sent).header.transmit_ts == unix_ns_to_ntp64(T + table.cold_ns) & ~1
    cold.enable(False)
    assert cold.expect(30_500) == cold.expect(40_500) == cold.ns == 0
    cold.enable(True)
    assert 21_000 <= cold.ns <= 21_400 and 14_000 <= cold.expect(30_500) <= 14_400


def test_where_the_pace_says_nothing_the_paced_estimate_is_the_median() -> None:
    """No pace (0): all samples' median. A pace that has nothing to do with the lag: the nearest
    samples are any, and their median is near all samples' (noisier, by a third of the samples'
    spread: the cost of the paced estimate where it does not help); with few samples it is all
    samples' median."""
    lag = TxLag()
    for i in range(8):
        lag.sample(10_000 + i * 10, 5_000)
    assert lag.expect(5_000) == lag.ns == 10_035
    draw = random.Random(5)
    for _ in range(120):
        lag.sample(draw.randrange(10_000, 14_000), draw.randrange(20_000, 40_000))
    assert lag.expect(0) == lag.ns
    spread = statistics.median(abs(sample - lag.ns) for sample in lag.samples)
    errors = [abs(lag.expect(pace) - lag.ns) for pace in range(15_000, 45_000, 500)]
    assert statistics.median(errors) <= spread / 2 and max(errors) <= spread * 2
