"""Every parser either parses or raises its parse error (nothing else), and round-trips."""

from __future__ import annotations

import dataclasses
import struct
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from nts.config import ConfigError, parse_config
from nts.core.clockstate import ClockSettings, server_state
from nts.core.decisions import Drop
from nts.core.pipeline import Pipeline
from nts.core.plain import PlainHandler
from nts.wire.errors import ParseError
from nts.wire.extensions import ExtensionField, parse_extension, serialize_extension
from nts.wire.packet import (
    Header,
    Packet,
    parse_header,
    parse_packet,
    serialize_header,
    serialize_packet,
    split_body,
)

headers = st.builds(
    Header,
    leap=st.integers(0, 3),
    version=st.integers(0, 7),
    mode=st.integers(0, 7),
    stratum=st.integers(0, 255),
    poll=st.integers(-128, 127),
    precision=st.integers(-128, 127),
    root_delay=st.integers(0, 2**32 - 1),
    root_dispersion=st.integers(0, 2**32 - 1),
    reference_id=st.binary(min_size=4, max_size=4),
    reference_ts=st.integers(0, 2**64 - 1),
    origin_ts=st.integers(0, 2**64 - 1),
    receive_ts=st.integers(0, 2**64 - 1),
    transmit_ts=st.integers(0, 2**64 - 1),
)
fields = st.builds(
    ExtensionField,
    type=st.integers(0, 0xFFFF),
    value=st.integers(3, 40).flatmap(lambda n: st.binary(min_size=4 * n, max_size=4 * n)),
)


@given(st.binary(max_size=600))
def test_parse_packet_parses_or_raises_parse_error(data: bytes) -> None:
    try:
        packet = parse_packet(data)
    except ParseError:
        return
    assert serialize_packet(packet) == data


@given(st.binary(max_size=80), st.integers(0, 80))
def test_parse_extension_parses_or_raises(data: bytes, pos: int) -> None:
    try:
        field, end = parse_extension(data, pos)
    except ParseError:
        return
    assert serialize_extension(field) == data[pos:end]


@given(headers)
def test_header_round_trip(h: Header) -> None:
    assert parse_header(serialize_header(h)) == h


@given(
    st.builds(
        lambda h, f, t: Packet(h, tuple(f), t),
        headers.map(lambda h: dataclasses.replace(h, version=4)),
        st.lists(fields, max_size=4),
        st.sampled_from([b"", bytes(4), bytes(20), bytes(24)]),
    )
)
def test_packet_round_trip(p: Packet) -> None:
    # A last field shorter than 28 bytes with no MAC is ambiguous on the wire (RFC 7822 section 7.5).
    wire = serialize_packet(p)
    try:
        parsed = parse_packet(wire)
    except ParseError:
        assert p.extensions and not p.trailer
        return
    assert parsed == p or (p.extensions and len(serialize_extension(p.extensions[-1])) <= 24)


@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_pipeline_never_raises_and_never_replies_longer(data: bytes) -> None:
    state = server_state(ClockSettings(local_reference=True), None, -20, time.time_ns())
    p = Pipeline(state=state, authenticators=[PlainHandler()], clock=time.time_ns)
    decision = p.handle(data, ("127.0.0.1", 1), time.time_ns())
    assert isinstance(decision, (bytes, Drop))
    if isinstance(decision, bytes):
        assert len(decision) <= len(data)
        assert decision[0] & 7 == 4


@given(st.text(max_size=300))
def test_config_parses_or_raises_config_error(text: str) -> None:
    try:
        parse_config(text, "prop.yaml")
    except ConfigError as exc:
        assert str(exc).startswith("prop.yaml")


@given(st.binary(min_size=48, max_size=48))
def test_any_header_bytes_parse(data: bytes) -> None:
    assert serialize_header(parse_header(data)) == data
    assert struct.unpack_from(">B", data)[0] >> 6 == parse_header(data).leap


@given(st.integers(1, 4), st.sampled_from([20, 24]), st.data())
def test_mac_bodies_are_a_bare_trailer_in_every_version(version: int, body: int, data: st.DataObject) -> None:
    """The pipeline skips the field parser for 20/24-byte bodies; the parser must agree for any bytes."""
    packet = data.draw(st.binary(min_size=48 + body, max_size=48 + body))
    assert split_body(packet, version) == ((), packet[48:])


@given(st.integers(0, 2**64), st.integers(0, 2**64))
def test_the_reply_header_converts_timestamps_as_the_wire_layer_does(rx_ns: int, tx_ns: int) -> None:
    from nts.core.clockstate import Replies, ServerState
    from nts.wire.timestamps import unix_ns_to_ntp64

    replies = Replies(ServerState(0, 2, -20, 0, 0, b"KERN", 0), lambda: tx_ns)
    header = replies.reply_header(bytes([0x23]) + bytes(47), rx_ns)
    # (the receive timestamp goes out with its lowest bit set, the transmit one with it clear: RFC 9769)
    assert struct.unpack_from(">QQ", header, 32) == (unix_ns_to_ntp64(rx_ns) | 1, unix_ns_to_ntp64(tx_ns) & ~1)
