"""NTS parsers: parse or raise the parse error (nothing else), round trips, no crash on any input."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from nts.core.clockstate import ClockSettings, server_state
from nts.core.decisions import Drop
from nts.core.pipeline import Pipeline
from nts.core.plain import PlainHandler
from nts.nts.cookies import CookieError, KeyRing
from nts.nts.ke_session import (
    DecidedRequests,
    KeRefusal,
    KeRequest,
    Negotiation,
    PoolFixedKey,
    PoolSupport,
    negotiate,
    response,
)
from nts.nts.packets import NtsPackets
from nts.wire.errors import ParseError
from nts.wire.ke_records import Record, RecordReader, RecordType, parse_records, serialize_records

records = st.builds(Record, critical=st.booleans(), type=st.integers(0, 0x7FFF), body=st.binary(max_size=40))


@given(st.lists(records, max_size=8))
def test_records_round_trip(rs: list[Record]) -> None:
    assert parse_records(serialize_records(rs)) == rs


@given(st.binary(max_size=200))
def test_parse_records_parses_or_raises(data: bytes) -> None:
    try:
        rs = parse_records(data)
    except ParseError:
        return
    assert serialize_records(rs) == data


@given(st.lists(records, max_size=8), st.lists(st.integers(1, 7), max_size=30))
def test_reader_chunking_does_not_matter(rs: list[Record], cuts: list[int]) -> None:
    stream = serialize_records(rs)
    reader, got, pos = RecordReader(), [], 0
    for cut in cuts:
        got += reader.feed(stream[pos : pos + cut])
        pos += cut
    got += reader.feed(stream[pos:])
    assert got == rs


@given(st.lists(records, max_size=10))
def test_negotiate_always_decides(rs: list[Record]) -> None:
    assert isinstance(negotiate(rs, (15, 30)), Negotiation | KeRefusal)


TOKEN = b"a-token-of-the-pool-0123"
pool_records = st.one_of(
    records,
    st.builds(Record, critical=st.booleans(), type=st.sampled_from([8, 9, 10, 12, 13, 14, 1, 4]),
              body=st.one_of(st.binary(max_size=70), st.just(TOKEN), st.just(b"\x00\x00"), st.just(b"\x00\x0f"))),
)  # fmt: skip


@given(st.lists(pool_records, max_size=10))
def test_negotiate_decides_any_mix_of_pool_records(rs: list[Record]) -> None:
    outcome = negotiate(rs, (15, 30), (TOKEN,))
    assert isinstance(outcome, Negotiation | KeRefusal | PoolSupport | PoolFixedKey)
    if isinstance(outcome, PoolSupport | PoolFixedKey):  # only with the token
        assert (
            Record(False, RecordType.AUTHENTICATION, TOKEN) in rs
            or Record(True, RecordType.AUTHENTICATION, TOKEN) in rs
        )


@given(
    st.sampled_from([15, 17, 30]),
    st.booleans(),
    st.lists(st.binary(min_size=1, max_size=200), max_size=8),
    st.none() | st.integers(0, 65535),
    st.none() | st.text("abcdefghijklmnopqrstuvwxyz0123456789.-:", min_size=1, max_size=40),
)
def test_response_parses_back_to_its_records(
    aead: int, compliant: bool, cookies: list[bytes], port: int | None, server: str | None
) -> None:
    records = parse_records(response(Negotiation(0, aead, compliant), cookies, server, port))
    assert records[:2] == [
        Record(True, RecordType.NEXT_PROTOCOL, b"\x00\x00"),
        Record(True, RecordType.AEAD_ALGORITHM, aead.to_bytes(2, "big")),
    ]
    rest = records[2:]
    if compliant:
        assert rest.pop(0) == Record(False, RecordType.COMPLIANT_128GCM_EXPORT)
    if port is not None:
        assert rest.pop(0) == Record(True, RecordType.NTPV4_PORT, port.to_bytes(2, "big"))
    if server is not None:
        assert rest.pop(0) == Record(True, RecordType.NTPV4_SERVER, server.encode())
    end = Record(True, RecordType.END_OF_MESSAGE)
    assert rest == [*(Record(False, RecordType.NEW_COOKIE, c) for c in cookies), end]


@given(st.binary(max_size=300))
def test_ke_session_parses_or_raises(data: bytes) -> None:
    try:
        KeRequest((15,), max_request=256).receive(data)
    except ParseError:
        pass


ke_requests = st.lists(
    st.builds(
        Record,
        critical=st.booleans(),
        type=st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 1024, 77]),
        body=st.sampled_from([b"", b"\x00\x00", b"\x00\x0f", b"\x00\x1e\x00\x0f", b"\x00", b"x" * 9]),
    ),
    max_size=6,
).map(lambda rs: serialize_records([*rs, Record(True, RecordType.END_OF_MESSAGE)]))


def _outcome(pieces: list[bytes], memo: DecidedRequests, max_request: int = 256) -> object:
    """What the listener does: feed pieces until there is an answer (or an error). The bound is
    above any request drawn here: one over it is refused whole, but in pieces may end (End of
    Message) before the excess arrives, and the last assertion below checks the bound itself."""
    session = KeRequest((15, 30), max_request, memo)
    try:
        for piece in pieces:
            result = session.receive(piece)
            if result is not None:
                return result
    except ParseError as exc:
        return exc.code
    return None


@given(ke_requests, st.integers(1, 20))
def test_a_remembered_request_gets_the_answer_parsing_gives(request: bytes, cut: int) -> None:
    memo = DecidedRequests()
    first = _outcome([request], memo)  # parsed (and remembered when decided)
    assert _outcome([request], memo) == first  # answered from memory, or parsed again
    assert _outcome([request[:cut], request[cut:]], memo) == first  # in pieces: always parsed
    assert _outcome([request], memo, max_request=len(request) - 1) == "ke_too_long"


@given(st.binary(max_size=200))
def test_cookie_open_raises_only_cookie_error(data: bytes) -> None:
    try:
        KeyRing(bytes(32)).open(data, 1e9)
    except CookieError:
        pass


NTS_PREFIX = st.sampled_from([b"", bytes.fromhex("01040024") + bytes(32), bytes.fromhex("02040068")])


@given(NTS_PREFIX, st.binary(max_size=400))
@settings(max_examples=300)
def test_nts_path_never_raises_or_grows(prefix: bytes, tail: bytes) -> None:
    from nts.nts.plugin import NtsPlugin

    auth = NtsPlugin.__new__(NtsPlugin)
    auth.packets = NtsPackets(KeyRing(bytes(32)), (15, 30), time.time)
    state = server_state(ClockSettings(local_reference=True), None, -20, time.time_ns())
    p = Pipeline(state=state, authenticators=[auth, PlainHandler()], clock=time.time_ns)
    data = bytes([0x23]) + bytes(47) + prefix + tail
    decision = p.handle(data, ("127.0.0.1", 1), time.time_ns())
    assert isinstance(decision, bytes | Drop)
    if isinstance(decision, bytes):
        assert len(decision) <= len(data)
