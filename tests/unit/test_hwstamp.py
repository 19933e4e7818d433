"""Hardware timestamps (ntp.hwtimestamp): the kernel structures, the PHC-to-system conversion against
a simulated card clock, where a card's times are found in the control messages, and the fall-back
on this machine's real interfaces (none has hardware timestamping)."""

from __future__ import annotations

import logging
import socket
import struct
import time

import pytest

from nts.server import hwstamp, mmsg
from nts.server.hwstamp import PhcClock, TsInfo
from tests.helpers import wait_until

SOFTWARE_ONLY = (1 << 1) | (1 << 3) | (1 << 4)  # TX_SOFTWARE | RX_SOFTWARE | SOFTWARE: what loopback says
ALL_HW = SOFTWARE_ONLY | hwstamp.NEEDED


def info_bytes(flags: int, phc: int, tx_types: int, rx_filters: int) -> bytes:
    """A struct ethtool_ts_info as the kernel fills it (44 bytes: cmd, flags, phc, tx types, 3
    reserved, rx filters, 3 reserved)."""
    return struct.pack("=IIiI3II3I", 0x41, flags, phc, tx_types, 0, 0, 0, rx_filters, 0, 0, 0)


def test_ts_info_parsed_and_judged() -> None:
    card = TsInfo.parse(info_bytes(ALL_HW, 0, 1 << 1, 1 << 1))
    assert card == TsInfo(ALL_HW, 0, 2, 2) and card.lacks() == "" and card.rx_filter == hwstamp.HWTSTAMP_FILTER_ALL
    assert TsInfo.parse(info_bytes(ALL_HW, 0, 2, 1 << 15)).rx_filter == hwstamp.HWTSTAMP_FILTER_NTP_ALL
    assert "in hardware" in TsInfo.parse(info_bytes(SOFTWARE_ONLY, -1, 0, 0)).lacks()
    assert "no PTP hardware clock" in TsInfo.parse(info_bytes(ALL_HW, -1, 2, 2)).lacks()
    assert "what it sends" in TsInfo.parse(info_bytes(ALL_HW, 0, 1, 2)).lacks()  # (TX off only)
    assert "every packet" in TsInfo.parse(info_bytes(ALL_HW, 0, 2, 1 << 12)).lacks()  # (PTP packets only)


def test_loopback_reports_software_timestamping_only_and_an_unknown_interface_fails() -> None:
    lo = hwstamp.ts_info("lo")  # the real ioctl, through the real struct layouts
    assert lo.so_timestamping & SOFTWARE_ONLY == SOFTWARE_ONLY and lo.phc_index == -1
    assert "in hardware" in lo.lacks()
    with pytest.raises(OSError):
        hwstamp.ts_info("nosuch0")


def test_naming_interfaces_without_hardware_timestamps_is_logged_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    assert hwstamp.enable(()) is None and not caplog.records
    assert hwstamp.enable(("lo", "nosuch0")) is None
    text = caplog.text
    assert "ntp.hwtimestamp: lo: it does not timestamp packets in hardware; software timestamps there" in text
    assert "ntp.hwtimestamp: nosuch0: No such device; software timestamps there" in text
    assert "no interface gets hardware timestamps; software timestamps are used" in text
    caplog.clear()
    assert hwstamp.enable(("*",)) is None  # every interface here: said once, not per interface
    assert [r.getMessage() for r in caplog.records] == [
        "ntp.hwtimestamp: no interface gets hardware timestamps; software timestamps are used"
    ]


class SimulatedCard:
    """A PHC 37 s ahead of the system clock (TAI, as ptp4l keeps one) running 40 ppm fast; each
    reading of the system clock moves it on 300 ns, so readings have a span to choose by."""

    def __init__(self) -> None:
        self.system = 1_700_000_000 * 10**9

    def read_system(self) -> int:
        self.system += 300
        return self.system

    def phc_at(self, system: int) -> int:
        return system + 37 * 10**9 + (system - 1_700_000_000 * 10**9) * 40 // 1_000_000

    def read_phc(self) -> int:
        return self.phc_at(self.system + 150)


