"""The PROXY protocol header (HAProxy's proxy-protocol.txt, versions 2 and 1), sans-IO.

Strategy: a load balancer in front of the NTS-KE port opens its own connection to us and, before
the client's first byte, writes one header saying whom the connection is for. `parse` takes the
bytes received so far and returns the header and its length, None while it is incomplete (the
caller waits for more), or raises ParseError: the input can never become a valid header. Version
2 is binary (a 12-byte signature, version and command, family and protocol, a length, the
addresses, then TLVs, which are checked for shape and kept); version 1 is one text line of at
most 107 bytes. A LOCAL command (the balancer's own health check) and the UNSPEC/UNKNOWN family
carry no client: `client` is None and the connection is the balancer's. Only TCP over IPv4 and
IPv6 carry a client here; UDP and unix-socket families are refused. The whole header is bounded
(`MAX_LENGTH`), so a peer cannot make us buffer more.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from .errors import ParseError

SIGNATURE_V2 = b"\r\n\r\n\x00\r\nQUIT\n"
PREFIX_V1 = b"PROXY "
MAX_LENGTH = 16 + 512  # a v2 header with more than 512 bytes of addresses and TLVs is refused
_MAX_V1 = 107
_HEAD = struct.Struct(">12sBBH")
_V4 = struct.Struct(">4s4sHH")
_V6 = struct.Struct(">16s16sHH")
_TLV = struct.Struct(">BH")
_TCP4, _TCP6, _UNSPEC = 0x11, 0x21, 0x00


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed header. `client`/`server`: (address, port) of the connection the balancer took,
    None for LOCAL or an unspecified family. `length`: the bytes it took on the wire."""

    version: int
    client: tuple[str, int] | None
    server: tuple[str, int] | None
    tlvs: tuple[tuple[int, bytes], ...]
    length: int


def is_proxy_start(data: bytes) -> bool:
    """Whether `data` (the first bytes of a connection) begins like a PROXY header of either version."""
    n = min(len(data), 12)
    return n > 0 and (SIGNATURE_V2[:n] == data[:n] or PREFIX_V1[: min(n, 6)] == data[: min(n, 6)])


def parse(data: bytes) -> ProxyHeader | None:
    """The header at the start of `data`; None when more bytes are needed."""
    if data[:1] == b"\r":
        return _parse_v2(data)
    if data[:1] == b"P":
        return _parse_v1(data)
    if not data:
        return None
    raise ParseError("proxy_missing", "the connection does not begin with a PROXY header")


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < _HEAD.size:
        if SIGNATURE_V2[: len(data)] != data[: len(SIGNATURE_V2)]:
            raise ParseError("proxy_malformed", "not a PROXY v2 signature")
        return None
    signature, version_command, family, length = _HEAD.unpack_from(data)
    if signature != SIGNATURE_V2:
        raise ParseError("proxy_malformed", "not a PROXY v2 signature")
    if version_command >> 4 != 2:
        raise ParseError("proxy_version", f"PROXY version {version_command >> 4}, not 2")
    command = version_command & 0x0F
    if command > 1:
        raise ParseError("proxy_malformed", f"PROXY v2 command {command} (0 LOCAL, 1 PROXY)")
    if _HEAD.size + length > MAX_LENGTH:
        raise ParseError("proxy_too_long", f"PROXY v2 header of {_HEAD.size + length} bytes (at most {MAX_LENGTH})")
    if len(data) < _HEAD.size + length:
        return None
    body = data[_HEAD.size : _HEAD.size + length]
    client = server = None
    if family == _TCP4:
        client, server, body = _v2_addresses(body, _V4, 4)
    elif family == _TCP6:
        client, server, body = _v2_addresses(body, _V6, 6)
    elif family != _UNSPEC and command == 1:
        raise ParseError("proxy_family", f"PROXY v2 family/protocol 0x{family:02x} (only TCP over IPv4 or IPv6)")
    elif family != _UNSPEC:
        body = b""  # LOCAL: addresses of any family are to be ignored
    if command == 0:
        client = server = None
    return ProxyHeader(2, client, server, _tlvs(body) if family in (_TCP4, _TCP6) else (), _HEAD.size + length)


def _v2_addresses(body: bytes, shape: struct.Struct, version: int) -> tuple[tuple[str, int], tuple[str, int], bytes]:
    if len(body) < shape.size:
        raise ParseError("proxy_malformed", f"PROXY v2 addresses need {shape.size} bytes, got {len(body)}")
    src, dst, sport, dport = shape.unpack_from(body)
    family = socket.AF_INET if version == 4 else socket.AF_INET6  # (inet_ntop: ipaddress costs 10 times more)
    return (socket.inet_ntop(family, src), sport), (socket.inet_ntop(family, dst), dport), body[shape.size :]


def _tlvs(body: bytes) -> tuple[tuple[int, bytes], ...]:
    out = []
    at = 0
    while at < len(body):
        if len(body) - at < _TLV.size:
            raise ParseError("proxy_malformed", "a PROXY v2 TLV cut short")
        kind, length = _TLV.unpack_from(body, at)
        at += _TLV.size
        if at + length > len(body):
            raise ParseError("proxy_malformed", f"a PROXY v2 TLV (type 0x{kind:02x}) longer than the header")
        out.append((kind, body[at : at + length]))
        at += length
    return tuple(out)


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, _MAX_V1)
    if end < 0:
        if PREFIX_V1[: len(data)] != data[: len(PREFIX_V1)]:
            raise ParseError("proxy_malformed", "not a PROXY v1 line")
        if len(data) >= _MAX_V1:
            raise ParseError("proxy_too_long", f"PROXY v1 line longer than {_MAX_V1} bytes")
        return None
    line = data[:end]
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ParseError("proxy_malformed", "PROXY v1 line is not ASCII") from None
    parts = text.split(" ")
    if parts[0] != "PROXY" or len(parts) < 2:
        raise ParseError("proxy_malformed", "not a PROXY v1 line")
    if parts[1] == "UNKNOWN":
        return ProxyHeader(1, None, None, (), end + 2)
    if parts[1] not in ("TCP4", "TCP6") or len(parts) != 6:
        raise ParseError("proxy_family", f"PROXY v1 protocol {parts[1][:8]!r} (TCP4, TCP6 or UNKNOWN)")
    try:
        src, dst = ipaddress.ip_address(parts[2]), ipaddress.ip_address(parts[3])
        sport, dport = int(parts[4]), int(parts[5])
    except ValueError:
        raise ParseError("proxy_malformed", "PROXY v1 addresses or ports do not parse") from None
    if (src.version, dst.version) != ((4, 4) if parts[1] == "TCP4" else (6, 6)) or not (
        0 <= sport <= 65535 and 0 <= dport <= 65535 and parts[4].isdigit() and parts[5].isdigit()
    ):
        raise ParseError("proxy_malformed", "PROXY v1 addresses or ports out of place")
    return ProxyHeader(1, (str(src), sport), (str(dst), dport), (), end + 2)
