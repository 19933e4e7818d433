"""Samba's replies are untrusted input: the reader parses or raises ParseError, nothing else."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mssntp.signd import ReplyReader, SignedReply, encode_reply, parse_reply
from nts.wire.errors import ParseError


@given(st.binary(max_size=200))
def test_reader_parses_or_raises(data: bytes) -> None:
    try:
        ReplyReader().feed(data)
    except ParseError:
        pass


@given(st.binary(max_size=120))
def test_parse_reply_parses_or_raises(body: bytes) -> None:
    try:
        parse_reply(body)
    except ParseError:
        pass


@given(st.sampled_from([3, 4]), st.integers(0, 2**32 - 1), st.binary(min_size=68, max_size=68))
def test_reply_round_trip(op: int, packet_id: int, signed: bytes) -> None:
    payload = signed if op == 3 else b""
    assert ReplyReader().feed(encode_reply(op, packet_id, payload)) == [SignedReply(op, packet_id, payload)]
