"""Byte vectors for the NTP wire layer, checked both ways."""

from __future__ import annotations

import pytest

from nts.wire.errors import ParseError
from nts.wire.extensions import ExtensionField, make_field, parse_extension, serialize_extension
from nts.wire.packet import (
    KISS_RATE,
    Header,
    Packet,
    crypto_nak,
    kiss_of_death,
    parse_header,
    parse_packet,
    serialize_header,
    serialize_packet,
)
from nts.wire.timestamps import ntp64_to_unix_ns, seconds_to_short, short_to_seconds, unix_ns_to_ntp64

# A chrony-style client request (NTPv4, mode 3, poll 6, precision -20, transmit set).
CLIENT_HEX = (
    "2300 06ec 0000 0000 0000 0000 00000000 0000000000000000 0000000000000000 0000000000000000 e9b6f0a1 80000000"
)
HEADER_CASES = [
    (
        Header(0, 4, 3, 0, 6, -20, 0, 0, b"\0\0\0\0", 0, 0, 0, 0xE9B6F0A180000000),
        bytes.fromhex(CLIENT_HEX.replace(" ", "")),
    ),
    (
        # A stratum-1 server reply: LI 0, v4, mode 4; root delay 1/65536 s; dispersion 0.5 s; refid GPS.
        Header(0, 4, 4, 1, 6, -24, 1, 0x8000, b"GPS\0", 1 << 32, 2, 3, 4),
        bytes.fromhex(
            "240106e80000000100008000475053000000000100000000000000000000000200000000000000030000000000000004"
        ),
    ),
    (
        # Leap 3 (alarm), version 1, mode 3, stratum 16, poll -1 as a signed byte.
        Header(3, 1, 3, 16, -1, 0, 0xFFFFFFFF, 0, b"INIT", 0, 0, 0, 0),
        bytes.fromhex("cb10ff00ffffffff00000000494e4954") + bytes(32),
    ),
]


@pytest.mark.parametrize(("header", "wire"), HEADER_CASES)
def test_header_both_ways(header: Header, wire: bytes) -> None:
    assert parse_header(wire) == header
    assert serialize_header(header) == wire


def test_header_too_short_is_a_parse_error() -> None:
    with pytest.raises(ParseError) as exc:
        parse_header(bytes(47))
    assert exc.value.code == "short"
    assert str(exc.value) == "NTP packet of 47 bytes is shorter than the 48-byte header"


FIELD_CASES = [
    (ExtensionField(0x0104, bytes(range(32))), bytes.fromhex("01040024") + bytes(range(32))),
    (ExtensionField(0x7777, bytes(12)), bytes.fromhex("77770010") + bytes(12)),
]


@pytest.mark.parametrize(("field", "wire"), FIELD_CASES)
def test_extension_both_ways(field: ExtensionField, wire: bytes) -> None:
    assert parse_extension(wire, 0) == (field, len(wire))
    assert serialize_extension(field) == wire


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (bytes.fromhex("0104"), "ef_short"),
        (bytes.fromhex("0104000c") + bytes(8), "ef_length"),  # below the 16-byte minimum
        (bytes.fromhex("01040012") + bytes(14), "ef_length"),  # not a multiple of 4
        (bytes.fromhex("01040020") + bytes(12), "ef_overrun"),
    ],
)
def test_extension_errors(wire: bytes, code: str) -> None:
    with pytest.raises(ParseError) as exc:
        parse_extension(wire, 0)
    assert exc.value.code == code


def test_make_field_pads_to_four_and_minimum() -> None:
    assert make_field(1, b"abc") == ExtensionField(1, b"abc" + bytes(9))
    assert make_field(1, bytes(13)).value == bytes(16)
    assert len(serialize_extension(make_field(1, b"", min_length=28))) == 28


