"""Samba's ntp_signd protocol, sans-IO (source4/librpc/idl/ntp_signd.idl, source4/ntp_signd).

Strategy: each message on the unix stream socket is a big-endian u32 length and an NDR body.
Request body: version u32 BE (0) | op u32 BE (0 SIGN_TO_CLIENT) | packet_id u16 BE | 2 pad bytes |
key_id u32 LITTLE-endian | the 48-byte reply to sign. Reply body: version u32 | op u32 (3 success,
4 failure) | packet_id u32 | the signed packet (68 bytes on success, empty on failure), all BE.
Samba's replies are untrusted input: `ReplyReader` bounds frame sizes, and `check_signed` insists
that what came back is exactly what we sent plus key id and a 16-byte MAC. Samba leaves the
version of a failure reply uninitialised, so it is not checked.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from nts.wire.errors import ParseError

SIGN_TO_CLIENT = 0
SIGNING_SUCCESS = 3
SIGNING_FAILURE = 4
MAX_FRAME = 1024  # a reply body is 12 + 68 bytes; anything much larger is not Samba
_LEN = struct.Struct(">I")
_REQ = struct.Struct(">IIH2x")
_REPLY = struct.Struct(">III")
_KEY = struct.Struct("<I")


def encode_request(packet_id: int, key_id: int, packet: bytes) -> bytes:
    """One framed SIGN_TO_CLIENT request."""
    if len(packet) != 48 or not 0 <= packet_id <= 0xFFFF or not 0 <= key_id <= 0xFFFFFFFF:
        raise ValueError("bad sign request")
    body = _REQ.pack(0, SIGN_TO_CLIENT, packet_id) + _KEY.pack(key_id) + packet
    return _LEN.pack(len(body)) + body


@dataclass(frozen=True, slots=True)
class SignedReply:
    op: int
    packet_id: int
    signed_packet: bytes


def parse_reply(body: bytes) -> SignedReply:
    if len(body) < _REPLY.size:
        raise ParseError("signd_short", f"ntp_signd reply of {len(body)} bytes is shorter than 12")
    _version, op, packet_id = _REPLY.unpack_from(body)
    signed = bytes(body[_REPLY.size :])
    if op == SIGNING_SUCCESS and len(signed) != 68:
        raise ParseError("signd_length", f"ntp_signd success reply carries {len(signed)} bytes, not 68")
    if op not in (SIGNING_SUCCESS, SIGNING_FAILURE):
        raise ParseError("signd_op", f"ntp_signd reply has unknown op {op}")
    return SignedReply(op, packet_id, signed)


def encode_reply(op: int, packet_id: int, signed_packet: bytes = b"") -> bytes:
    """A framed reply as Samba sends it (for tests and fake signers)."""
    body = _REPLY.pack(0, op, packet_id) + signed_packet
    return _LEN.pack(len(body)) + body


class ReplyReader:
    """Incremental framing: feed bytes, get complete replies; refuses oversized frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[SignedReply]:
        self._buf += data
        out: list[SignedReply] = []
        while len(self._buf) >= 4:
            (length,) = _LEN.unpack_from(self._buf)
            if length > MAX_FRAME:
                raise ParseError("signd_frame", f"ntp_signd frame of {length} bytes exceeds {MAX_FRAME}")
            if len(self._buf) < 4 + length:
                break
            out.append(parse_reply(bytes(self._buf[4 : 4 + length])))
            del self._buf[: 4 + length]
        return out


def check_signed(reply: SignedReply, packet_id: int, key_id: int, packet: bytes) -> bytes | None:
    """The 68-byte signed packet if `reply` is a success for exactly this request, else None."""
    if reply.op != SIGNING_SUCCESS or reply.packet_id != packet_id:
        return None
    signed = reply.signed_packet
    if signed[:48] != packet or signed[48:52] != _KEY.pack(key_id):
        return None
    return signed
