"""NTS-KE records (RFC 8915 section 4).

Strategy: a record is (critical, type, body); unknown types are kept as data and policy decides.
`RecordReader` is a sans-IO stream parser: feed it bytes as they arrive (even one at a time), it
yields complete records and refuses to buffer more than its bound. Serialization is the exact
inverse of parsing.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

from .errors import ParseError

_HEAD = struct.Struct(">HH")
CRITICAL = 0x8000


class RecordType(IntEnum):
    """IANA NTS-KE record types (RFC 8915 section 7.6), the NTS pool's and chrony's compliance record."""

    END_OF_MESSAGE = 0  # 4.1.1
    NEXT_PROTOCOL = 1  # 4.1.2
    ERROR = 2  # 4.1.3
    WARNING = 3  # 4.1.4
    AEAD_ALGORITHM = 4  # 4.1.5
    NEW_COOKIE = 5  # 4.1.6
    NTPV4_SERVER = 6  # 4.1.7
    NTPV4_PORT = 7  # 4.1.8
    # draft-ietf-ntp-nts-keyexchange-pool, as ntpd-rs 1.9 numbers them (the NTS pool's key exchange)
    KEEP_ALIVE = 8
    SUPPORTED_NEXT_PROTOCOL_LIST = 9
    SUPPORTED_ALGORITHM_LIST = 10
    FIXED_KEY_REQUEST = 12
    NTP_SERVER_DENY = 13
    AUTHENTICATION = 14
    COMPLIANT_128GCM_EXPORT = 1024  # chrony 4.6: exporter context uses AEAD id 30, not 15


class ErrorCode(IntEnum):
    """NTS-KE error codes (RFC 8915 section 4.1.3)."""

    UNRECOGNIZED_CRITICAL_RECORD = 0
    BAD_REQUEST = 1
    INTERNAL_SERVER_ERROR = 2


NEXT_PROTOCOL_NTPV4 = 0


@dataclass(frozen=True, slots=True)
class Record:
    critical: bool
    type: int
    body: bytes = b""


def serialize_record(r: Record) -> bytes:
    if not 0 <= r.type < CRITICAL or len(r.body) > 0xFFFF:
        raise ValueError("record type or body length out of range")
    return _HEAD.pack(r.type | (CRITICAL if r.critical else 0), len(r.body)) + r.body


def serialize_records(records: Iterable[Record]) -> bytes:
    return b"".join(serialize_record(r) for r in records)


def parse_records(data: bytes) -> list[Record]:
    """Parse a complete byte string of records (no partial record allowed)."""
    reader = RecordReader(max_bytes=len(data) + 1)
    records = reader.feed(data)
    if reader.pending:
        raise ParseError("ke_truncated", "NTS-KE record truncated")
    return records


class RecordReader:
    """Incremental record parser with a bound on buffered bytes."""

    def __init__(self, max_bytes: int = 16384) -> None:
        self._buf = bytearray()
        self.max_bytes = max_bytes
        self._total = 0

    @property
    def pending(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Record]:
        self._total += len(data)
        if self._total > self.max_bytes:
            raise ParseError("ke_too_long", f"NTS-KE message longer than {self.max_bytes} bytes")
        self._buf += data
        out: list[Record] = []
        pos = 0
        while len(self._buf) - pos >= 4:
            rtype, length = _HEAD.unpack_from(self._buf, pos)
            if len(self._buf) - pos - 4 < length:
                break
            body = bytes(self._buf[pos + 4 : pos + 4 + length])
            out.append(Record(bool(rtype & CRITICAL), rtype & 0x7FFF, body))
            pos += 4 + length
        del self._buf[:pos]
        return out


def u16_list(body: bytes) -> list[int]:
    """A record body that is a list of 16-bit values (Next Protocol, AEAD)."""
    if not body or len(body) % 2:
        raise ParseError("ke_list", "record body is not a non-empty list of 16-bit values")
    return list(struct.unpack(f">{len(body) // 2}H", body))
