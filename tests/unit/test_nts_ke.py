"""NTS-KE records and negotiation, sans-IO, with byte vectors."""

from __future__ import annotations

import itertools
import struct

import pytest

from nts.nts.cookies import CookieKeys, KeyRing
from nts.nts.ke_session import (
    EXPORTER_LABEL,
    DecidedRequests,
    KeRefusal,
    KeRequest,
    KeServerSession,
    KeSettings,
    Negotiation,
    negotiate,
    response,
)
from nts.wire.errors import ParseError
from nts.wire.ke_records import Record, RecordReader, RecordType, parse_records, serialize_records

SUPPORTED = (15, 17, 30)

RECORD_CASES = [
    (Record(True, 0), "80000000"),
    (Record(True, 1, b"\x00\x00"), "800100020000"),
    (Record(True, 4, b"\x00\x0f\x00\x1e"), "80040004000f001e"),
    (Record(False, 5, b"\xaa" * 3), "00050003aaaaaa"),
    (Record(False, 1024), "04000000"),
    (Record(True, 0x7FFF, b"x"), "ffff000178"),
]


@pytest.mark.parametrize(("record", "hexstr"), RECORD_CASES)
def test_record_both_ways(record: Record, hexstr: str) -> None:
    assert serialize_records([record]).hex() == hexstr
    assert parse_records(bytes.fromhex(hexstr)) == [record]


def test_reader_byte_by_byte_equals_whole() -> None:
    stream = b"".join(bytes.fromhex(h) for _, h in RECORD_CASES)
    reader = RecordReader()
    got: list[Record] = []
    for i in range(len(stream)):
        got += reader.feed(stream[i : i + 1])
    assert got == [r for r, _ in RECORD_CASES]
    assert reader.pending == 0


def test_reader_bound() -> None:
    reader = RecordReader(max_bytes=10)
    with pytest.raises(ParseError) as exc:
        reader.feed(bytes(11))
    assert exc.value.code == "ke_too_long"


def test_truncated_record() -> None:
    with pytest.raises(ParseError):
        parse_records(bytes.fromhex("8001000200"))


def rec(t: int, body: bytes = b"", critical: bool = True) -> Record:
    return Record(critical, t, body)


NP = rec(1, b"\x00\x00")
AEAD = rec(4, struct.pack(">HH", 15, 30))


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        ([NP, AEAD], Negotiation(0, 15)),
        ([NP, rec(4, struct.pack(">HH", 30, 15), critical=False)], Negotiation(0, 30)),
        ([NP, rec(4, struct.pack(">HH", 30, 15)), rec(1024, critical=False)], Negotiation(0, 30, True)),
        ([NP, rec(4, struct.pack(">H", 15)), rec(1024, critical=False)], Negotiation(0, 15, False)),
        ([NP, rec(4, struct.pack(">H", 99))], Negotiation(0, None)),
        ([rec(1, b"\x80\x01"), AEAD], Negotiation(None, None)),
        ([NP, AEAD, rec(6, b"ntp.example"), rec(7, b"\x00\x7b")], Negotiation(0, 15)),
        ([NP, AEAD, rec(2000, b"x", critical=False)], Negotiation(0, 15)),
        # an unknown critical record before Next Protocol and AEAD: Error 0, not Error 1 (chrony's fix)
        ([rec(2000, b"x"), NP, AEAD], KeRefusal(0, "unknown_critical_record")),
        ([rec(2000), NP, NP], KeRefusal(0, "unknown_critical_record")),
        ([NP, NP, AEAD], KeRefusal(1, "next_protocol_count")),
        ([NP, AEAD, AEAD], KeRefusal(1, "aead_count")),
        ([NP], KeRefusal(1, "aead_count")),
        ([AEAD], KeRefusal(1, "next_protocol_count")),
        ([rec(1, b"\x00\x00", critical=False), AEAD], KeRefusal(1, "bad_next_protocol")),
        ([rec(1, b"\x00"), AEAD], KeRefusal(1, "bad_next_protocol")),
        ([NP, rec(4, b"")], KeRefusal(1, "bad_aead")),
        ([NP, AEAD, rec(2, b"\x00\x00")], KeRefusal(1, "client_sent_server_record")),
        ([NP, AEAD, rec(3, b"\x00\x00")], KeRefusal(1, "client_sent_server_record")),
        ([NP, AEAD, rec(5, b"cookie", critical=False)], KeRefusal(1, "client_sent_server_record")),
        ([NP, AEAD, rec(1024, b"x", critical=False)], KeRefusal(1, "bad_compliance_record")),
    ],
)
def test_negotiation(records: list[Record], expected: Negotiation | KeRefusal) -> None:
    assert negotiate(records, SUPPORTED) == expected


