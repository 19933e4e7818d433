"""The NTS pool's key-exchange records (draft-ietf-ntp-nts-keyexchange-pool, as ntpd-rs 1.9 numbers
them): ntpd-rs's own request vectors, what an authenticated pool gets, what anyone else gets."""

from __future__ import annotations

import itertools
import struct

import pytest

from nts.nts.cookies import CookieKeys, KeyRing
from nts.nts.ke_session import (
    KeRefusal,
    KeServerSession,
    KeSettings,
    PoolFixedKey,
    PoolSupport,
    negotiate,
)
from nts.wire.ke_records import Record, RecordType, parse_records, serialize_records

TOKEN = b"a-pool-token-0123456789"
SUPPORTED = (15, 17, 30)
# ntpd-rs's test vector (messages.rs, test_request_fixedkey): Authentication "a", Fixed Key Request
# with C2S 0..31 and S2C 32..63, Next Protocol NTPv4, AEAD 15, End of Message
NTPD_RS_FIXED_KEY = bytes([0, 14, 0, 1, ord("a"), 0x80, 12, 0, 64, *range(64), 0x80, 1, 0, 2, 0, 0,
                           0x80, 4, 0, 2, 0, 15, 0x80, 0, 0, 0])  # fmt: skip


def records(data: bytes) -> list[Record]:
    return [r for r in parse_records(data) if r.type != RecordType.END_OF_MESSAGE]


def test_ntpd_rs_fixed_key_vector() -> None:
    outcome = negotiate(records(NTPD_RS_FIXED_KEY), SUPPORTED, (b"a",))
    assert outcome == PoolFixedKey(15, bytes(range(32)), bytes(range(32, 64)), False)
    assert "keep_alive=False" in repr(outcome) and "\\x00\\x01" not in repr(outcome)  # (no keys shown)
    assert negotiate(records(NTPD_RS_FIXED_KEY), SUPPORTED, (b"b",)) == KeRefusal(1, "pool_not_permitted")
    assert negotiate(records(NTPD_RS_FIXED_KEY), SUPPORTED) == KeRefusal(1, "pool_not_permitted")


def auth(token: bytes = TOKEN) -> Record:
    return Record(False, RecordType.AUTHENTICATION, token)


NP = Record(True, RecordType.NEXT_PROTOCOL, b"\x00\x00")
KEEP = Record(False, RecordType.KEEP_ALIVE)
WANT_AEADS = Record(True, RecordType.SUPPORTED_ALGORITHM_LIST)
WANT_PROTOCOLS = Record(True, RecordType.SUPPORTED_NEXT_PROTOCOL_LIST)


def aead(*ids: int) -> Record:
    return Record(True, RecordType.AEAD_ALGORITHM, struct.pack(f">{len(ids)}H", *ids))


def fixed(length: int) -> Record:
    return Record(True, RecordType.FIXED_KEY_REQUEST, bytes(range(length)))


