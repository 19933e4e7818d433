"""RFC 7822 extension fields.

Strategy: an extension field is (type, value) where value is everything after the 4-byte header up
to the declared length, padding included, so parse/serialize round-trip exactly. Fields of unknown
type are kept as data; policy (the authenticators) decides what to refuse. Lengths are checked
against the datagram before any byte is read.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum

from .errors import ParseError

MIN_FIELD_LEN = 16  # RFC 7822 section 3
_FIELD_HEAD = struct.Struct(">HH")


class FieldType(IntEnum):
    """IANA NTP extension field types in use here (RFC 8915 section 5)."""

    UNIQUE_IDENTIFIER = 0x0104
    NTS_COOKIE = 0x0204
    NTS_COOKIE_PLACEHOLDER = 0x0304
    NTS_AUTHENTICATOR = 0x0404


@dataclass(frozen=True, slots=True)
class ExtensionField:
    """One extension field; `value` excludes the 4-byte type/length header and includes padding."""

    type: int
    value: bytes


def parse_extension(data: bytes, pos: int) -> tuple[ExtensionField, int]:
    """Parse the field at `pos`; return it and the position after it."""
    if len(data) - pos < 4:
        raise ParseError("ef_short", "truncated extension field header")
    ftype, length = _FIELD_HEAD.unpack_from(data, pos)
    if length < MIN_FIELD_LEN or length % 4:
        raise ParseError("ef_length", f"extension field length {length} is not a multiple of 4 of at least 16")
    if pos + length > len(data):
        raise ParseError("ef_overrun", f"extension field of {length} bytes runs past the end of the packet")
    return ExtensionField(ftype, bytes(data[pos + 4 : pos + length])), pos + length


def iter_extensions(data: bytes) -> Iterator[ExtensionField]:
    """The fields that fill `data` wholly (the plaintext inside an NTS authenticator), in order; a
    ParseError when the next one is malformed, raised only when the iteration reaches it."""
    pos = 0
    while pos < len(data):
        field, pos = parse_extension(data, pos)
        yield field


def serialize_extension(field: ExtensionField) -> bytes:
    length = 4 + len(field.value)
    if length < MIN_FIELD_LEN or length % 4 or length > 0xFFFF:
        raise ValueError(f"extension field length {length} is invalid")
    return _FIELD_HEAD.pack(field.type, length) + field.value


def serialize_extensions(fields: tuple[ExtensionField, ...] | list[ExtensionField]) -> bytes:
    return b"".join(serialize_extension(f) for f in fields)


def make_field(ftype: int, body: bytes, min_length: int = MIN_FIELD_LEN) -> ExtensionField:
    """A field holding `body`, zero-padded to a multiple of 4 and to at least `min_length` bytes."""
    length = max(min_length, 4 + len(body))
    length += -length % 4
    return ExtensionField(ftype, body + bytes(length - 4 - len(body)))