def test_exporter_contexts() -> None:
    assert Negotiation(0, 15).exporter_context(False) == bytes.fromhex("0000000f00")
    assert Negotiation(0, 15).exporter_context(True) == bytes.fromhex("0000000f01")
    assert Negotiation(0, 30, True).exporter_context(True) == bytes.fromhex("0000001e01")
    # chrony before 4.6 derives AES-128-GCM-SIV keys with AEAD id 15 in the context
    assert Negotiation(0, 30, False).exporter_context(False) == bytes.fromhex("0000000f00")


def test_response_vectors() -> None:
    ok = response(Negotiation(0, 15), [b"\x01" * 4, b"\x02" * 4], server="ntp.example", port=123)
    assert ok.hex() == (
        "800100020000"
        "80040002000f"
        "80070002007b"
        "8006000b" + b"ntp.example".hex() + "0005000401010101"
        "0005000402020202"
        "80000000"
    )
    assert response(Negotiation(0, 30, True), []).hex() == "80010002000080040002001e0400000080000000"
    assert response(KeRefusal(0, "x")).hex() == "80020002000080000000"
    assert response(Negotiation(None, None)).hex() == "8001000080000000"
    assert response(Negotiation(0, None)).hex() == "8001000200008004000080000000"


def test_session_collects_until_end_of_message() -> None:
    s = KeRequest(SUPPORTED)
    request = serialize_records([NP, AEAD, rec(0)])
    for b in request[:-1]:
        assert s.receive(bytes([b])) is None
    assert s.receive(request[-1:]) == Negotiation(0, 15)
    with pytest.raises(ParseError):
        s.receive(b"more")


def test_a_request_seen_whole_before_is_answered_from_memory_alike() -> None:
    request = serialize_records([NP, AEAD, rec(0)])
    memo = DecidedRequests()
    assert KeRequest(SUPPORTED, decided=memo).receive(request) == Negotiation(0, 15)
    assert memo.outcomes == {(request, SUPPORTED): Negotiation(0, 15)}
    memo.outcomes[(request, SUPPORTED)] = KeRefusal(0, "marker")  # so the next answer shows its source
    session = KeRequest(SUPPORTED, decided=memo)
    assert session.receive(request) == KeRefusal(0, "marker")
    with pytest.raises(ParseError):  # and the session is over, as after a parsed request
        session.receive(b"more")
    assert KeRequest((17,), decided=memo).receive(request) == Negotiation(0, None)  # other AEADs: decided afresh
    split = KeRequest(SUPPORTED, decided=memo)
    assert split.receive(request[:5]) is None
    assert split.receive(request[5:]) == Negotiation(0, 15)  # pieces are parsed, and not kept
    assert set(memo.outcomes) == {(request, SUPPORTED), (request, (17,))}
    with pytest.raises(ParseError) as exc:  # a limit lowered since (a reload) still applies
        KeRequest(SUPPORTED, max_request=len(request) - 1, decided=memo).receive(request)
    assert exc.value.code == "ke_too_long"
    assert KeRequest(SUPPORTED).receive(request) == Negotiation(0, 15)  # with no memory: parsed


