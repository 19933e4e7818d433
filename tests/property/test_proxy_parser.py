"""The PROXY header parser: round trips of both versions, every prefix is "need more", and any
bytes either parse or raise the parse error, never more than the bound buffered."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nts.wire.errors import ParseError
from nts.wire.proxy import MAX_LENGTH, SIGNATURE_V2, ProxyHeader, is_proxy_start, parse

v4 = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
v6 = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1))
ports = st.integers(0, 65535)
tlvs = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=5)


def v2(src: ipaddress._BaseAddress, dst: ipaddress._BaseAddress, sport: int, dport: int,
       extra: list[tuple[int, bytes]], command: int = 1) -> bytes:  # fmt: skip
    body = src.packed + dst.packed + struct.pack(">HH", sport, dport)
    body += b"".join(struct.pack(">BH", kind, len(value)) + value for kind, value in extra)
    family = 0x11 if src.version == 4 else 0x21
    return SIGNATURE_V2 + bytes([0x20 | command, family]) + struct.pack(">H", len(body)) + body


@given(st.one_of(st.tuples(v4, v4), st.tuples(v6, v6)), ports, ports, tlvs, st.binary(max_size=30))
def test_v2_round_trip_and_every_prefix_wants_more(
    pair: tuple[ipaddress._BaseAddress, ipaddress._BaseAddress], sport: int, dport: int,
    extra: list[tuple[int, bytes]], after: bytes,
) -> None:  # fmt: skip
    src, dst = pair
    wire = v2(src, dst, sport, dport, extra)
    header = parse(wire + after)
    family = socket.AF_INET if src.version == 4 else socket.AF_INET6  # (written as the socket module writes them)
    client, server = (socket.inet_ntop(family, src.packed), sport), (socket.inet_ntop(family, dst.packed), dport)
    assert header == ProxyHeader(2, client, server, tuple(extra), len(wire))
    for cut in range(len(wire)):
        assert parse(wire[:cut]) is None
        assert is_proxy_start(wire[:cut]) == (cut > 0)


@given(st.one_of(st.tuples(v4, v4), st.tuples(v6, v6)), ports, ports, st.binary(max_size=30))
def test_v1_round_trip_and_every_prefix_wants_more(
    pair: tuple[ipaddress._BaseAddress, ipaddress._BaseAddress], sport: int, dport: int, after: bytes
) -> None:
    src, dst = pair
    line = f"PROXY TCP{src.version} {src} {dst} {sport} {dport}\r\n".encode()
    assert parse(line + after) == ProxyHeader(1, (str(src), sport), (str(dst), dport), (), len(line))
    for cut in range(len(line) - 1):  # (up to the CR: the line is not over)
        assert parse(line[:cut]) is None


@given(st.binary(max_size=600))
def test_any_bytes_parse_or_raise_the_parse_error(data: bytes) -> None:
    try:
        header = parse(data)
    except ParseError:
        return
    assert header is None or header.length <= min(len(data), MAX_LENGTH)


@given(st.binary(min_size=1, max_size=40))
def test_what_follows_the_v2_signature_parses_or_raises(rest: bytes) -> None:
    try:
        parse(SIGNATURE_V2 + rest)
    except ParseError:
        pass


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (SIGNATURE_V2 + bytes([0x21, 0x11]) + struct.pack(">H", 600) + bytes(600), "proxy_too_long"),
        (SIGNATURE_V2 + bytes([0x21, 0x11]) + struct.pack(">H", 4) + bytes(4), "proxy_malformed"),  # short addresses
        (SIGNATURE_V2 + bytes([0x21, 0x12]) + struct.pack(">H", 12) + bytes(12), "proxy_family"),  # UDP
        (SIGNATURE_V2 + bytes([0x21, 0x31]) + struct.pack(">H", 216) + bytes(216), "proxy_family"),  # unix
        (SIGNATURE_V2 + bytes([0x11, 0x11]) + struct.pack(">H", 12) + bytes(12), "proxy_version"),
        (SIGNATURE_V2 + bytes([0x22, 0x11]) + struct.pack(">H", 12) + bytes(12), "proxy_malformed"),  # command 2
        (SIGNATURE_V2 + bytes([0x21, 0x11]) + struct.pack(">H", 14) + bytes(12) + b"\x01\x00", "proxy_malformed"),
        (SIGNATURE_V2 + bytes([0x21, 0x11]) + struct.pack(">H", 15) + bytes(12) + b"\x01\x00\x09", "proxy_malformed"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "proxy_family"),
        (b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "proxy_malformed"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n", "proxy_malformed"),
        (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "proxy_family"),
        (b"PROXY " + b"x" * 120, "proxy_too_long"),
        (bytes([22, 3, 1, 0, 4]), "proxy_missing"),  # a ClientHello where a header must be
        (b"PUT / HTTP/1.1\r\n", "proxy_malformed"),
    ],
)
def test_bad_headers_are_refused_with_a_reason(wire: bytes, code: str) -> None:
    with pytest.raises(ParseError) as refused:
        parse(wire)
    assert refused.value.code == code


def test_local_and_unknown_carry_no_client() -> None:
    local = v2(ipaddress.IPv4Address("10.0.0.1"), ipaddress.IPv4Address("10.0.0.2"), 1, 2, [], command=0)
    assert parse(local) == ProxyHeader(2, None, None, (), len(local))
    unspec = SIGNATURE_V2 + bytes([0x20, 0x00]) + struct.pack(">H", 0)
    assert parse(unspec) == ProxyHeader(2, None, None, (), 16)
    assert parse(b"PROXY UNKNOWN\r\n") == ProxyHeader(1, None, None, (), 15)