@pytest.mark.parametrize(
    ("rs", "outcome"),
    [
        ([auth(), WANT_AEADS, WANT_PROTOCOLS, KEEP], PoolSupport(True, True, True)),
        ([auth(), WANT_AEADS], PoolSupport(False, True, False)),
        ([auth(), fixed(32), NP, aead(30)], PoolFixedKey(30, bytes(range(16)), bytes(range(16, 32)), False)),
        # refused, with Error 1
        ([WANT_AEADS], KeRefusal(1, "pool_not_permitted")),  # no token
        ([auth(b"x" * 23), fixed(64), NP, aead(15)], KeRefusal(1, "pool_not_permitted")),  # a wrong one
        ([auth(), auth(), WANT_AEADS], KeRefusal(1, "pool_bad_record")),  # repeated
        ([auth(), WANT_AEADS, WANT_AEADS], KeRefusal(1, "pool_bad_record")),
        ([auth(), fixed(64), fixed(64), NP, aead(15)], KeRefusal(1, "pool_bad_record")),
        ([auth(), fixed(63), NP, aead(15)], KeRefusal(1, "pool_bad_record")),  # odd length
        ([auth(), Record(False, RecordType.KEEP_ALIVE, b"x"), WANT_AEADS], KeRefusal(1, "pool_bad_record")),
        ([auth(), WANT_AEADS, NP, aead(15)], KeRefusal(1, "pool_mixed_request")),  # mixed with a key exchange
        ([auth(), WANT_AEADS, fixed(64)], KeRefusal(1, "pool_mixed_request")),
        ([auth(), fixed(64), NP, aead(15, 17)], KeRefusal(1, "pool_fixed_key_request")),  # two AEADs
        ([auth(), fixed(64), aead(15)], KeRefusal(1, "pool_fixed_key_request")),  # no protocol
        ([auth(), fixed(64), NP, aead(31)], KeRefusal(1, "pool_aead")),  # not supported here
        ([auth(), fixed(32), NP, aead(15)], KeRefusal(1, "pool_key_length")),  # 16-byte keys for AEAD 15
        # an ordinary request that carries a token or Keep Alive, or names servers to avoid: as ever
        ([auth(), KEEP, Record(False, RecordType.NTP_SERVER_DENY, b"x"), NP, aead(15)], None),
    ],
)
def test_pool_requests(rs: list[Record], outcome: object) -> None:
    got = negotiate(rs, SUPPORTED, (b"another-token-0123456789", TOKEN))
    if outcome is None:
        assert type(got).__name__ == "Negotiation" and got.aead == 15  # type: ignore[union-attr]
    else:
        assert got == outcome


def exchange(settings: KeSettings, ring: KeyRing, request: list[Record], room: bool = True) -> list[Record]:
    session = KeServerSession(settings, ring, turns=itertools.count(), keep_alive=lambda: room)
    reply = session.receive(serialize_records([*request, Record(True, RecordType.END_OF_MESSAGE)]),
                            lambda _l, n, _c: bytes(n), 1e9)  # fmt: skip
    assert reply is not None
    assert reply.keep_alive == any(r.type == RecordType.KEEP_ALIVE for r in parse_records(reply.data))
    return parse_records(reply.data)


def test_the_pool_gets_what_is_supported_and_cookies_for_its_keys() -> None:
    ring = KeyRing(bytes(32))
    settings = KeSettings(supported_aeads=(15, 30), pool_tokens=(TOKEN,), ntp_server=("ntp.example",))
    support = exchange(settings, ring, [auth(), WANT_AEADS, WANT_PROTOCOLS, KEEP])
    assert [(r.type, r.body) for r in support] == [
        (RecordType.SUPPORTED_ALGORITHM_LIST, struct.pack(">4H", 15, 32, 30, 16)),
        (RecordType.SUPPORTED_NEXT_PROTOCOL_LIST, b"\x00\x00"),
        (RecordType.KEEP_ALIVE, b""),
        (RecordType.END_OF_MESSAGE, b""),
    ]
    reply = exchange(settings, ring, [auth(), fixed(64), NP, aead(15), KEEP], room=False)  # no room: no Keep Alive
    cookies = [r.body for r in reply if r.type == RecordType.NEW_COOKIE]
    assert len(cookies) == 8 and RecordType.KEEP_ALIVE not in [r.type for r in reply]
    assert ring.open(cookies[0], 1e9) == CookieKeys(15, bytes(range(32)), bytes(range(32, 64)))
    assert (RecordType.NTPV4_SERVER, b"ntp.example") in [(r.type, r.body) for r in reply]
    refused = exchange(KeSettings(supported_aeads=(15,)), ring, [auth(), fixed(64), NP, aead(15)])
    assert (refused[0].type, refused[0].body) == (RecordType.ERROR, b"\x00\x01")  # no tokens configured