def test_the_memory_of_requests_is_bounded() -> None:
    memo = DecidedRequests(limit=64)
    for port in range(64 + 10):
        extra = Record(True, 7, struct.pack(">H", port))  # Port Negotiation: each request differs
        request = serialize_records([NP, AEAD, extra, rec(0)])
        assert KeRequest(SUPPORTED, decided=memo).receive(request) == Negotiation(0, 15)
    assert len(memo.outcomes) == 64


def test_session_refuses_trailing_bytes_and_bad_end() -> None:
    with pytest.raises(ParseError) as exc:
        KeRequest(SUPPORTED).receive(serialize_records([NP, AEAD, rec(0)]) + b"\x00")
    assert exc.value.code == "ke_after_end"
    bad_end = KeRequest(SUPPORTED).receive(serialize_records([NP, AEAD, rec(0, b"x")]))
    assert bad_end == KeRefusal(1, "bad_end_of_message")
    with pytest.raises(ParseError) as exc:
        KeRequest(SUPPORTED, max_request=64).receive(serialize_records([NP, AEAD, rec(9, bytes(80), False)]))
    assert exc.value.code == "ke_too_long"


def test_the_session_turns_request_bytes_into_the_reply_bytes_and_an_outcome() -> None:
    """Sans-IO to the end: decrypted bytes, an exporter and the time in; what to send out."""
    asked: list[tuple[bytes, int, bytes]] = []

    def export(label: bytes, length: int, context: bytes) -> bytes:
        asked.append((label, length, context))
        return bytes([context[-1] + 1]) * length  # C2S all 0x01, S2C all 0x02

    keyring = KeyRing(bytes(32))
    settings = KeSettings(supported_aeads=SUPPORTED, ntp_port=1234)
    session = KeServerSession(settings, keyring)
    request = serialize_records([NP, AEAD, rec(0)])
    assert session.receive(request[:3], export, 1e9) is None
    reply = session.receive(request[3:], export, 1e9)
    assert reply is not None and reply.outcome == "ok_aead_15"
    assert asked == [
        (EXPORTER_LABEL, 32, bytes.fromhex("0000000f00")),
        (EXPORTER_LABEL, 32, bytes.fromhex("0000000f01")),
    ]
    records = parse_records(reply.data)
    cookies = [r.body for r in records if r.type == RecordType.NEW_COOKIE]
    assert len(cookies) == 8 and records[-1].type == RecordType.END_OF_MESSAGE
    assert keyring.open(cookies[0], 1e9) == CookieKeys(15, bytes([1]) * 32, bytes([2]) * 32)
    refused = KeServerSession(settings, keyring).receive(serialize_records([AEAD, rec(0)]), export, 1e9)
    assert refused is not None and refused.outcome == "error_next_protocol_count" and len(asked) == 2


def test_several_ntp_servers_are_named_in_turn() -> None:
    """A key-establishment front for NTP back-ends: each session names the next (Server Negotiation)."""
    keyring = KeyRing(bytes(32))
    settings = KeSettings(supported_aeads=SUPPORTED, ntp_server=("10.0.0.2", "ntp3.example"), ntp_port=123)

    turns = itertools.count()  # (the server's, shared by its sessions)

    def named(request: bytes) -> bytes | None:
        reply = KeServerSession(settings, keyring, turns=turns).receive(request, lambda _l, n, _c: bytes(n), 1e9)
        assert reply is not None
        return next((r.body for r in parse_records(reply.data) if r.type == RecordType.NTPV4_SERVER), None)

    good, refused = serialize_records([NP, AEAD, rec(0)]), serialize_records([AEAD, rec(0)])
    # a refused request names no server and takes no turn
    assert [named(r) for r in (good, good, refused, good)] == [b"10.0.0.2", b"ntp3.example", None, b"10.0.0.2"]
