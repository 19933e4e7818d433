"""chrony's ntskeys file and cookies: the two file formats, what is refused, cookies chrony's way
opened by the key ring, and the compact cookies that replace them without a longer reply."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nts.nts import chrony_keys
from nts.nts.aead import AEADS, AeadId
from nts.nts.cookies import CookieError, CookieKeys, KeyRing
from nts.wire.errors import ParseError

KEY15 = bytes(range(32))
KEY30 = bytes(range(100, 116))
NKS1 = (
    "NKS1\n12.5\n"
    f"4A3B2C11 {KEY15.hex().upper()} 15\n4A3B2C12 {KEY15[::-1].hex()} 15\n"
    f"4A3B2C13 {KEY30.hex()} 30\n4A3B2C10 {bytes(32).hex()} 15\n"
)
NKS0 = f"NKS0\n15 3600.0\n0000000D {KEY15.hex()}\n0000000E {KEY15[::-1].hex()}\n"


def test_both_file_formats() -> None:
    keys = chrony_keys.parse(NKS1)
    assert [(k.key_id, k.aead, k.key) for k in keys][:3] == [
        (0x4A3B2C11, 15, KEY15), (0x4A3B2C12, 15, KEY15[::-1]), (0x4A3B2C13, 30, KEY30)]  # fmt: skip
    old = chrony_keys.parse(NKS0)  # chrony 4.3 and before: the AEAD on the second line
    assert [(k.key_id, k.aead) for k in old] == [(13, 15), (14, 15)]
    assert KEY15.hex() not in repr(keys) and "4A3B2C11" in repr(keys)  # (a key is never shown)


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("", "chrony_keys_format"),
        ("NKS2\n1.0\n0000000D " + KEY15.hex() + " 15\n", "chrony_keys_format"),
        ("NKS1\n1.0 2\n0000000D " + KEY15.hex() + " 15\n", "chrony_keys_format"),
        ("NKS1\n1.0\n0000000D " + KEY15.hex() + " 17\n", "chrony_keys_aead"),  # not a cookie AEAD of chrony's
        ("NKS1\n1.0\n0000000D " + KEY15.hex()[:-2] + " 15\n", "chrony_keys_format"),  # a byte short
        ("NKS1\n1.0\n0000000D " + KEY30.hex() + " 15\n", "chrony_keys_format"),  # the wrong length for 15
        ("NKS1\n1.0\n10000000D " + KEY15.hex() + " 15\n", "chrony_keys_format"),  # id over 32 bits
        ("NKS1\n1.0\nZZ " + KEY15.hex() + " 15\n", "chrony_keys_format"),
        ("NKS0\nx 1.0\n0000000D " + KEY15.hex() + "\n", "chrony_keys_format"),
        ("NKS1\n1.0\n", "chrony_keys_format"),  # no key
    ],
)
def test_bad_files_are_refused_with_a_reason(text: str, code: str) -> None:
    with pytest.raises(ParseError) as refused:
        chrony_keys.parse(text)
    assert refused.value.code == code


@given(st.text(max_size=300))
def test_any_text_parses_or_raises_the_parse_error(text: str) -> None:
    try:
        chrony_keys.parse(text)
    except ParseError:
        pass


def chrony_cookie(key_id: int, aead: int, key: bytes, c2s: bytes, s2c: bytes) -> bytes:
    """A cookie as chrony's server seals it: key id | nonce | AEAD(C2S | S2C), no associated data."""
    nonce = os.urandom(16 if aead == AeadId.AES_SIV_CMAC_256 else 12)
    return struct.pack(">I", key_id) + nonce + AEADS[aead].encrypt(key, nonce, c2s + s2c, b"")


def test_the_key_ring_opens_chrony_cookies_with_its_keys() -> None:
    ring = KeyRing(os.urandom(32))
    ring.foreign = chrony_keys.key_ids(chrony_keys.parse(NKS1))
    c2s, s2c = os.urandom(32), os.urandom(32)
    cookie = chrony_cookie(0x4A3B2C11, 15, KEY15, c2s, s2c)
    assert len(cookie) == 100
    assert ring.open(cookie, 1e9) == CookieKeys(15, c2s, s2c)
    short = chrony_cookie(0x4A3B2C13, 30, KEY30, c2s[:16], s2c[:16])  # a GCM-SIV session, GCM-SIV key
    assert len(short) == 64 and ring.open(short, 1e9) == CookieKeys(30, c2s[:16], s2c[:16])
    with pytest.raises(CookieError, match="cookie_forged"):  # sealed with another key of the file
        ring.open(chrony_cookie(0x4A3B2C12, 15, KEY15, c2s, s2c), 1e9)
    with pytest.raises(CookieError, match="cookie_key_unknown"):
        ring.open(chrony_cookie(0x4A3B2C14, 15, KEY15, c2s, s2c), 1e9)
    ring.foreign = {}  # (nts.chrony_keys removed and reloaded)
    with pytest.raises(CookieError, match="cookie_key_unknown"):
        ring.open(cookie, 1e9)


@pytest.mark.parametrize(("aead", "key_len", "chrony_len", "compact_len"), [(15, 32, 100, 96), (30, 16, 64, 64)])
def test_cookies_that_replace_shorter_ones_are_compact_and_open(
    aead: int, key_len: int, chrony_len: int, compact_len: int
) -> None:
    ring = KeyRing(os.urandom(32))
    keys = struct.pack(">HH", aead, 0) + os.urandom(2 * key_len)
    nonces = os.urandom(16 * 3)
    normal = ring.seal_fields(keys, 1e9, 1, nonces, fit=len(keys) + 36)  # replacing one of ours: as always
    assert len(normal) == 4 + len(keys) + 36
    fields = ring.seal_fields(keys, 1e9, 3, nonces, fit=chrony_len)  # replacing chrony's: no longer than it
    size = 4 + compact_len
    assert len(fields) == 3 * size
    for i in range(3):
        field = fields[i * size : (i + 1) * size]
        assert struct.unpack(">HH", field[:4]) == (0x0204, size)
        assert ring.open_contents(field[4:], 1e9) == keys
    wider = struct.pack(">HH", int(AeadId.AES_SIV_CMAC_512), 0) + os.urandom(128)  # no compact form: as always
    assert len(ring.seal_fields(wider, 1e9, 1, nonces, fit=100)) == 4 + len(wider) + 36
