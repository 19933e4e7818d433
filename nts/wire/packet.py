"""The NTP packet: 48-byte header, RFC 7822 extension fields and the trailer after them.

Strategy: `parse_packet` splits a datagram into a frozen `Packet` (header, extension fields, trailer)
and never reads past the datagram; the trailer is classified only by its length (RFC 7822 section 7.5
rules: while more than a MAC's worth of bytes remains in an NTPv4 packet, the next item is an
extension field). What a trailer *means* (legacy MAC, MS-SNTP, crypto-NAK) is decided by the
authenticators, not here. Versions below 4 carry no extension fields, only a trailer.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from .errors import ParseError
from .extensions import ExtensionField, parse_extension, serialize_extensions

HEADER_LEN = 48
MAX_MAC_LEN = 24  # key id + 20-byte digest (RFC 5905 section 7.3; longer digests truncated)
_HEADER = struct.Struct(">BBbbII4sQQQQ")


class Mode(IntEnum):
    """Association modes (RFC 5905 section 7.3, figure 10)."""

    RESERVED = 0
    SYMMETRIC_ACTIVE = 1
    SYMMETRIC_PASSIVE = 2
    CLIENT = 3
    SERVER = 4
    BROADCAST = 5
    CONTROL = 6  # ntpq; never answered (amplification vector)
    PRIVATE = 7  # ntpdc/monlist; never answered


class Leap(IntEnum):
    """Leap indicator (RFC 5905 section 7.3)."""

    NONE = 0
    INSERT = 1
    DELETE = 2
    ALARM = 3  # clock unsynchronized


# In NTPv4 anything longer than a 24-byte MAC is extension fields (RFC 7822), so the long MAC
# shapes exist only in earlier versions; chrony sends long digests in NTPv3 packets for that reason.
_V4_TRAILERS = frozenset({0, 4, 20, 24})  # none, crypto-NAK (key id 0), key id + 16- or 20-byte MAC
_LONG_MACS = frozenset({32, 36, 52, 68})  # key id + an untruncated SHA-224, -256, -384 or -512 digest
# Before NTPv4 any of these, and 72: the [MS-SNTP] extended authenticator (a 120-byte request).
_TRAILERS = _V4_TRAILERS | _LONG_MACS | {72}

# RFC 5905 section 7.4 kiss codes, and RFC 8915 section 5.7 NTSN.
KISS_RATE = b"RATE"
KISS_DENY = b"DENY"
KISS_RSTR = b"RSTR"
KISS_NTSN = b"NTSN"


@dataclass(frozen=True, slots=True)
class Header:
    """The 48-byte NTP header. Timestamps are raw 64-bit NTP values; delay/dispersion raw 16.16."""

    leap: int
    version: int
    mode: int
    stratum: int
    poll: int
    precision: int
    root_delay: int
    root_dispersion: int
    reference_id: bytes
    reference_ts: int
    origin_ts: int
    receive_ts: int
    transmit_ts: int


@dataclass(frozen=True, slots=True)
class Packet:
    """A parsed datagram. `trailer` holds the raw bytes after the extension fields."""

    header: Header
    extensions: tuple[ExtensionField, ...] = ()
    trailer: bytes = b""


def parse_header(data: bytes) -> Header:
    if len(data) < HEADER_LEN:
        raise ParseError("short", f"NTP packet of {len(data)} bytes is shorter than the 48-byte header")
    b0, stratum, poll, precision, delay, disp, refid, ref, org, rec, xmt = _HEADER.unpack_from(data)
    return Header(b0 >> 6, (b0 >> 3) & 7, b0 & 7, stratum, poll, precision, delay, disp, refid, ref, org, rec, xmt)


def serialize_header(h: Header) -> bytes:
    if not (0 <= h.leap <= 3 and 0 <= h.version <= 7 and 0 <= h.mode <= 7):
        raise ValueError("leap, version or mode out of range")
    if len(h.reference_id) != 4:
        raise ValueError("reference id must be 4 bytes")
    return _HEADER.pack(
        (h.leap << 6) | (h.version << 3) | h.mode,
        h.stratum,
        h.poll,
        h.precision,
        h.root_delay,
        h.root_dispersion,
        h.reference_id,
        h.reference_ts,
        h.origin_ts,
        h.receive_ts,
        h.transmit_ts,
    )


def split_body(data: bytes, version: int) -> tuple[tuple[ExtensionField, ...], bytes]:
    """Split what follows the header into extension fields and a trailer; validate the trailer size."""
    fields: list[ExtensionField] = []
    pos = HEADER_LEN
    end = len(data)
    if version >= 4:
        try:
            while end - pos > MAX_MAC_LEN:
                field, pos = parse_extension(data, pos)
                fields.append(field)
        except ParseError:
            # Clients older than RFC 7822 (ntpdig with SHA-256 keys, for one) send a long MAC in an
            # NTPv4 packet. When nothing after the header parses as a field but its length is that
            # of a long MAC, it is one.
            if fields or end - HEADER_LEN not in _LONG_MACS:
                raise
            return (), bytes(data[HEADER_LEN:])
    rest = end - pos
    if rest not in (_V4_TRAILERS if version >= 4 else _TRAILERS):
        raise ParseError("trailer", f"{rest} bytes after the extension fields fit no MAC or authenticator")
    return tuple(fields), bytes(data[pos:])


def parse_packet(data: bytes) -> Packet:
    header = parse_header(data)
    fields, trailer = split_body(data, header.version)
    return Packet(header, fields, trailer)


def serialize_packet(p: Packet) -> bytes:
    if len(p.trailer) not in _TRAILERS:
        raise ValueError("trailer length fits no known shape")
    return serialize_header(p.header) + serialize_extensions(p.extensions) + p.trailer


def kiss_of_death(request: bytes, code: bytes, rx_ts: int = 0, tx_ts: int = 0) -> bytes:
    """A 48-byte KoD reply to `request` (RFC 5905 section 7.4): stratum 0, ASCII code as reference id.

    The version and poll are echoed and the origin is the request's transmit timestamp, so the client
    can match the reply; leap is 3 (alarm) because no time is being offered. A symmetric active
    request (mode 1) gets a symmetric passive reply (mode 2), any other a server reply (mode 4).
    """
    version = (request[0] >> 3) & 7
    return _HEADER.pack(
        0xC0 | (version << 3) | (Mode.SYMMETRIC_PASSIVE if request[0] & 7 == Mode.SYMMETRIC_ACTIVE else Mode.SERVER),
        0,
        struct.unpack_from(">b", request, 2)[0],
        0,
        0,
        0,
        code,
        0,
        struct.unpack_from(">Q", request, 40)[0],
        rx_ts,
        tx_ts,
    )


def crypto_nak(request: bytes) -> bytes:
    """A crypto-NAK (RFC 5905 section 7.4): a header offering no time, then key id 0 alone."""
    return kiss_of_death(request, bytes(4)) + bytes(4)