def test_card_times_are_converted_to_the_system_clock_with_offset_and_drift() -> None:
    card = SimulatedCard()
    clock = PhcClock(0, card.read_phc, card.read_system)
    assert clock.to_system(card.phc_at(card.system)) == 0  # nothing measured yet: not used
    clock.measure()
    assert clock.span_ns == 300
    assert abs(clock.to_system(card.phc_at(card.system)) - card.system) < 100
    card.system += 10**9  # a second later, 40 us more apart: the drift is learnt from two measurements
    clock.measure()
    for ahead in (0, 500_000_000, 999_000_000):  # until the next measurement
        when = card.system + ahead
        assert abs(clock.to_system(card.phc_at(when)) - when) < 100, ahead


def test_a_step_of_either_clock_starts_the_model_afresh() -> None:
    card = SimulatedCard()
    clock = PhcClock(0, card.read_phc, card.read_system)
    clock.measure()
    card.system += 10**9
    step = 5 * 10**6  # the PHC stepped by 5 ms (ptp4l, say): not 5,000 ppm of drift
    clock._read_phc = lambda: card.read_phc() + step
    clock.measure()
    assert abs(clock.to_system(card.phc_at(card.system) + step) - card.system) < 100
    assert clock._model is not None and clock._model[2] == 0.0


def test_transmit_times_from_the_kernel_and_from_the_card() -> None:
    def stamps(software: int, hardware: int) -> bytes:  # struct scm_timestamping
        return struct.pack("@qqqqqq", software // 10**9, software % 10**9, 0, 0, hardware // 10**9, hardware % 10**9)

    def convert(ns: int) -> int:
        return ns - 37 * 10**9

    software, hardware = 1_700_000_000_123_456_789, 1_700_000_037_123_456_000
    assert mmsg.transmit_time(stamps(software, 0), 0, 48, convert) == (software, False)
    assert mmsg.transmit_time(stamps(0, hardware), 0, 48, convert) == (hardware - 37 * 10**9, True)
    assert mmsg.transmit_time(stamps(0, hardware), 0, 48, lambda ns: 0) == (0, True)  # not measured yet
    assert mmsg.transmit_time(stamps(0, hardware), 0, 48, None) == (0, False)  # cards not asked
    assert mmsg.transmit_time(b"\0" * 16 + stamps(software, 0), 16, 48, None) == (software, False)


@pytest.mark.skipif(not mmsg.available(), reason="no recvmmsg here")
def test_a_card_receive_time_is_found_where_the_kernel_puts_it() -> None:
    """No card here stamps packets, so the third time of a real SO_TIMESTAMPING control message is
    zero (the kernel's time is used); written in as a card would, it is converted and used."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        server.setsockopt(socket.SOL_SOCKET, mmsg.SO_TIMESTAMPING, mmsg.TS_FLAGS | hwstamp.SOCKET_FLAGS)
        server.bind(("127.0.0.1", 0))
        batch = mmsg.Batch(server, 4, 100, timestamping=True, hardware=lambda ns: ns - 37 * 10**9)
        before = time.time_ns()

        def received() -> int:
            client.sendto(b"x" * 48, server.getsockname())
            assert batch.recv() == 1
            ((_, _, _, _, rx, _),) = batch.messages(1)
            return rx

        # (the kernel turns receive timestamps on a moment after the first socket asks, on a worker thread)
        rx = wait_until(received, what="a datagram with its kernel receive time")
        assert before <= rx <= time.time_ns()  # the kernel's
        card = 1_700_000_037_000_000_500
        struct.pack_into("@qq", batch.control, struct.calcsize("@Nii") + 32, card // 10**9, card % 10**9)
        ((_, _, _, _, rx, _),) = batch.messages(1)
        assert rx == card - 37 * 10**9
    finally:
        server.close()
        client.close()
