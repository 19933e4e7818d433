"""Cookies and NTS-protected NTP, sans-IO: our client's requests through the server's pipeline."""

from __future__ import annotations

import contextlib
import os
import stat
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from nts.client import KeResult, QueryError, check_nts_reply, nts_request
from nts.core.clockstate import ClockSettings, server_state
from nts.core.pipeline import Pipeline
from nts.core.plain import PlainHandler
from nts.files import check_private_file
from nts.nts import nettle
from nts.nts.aead import AEADS
from nts.nts.cookies import CookieError, CookieKeys, KeyRing, load_or_create_secret
from nts.nts.packets import NtsPackets, auth_field
from nts.wire.extensions import ExtensionField, FieldType, make_field, serialize_extension
from nts.wire.packet import parse_packet

NOW = 1_800_000_000.0
SECRET = bytes(range(32))


def keys(aead: int) -> CookieKeys:
    n = {15: 32, 16: 48, 17: 64, 30: 16, 31: 32}[aead]
    return CookieKeys(aead, os.urandom(n), os.urandom(n))


@pytest.mark.parametrize("siv", ["nettle", "cryptography"])
def test_cookie_round_trip_and_sizes(siv: str) -> None:
    with siv_backend(siv):
        ring = KeyRing(SECRET)
    with siv_backend("cryptography" if siv == "nettle" else "nettle"):
        assert KeyRing(SECRET).open(ring.seal(keys(15), NOW), NOW)  # the other backend opens it
    for aead, size in ((15, 104), (17, 168), (30, 72), (31, 104)):
        k = keys(aead)
        cookie = ring.seal(k, NOW)
        assert len(cookie) == size and len(cookie) % 4 == 0
        assert ring.open(cookie, NOW) == k
    a, b = ring.seal(keys(15), NOW), ring.seal(keys(15), NOW)
    assert a[4:] != b[4:]  # unlinkable: fresh nonce each time