def test_packet_with_fields_and_mac() -> None:
    header = HEADER_CASES[0][1]
    uid = serialize_extension(ExtensionField(0x0104, bytes(32)))
    mac = bytes.fromhex("00000001") + bytes(range(20))
    packet = parse_packet(header + uid + mac)
    assert packet.extensions == (ExtensionField(0x0104, bytes(32)),)
    assert packet.trailer == mac
    assert serialize_packet(packet) == header + uid + mac


@pytest.mark.parametrize("trailer_len", [0, 4, 20, 24])
def test_trailer_shapes(trailer_len: int) -> None:
    packet = parse_packet(HEADER_CASES[0][1] + bytes(trailer_len))
    assert len(packet.trailer) == trailer_len
    assert packet.extensions == ()


def test_v3_120_byte_mssntp_extended_is_a_trailer_not_fields() -> None:
    v3 = bytes([0x1B]) + bytes(47)
    packet = parse_packet(v3 + bytes(72))
    assert (packet.extensions, len(packet.trailer)) == ((), 72)


@pytest.mark.parametrize("extra", [1, 8, 12, 19, 21])
def test_trailer_of_no_known_size_is_rejected(extra: int) -> None:
    with pytest.raises(ParseError) as exc:
        parse_packet(bytes([0x1B]) + bytes(47 + extra))
    assert exc.value.code == "trailer"


def test_v4_leftover_after_fields_that_is_not_a_mac() -> None:
    with pytest.raises(ParseError):
        parse_packet(HEADER_CASES[0][1] + bytes(26))  # 26 > 24: must be a field; 0 length -> error


def test_kiss_of_death_vector() -> None:
    request = bytes.fromhex(CLIENT_HEX.replace(" ", ""))
    kod = kiss_of_death(request, KISS_RATE, rx_ts=5, tx_ts=6)
    assert kod == bytes.fromhex(
        "e40006000000000000000000524154450000000000000000e9b6f0a18000000000000000000000050000000000000006"
    )
    assert parse_packet(kod) == Packet(Header(3, 4, 4, 0, 6, 0, 0, 0, b"RATE", 0, 0xE9B6F0A180000000, 5, 6))


TIME_CASES = [
    (0, (2_208_988_800 << 32)),  # Unix epoch
    (1_700_000_000_500_000_000, ((1_700_000_000 + 2_208_988_800) << 32) | 0x80000000),
    # 2036-02-07T06:28:16Z is era 1 second 0
    (2_085_978_496 * 10**9, 0),
    (2_085_978_497 * 10**9, 1 << 32),
]


@pytest.mark.parametrize(("unix_ns", "ntp"), TIME_CASES)
def test_timestamps_both_ways_across_the_era(unix_ns: int, ntp: int) -> None:
    assert unix_ns_to_ntp64(unix_ns) == ntp
    assert ntp64_to_unix_ns(ntp, pivot_ns=unix_ns + 10**9 * 86400 * 365) == unix_ns
    assert ntp64_to_unix_ns(ntp, pivot_ns=unix_ns - 10**9 * 86400 * 365) == unix_ns


def test_short_format() -> None:
    assert seconds_to_short(1.5) == 0x00018000
    assert short_to_seconds(0x00018000) == 1.5
    assert seconds_to_short(-1) == 0
    assert seconds_to_short(1e9) == 0xFFFFFFFF


def test_crypto_nak_is_a_timeless_header_and_key_id_zero() -> None:
    request = bytes([0x23, 0, 6, 0]) + bytes(36) + bytes(range(8)) + bytes(4) + bytes(16)
    nak = crypto_nak(request)
    assert nak == bytes([0xE4, 0, 6, 0]) + bytes(8) + bytes(4) + bytes(8) + bytes(range(8)) + bytes(16) + bytes(4)


def test_timestamp_conversion_folds_the_era() -> None:
    era1 = (2**32 - 2_208_988_800) * 10**9  # 2036-02-07T06:28:16Z
    assert unix_ns_to_ntp64(era1) == 0
    assert unix_ns_to_ntp64(era1 - 1) >> 32 == 2**32 - 1