def test_cookie_vector_is_stable() -> None:
    """Issued cookies must keep opening across upgrades, restarts and a fleet: pin the bytes."""
    ring = KeyRing(SECRET, rotate_interval=3600)
    k = CookieKeys(30, bytes(16), bytes(range(16)))
    cookie = ring.seal(k, NOW, nonce=bytes(16))
    assert cookie[:4] == struct.pack(">I", int(NOW // 3600))  # key id: the period
    assert cookie.hex() == (
        "0007a120"
        "00000000000000000000000000000000"
        "da4ce4cd6540d9a3cc9b8c03f65a5915e2b09c8630ed216648485a9f0c5c21ca"
        "17579c40de7a2e1346330f3ce0a2e6000c9817a8"
    )
    # the same, from the primitives: AES-SIV keyed by HKDF(secret, period), key id then nonce as AD
    key = HKDF(hashes.SHA256(), 32, salt=b"ntsd cookie key v1", info=struct.pack(">I", int(NOW // 3600)))
    plaintext = struct.pack(">HH", 30, 0) + k.c2s + k.s2c
    assert cookie[20:] == AESSIV(key.derive(SECRET)).encrypt(plaintext, [cookie[:4], cookie[4:20]])
    assert KeyRing(SECRET).open(cookie, NOW) == k


def test_cookies_of_the_one_component_format_still_open() -> None:
    """Cookies sealed before Nettle support (key id with the top bit set, key id and nonce as one AD
    component) keep opening: a server upgraded in place does not NAK its clients' cookies."""
    one_component = bytes.fromhex(
        "8007a120"
        "00000000000000000000000000000000"
        "0f20f73809806cf7456b363484478ce1e02ef1db220da2b2d48ae746072271f6"
        "2d9906313030ef3db792ccae7df4894a3a113fd4"
    )
    assert KeyRing(SECRET).open(one_component, NOW) == CookieKeys(30, bytes(16), bytes(range(16)))
    for forged in (bytes([one_component[0] & 0x7F]) + one_component[1:], one_component[:-1] + b"\0"):
        with pytest.raises(CookieError) as exc:  # the flag is covered by the tag: no format confusion
            KeyRing(SECRET).open(forged, NOW)
        assert exc.value.reason == "cookie_forged"
    with pytest.raises(CookieError) as exc:
        KeyRing(SECRET, keep_keys=1).open(one_component, NOW + 2 * 3600)
    assert exc.value.reason == "cookie_key_unknown"


def test_rotation_settings_apply_at_once() -> None:
    """A reload that shortens keep_keys retires old cookies immediately, not at the next period."""
    ring = KeyRing(SECRET, rotate_interval=3600, keep_keys=5)
    k = keys(15)
    cookie = ring.seal(k, NOW - 3 * 3600)
    assert ring.open(cookie, NOW) == k
    ring.set_rotation(3600, 2)
    with pytest.raises(CookieError) as exc:
        ring.open(cookie, NOW)
    assert exc.value.reason == "cookie_key_unknown"
    with pytest.raises(ValueError):
        ring.set_rotation(59, 2)


def test_cookie_failures() -> None:
    ring = KeyRing(SECRET, rotate_interval=3600, keep_keys=2)
    cookie = ring.seal(keys(15), NOW)
    cases = {
        "cookie_forged": cookie[:-1] + bytes([cookie[-1] ^ 1]),
        "cookie_malformed": cookie[:30],
    }
    for reason, bad in cases.items():
        with pytest.raises(CookieError) as exc:
            ring.open(bad, NOW)
        assert exc.value.reason == reason
    assert ring.open(cookie, NOW + 2 * 3600)  # two periods later: still kept
    with pytest.raises(CookieError) as exc:
        ring.open(cookie, NOW + 3 * 3600)
    assert exc.value.reason == "cookie_key_unknown"
    assert ring.open(cookie, NOW - 3600)  # a fleet member one period behind accepts it
    with pytest.raises(CookieError):
        KeyRing(bytes(32)).open(cookie, NOW)  # another secret: forged


def test_secret_file_created_private_and_refused_when_readable(tmp_path: Path) -> None:
    secret, created = load_or_create_secret(tmp_path / "k")
    assert created and len(secret) == 32
    path = tmp_path / "k" / "nts-master.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_secret(tmp_path / "k") == (secret, False)
    path.chmod(0o644)
    with pytest.raises(PermissionError) as exc:
        check_private_file(path)
    assert str(exc.value) == f"{path} is accessible to others (mode 0644); run: chmod o-rwx {path}"


class Fixture:
    def __init__(self, aead: int, supported: tuple[int, ...] = (15, 16, 17, 30, 31)) -> None:
        self.ring = KeyRing(SECRET)
        self.keys = keys(aead)
        self.ke = KeResult(aead, self.keys.c2s, self.keys.s2c, [], None, None, "", "")
        state = server_state(ClockSettings(local_reference=True), None, -20, int(NOW * 1e9))
        from nts.nts.plugin import NtsPlugin

        auth = NtsPlugin.__new__(NtsPlugin)  # the packet path only: no sockets, no certificates
        auth.packets = NtsPackets(self.ring, supported, lambda: NOW)
        self.pipeline = Pipeline(state=state, authenticators=[auth, PlainHandler()], clock=time.time_ns)

    def cookie(self) -> bytes:
        return self.ring.seal(self.keys, NOW)

    def handle(self, packet: bytes) -> object:
        return self.pipeline.handle(packet, ("192.0.2.1", 123), int(NOW * 1e9))


@contextlib.contextmanager
def siv_backend(name: str) -> Iterator[None]:
    """AES-SIV keys made inside use Nettle or `cryptography` (keys made earlier keep theirs)."""
    if name == "nettle" and not nettle.AVAILABLE:
        pytest.skip(f"Nettle not used here: {nettle.WHY}")
    saved = nettle.AVAILABLE
    nettle.AVAILABLE = name == "nettle"
    try:
        yield
    finally:
        nettle.AVAILABLE = saved


@pytest.mark.parametrize("aead", [15, 16, 17, 30, 31])
@pytest.mark.parametrize("placeholders", [0, 1, 7, 9])
@pytest.mark.parametrize(("server_siv", "client_siv"), [("nettle", "cryptography"), ("cryptography", "nettle")])
def test_request_reply(aead: int, placeholders: int, server_siv: str, client_siv: str) -> None:
    """Each AES-SIV backend on the server side, the other on the client's (the same bytes)."""
    with siv_backend(server_siv):
        f = Fixture(aead)
        cookie = f.cookie()
    with siv_backend(client_siv):
        packet, uid, _ = nts_request(f.ke, cookie, placeholders)
    with siv_backend(server_siv):
        reply = f.handle(packet)
    assert isinstance(reply, bytes)
    assert len(reply) == len(packet)  # padded to exactly the request's length
    with siv_backend(client_siv):
        nak, cookies = check_nts_reply(f.ke, reply, uid)
    assert not nak
    assert len(cookies) == min(8, 1 + placeholders)
    assert all(f.ring.open(c, NOW) == f.keys for c in cookies)
    assert f.pipeline.counters()[("replies", "nts")] == 1


def test_bad_cookie_gets_nts_nak_with_uid_only() -> None:
    f = Fixture(15)
    cookie = bytearray(f.cookie())
    cookie[-1] ^= 0xFF
    packet, uid, _ = nts_request(f.ke, bytes(cookie))
    reply = f.handle(packet)
    assert isinstance(reply, bytes)
    p = parse_packet(reply)
    assert (p.header.stratum, p.header.reference_id, p.header.mode) == (0, b"NTSN", 4)
    assert [e.type for e in p.extensions] == [FieldType.UNIQUE_IDENTIFIER]
    assert p.extensions[0].value == uid
    assert check_nts_reply(f.ke, reply, uid) == (True, [])
    assert f.pipeline.counters()[("naks", "nts", "cookie_forged")] == 1


@pytest.mark.parametrize("aead", [15, 17, 30])
@pytest.mark.parametrize("server_siv", ["nettle", "cryptography"])
def test_bad_authenticator_gets_nak(aead: int, server_siv: str) -> None:
    with siv_backend(server_siv):
        f = Fixture(aead)
        packet, uid, _ = nts_request(f.ke, f.cookie())
        broken = packet[:-20] + bytes(b ^ 0x55 for b in packet[-20:])
        reply = f.handle(broken)
    assert isinstance(reply, bytes) and parse_packet(reply).header.reference_id == b"NTSN"
    assert check_nts_reply(f.ke, reply, uid) == (True, [])
    assert f.pipeline.counters()[("naks", "nts", "authenticator_invalid")] == 1


def test_cookie_of_a_disabled_aead_gets_nak() -> None:
    f = Fixture(17, supported=(15,))
    packet, uid, _ = nts_request(f.ke, f.cookie())
    reply = f.handle(packet)
    assert isinstance(reply, bytes) and parse_packet(reply).header.reference_id == b"NTSN"
    assert check_nts_reply(f.ke, reply, uid) == (True, [])


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ("truncated", "malformed reply: "),
        ("bad_inner_fields", "malformed fields inside the reply's authenticator: "),
    ],
)
def test_client_reports_a_malformed_reply_as_a_query_error(reply: str, message: str) -> None:
    """What a hostile server sends is the server's fault (QueryError, exit 1), not a usage error:
    a ParseError (a ValueError) used to reach the command as one (found by fuzzing the client)."""
    f = Fixture(15)
    uid = bytes(range(32))
    head = bytes([0x24, 1]) + bytes(38) + bytes(8)
    ad = head + serialize_extension(ExtensionField(FieldType.UNIQUE_IDENTIFIER, uid))
    if reply == "truncated":
        data = ad[:-3]
    else:  # authenticates, but its plaintext claims a field longer than itself
        data = ad + auth_field(AEADS[15], f.keys.s2c, os.urandom(16), struct.pack(">HH", 0x0204, 104), ad, 0)
    with pytest.raises(QueryError, match=f"^{message}"):
        check_nts_reply(f.ke, data, uid)


def _fields(*fields: ExtensionField) -> bytes:
    return b"".join(serialize_extension(x) for x in fields)


@pytest.mark.parametrize("case", ["auth_not_last", "two_cookies", "short_uid", "placeholder_size", "no_uid"])
def test_malformed_nts_requests_are_dropped(case: str) -> None:
    f = Fixture(15)
    cookie = f.cookie()
    header = bytes([0x23]) + bytes(47)
    uid = ExtensionField(FieldType.UNIQUE_IDENTIFIER, os.urandom(32))
    ck = ExtensionField(FieldType.NTS_COOKIE, cookie)
    auth = make_field(FieldType.NTS_AUTHENTICATOR, struct.pack(">HH", 16, 16) + bytes(32))
    body = {
        "auth_not_last": _fields(uid, ck, auth, make_field(0x7777, bytes(24))),
        "two_cookies": _fields(uid, ck, ck, auth),
        "short_uid": _fields(ExtensionField(FieldType.UNIQUE_IDENTIFIER, bytes(28)), ck, auth),
        "placeholder_size": _fields(uid, ck, make_field(FieldType.NTS_COOKIE_PLACEHOLDER, bytes(8)), auth),
        "no_uid": _fields(ck, auth),
    }[case]
    decision = f.handle(header + body)
    assert not isinstance(decision, bytes)


def test_reply_randomness_is_drawn_once_and_not_inherited_by_forks() -> None:
    from nts.nts import packets as ntsauth

    draws = [ntsauth._draw() for _ in range(300)]  # more than one block of 128
    assert all(len(d) == 32 for d in draws) and len(set(draws)) == len(draws)
    assert ntsauth._DRAWS  # some left for the next replies
    pid = os.fork()
    if pid == 0:  # the child: nothing drawn by the parent may be handed out here
        os._exit(0 if not ntsauth._DRAWS and ntsauth._draw() not in draws else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_new_master_secret_refuses_the_old_cookies() -> None:
    ring = KeyRing(bytes(range(32)))
    keys = CookieKeys(15, bytes(32), bytes(range(32)))
    now = 1_800_000_000.0
    old = ring.seal(keys, now)
    assert ring.open(old, now) == keys
    assert not ring.set_secret(bytes(range(32)))  # the same secret: nothing changes
    assert ring.open(old, now) == keys
    assert ring.set_secret(bytes(range(1, 33)))
    with pytest.raises(CookieError, match="cookie_forged"):
        ring.open(old, now)
    assert ring.open(ring.seal(keys, now), now) == keys
    with pytest.raises(ValueError):
        ring.set_secret(b"short")


def test_the_master_secret_appears_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It was written in place: a crash left a partial file and the next start failed. Now it is
    written to a file of its own and linked into place."""
    from nts.nts import cookies

    def crash(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(cookies.os, "link", crash)
        with pytest.raises(OSError):
            cookies.load_or_create_secret(tmp_path / "keys")
    assert list((tmp_path / "keys").iterdir()) == []  # no partial secret, no leftover
    secret, created = cookies.load_or_create_secret(tmp_path / "keys")
    assert created and [p.name for p in (tmp_path / "keys").iterdir()] == [cookies.MASTER_FILE]
    assert cookies.load_or_create_secret(tmp_path / "keys") == (secret, False)
