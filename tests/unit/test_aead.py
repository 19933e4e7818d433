"""The AEAD layer's two AES-SIV backends (Nettle through ctypes, `cryptography`) give the same bytes."""

from __future__ import annotations

import ctypes
import gc
import platform
import sys
import threading

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV, AESSIV
from hypothesis import given, settings
from hypothesis import strategies as st

from nts.nts import nettle
from nts.nts.aead import AEADS, AeadError, CryptographySiv, GcmSiv

needs_nettle = pytest.mark.skipif(not nettle.AVAILABLE, reason=f"Nettle not used here: {nettle.WHY}")


def _loadable() -> bool:
    try:
        ctypes.CDLL("libnettle.so.8")
    except OSError:
        return False
    return True


def test_nettle_is_used_where_it_is_installed() -> None:
    """The binding must not fall back silently where it should work (a bad prototype, say, would
    fail the cross-check at import and leave every server on the slower path)."""
    if sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64") and _loadable():
        assert nettle.AVAILABLE, nettle.WHY
        assert nettle.VERSION.startswith("Nettle 3.")
        assert isinstance(AEADS[15].cipher(bytes(32)), nettle.Siv)
        assert isinstance(AEADS[17].cipher(bytes(64)), nettle.Siv)
    assert isinstance(AEADS[16].cipher(bytes(48)), CryptographySiv)  # Nettle has no AES-192
    assert isinstance(AEADS[30].cipher(bytes(16)), GcmSiv)


@needs_nettle
@settings(max_examples=300, deadline=None)
@given(
    key_len=st.sampled_from([32, 64]),
    key=st.binary(min_size=64, max_size=64),
    nonce=st.binary(min_size=1, max_size=40),
    ad=st.binary(max_size=300),
    plaintext=st.binary(max_size=300),
    flip=st.integers(min_value=0),
)
def test_nettle_and_cryptography_agree(
    key_len: int, key: bytes, nonce: bytes, ad: bytes, plaintext: bytes, flip: int
) -> None:
    key = key[:key_len]
    ours, theirs = nettle.Siv(key), CryptographySiv(key)
    sealed = ours.seal(nonce, plaintext, ad)
    assert sealed == theirs.seal(nonce, plaintext, ad) == AESSIV(key).encrypt(plaintext, [ad, nonce])
    assert ours.open(nonce, sealed, ad) == theirs.open(nonce, sealed, ad) == plaintext
    i = flip % len(sealed)
    forged = sealed[:i] + bytes([sealed[i] ^ 1]) + sealed[i + 1 :]
    assert ours.open(nonce, forged, ad) is None and theirs.open(nonce, forged, ad) is None
    assert ours.open(nonce, sealed, ad + b"x") is None
    assert ours.open(nonce + b"x", sealed, ad) is None


@needs_nettle
@pytest.mark.parametrize("cls", [nettle.Siv, CryptographySiv])
def test_impossible_lengths_are_refused_not_passed_on(cls: type[nettle.Siv] | type[CryptographySiv]) -> None:
    siv = cls(bytes(32))
    sealed = siv.seal(b"n", b"", b"")
    assert len(sealed) == 16 and siv.open(b"n", sealed, b"") == b""
    assert siv.open(b"", sealed, b"") is None  # Nettle would assert on an empty nonce
    assert siv.open(b"n", sealed[:15], b"") is None
    with pytest.raises(ValueError):
        siv.seal(b"", b"x", b"")
    with pytest.raises(AeadError):
        AEADS[15].decrypt(siv, b"n", sealed[:15], b"")


@needs_nettle
def test_messages_longer_than_the_scratch_buffer() -> None:
    key, nonce, ad = bytes(range(32)), b"\x07" * 16, b"a" * 5000
    plaintext = bytes(range(256)) * 40  # 10,240 bytes
    sealed = nettle.Siv(key).seal(nonce, plaintext, ad)
    assert sealed == AESSIV(key).encrypt(plaintext, [ad, nonce])
    assert nettle.Siv(key).open(nonce, sealed, ad) == plaintext


@needs_nettle
def test_threads_sharing_one_key_get_their_own_results() -> None:
    """Listener threads and the event loop seal with the same cookie key at once: each result
    must be its own (output goes through a per-thread buffer)."""
    siv, reference = nettle.Siv(bytes(32)), AESSIV(bytes(32))
    wrong: list[int] = []
    start = threading.Barrier(4)

    def work(t: int) -> None:
        start.wait()
        for i in range(3000):
            plaintext = (t * 100_000 + i).to_bytes(8, "big") * (1 + t)
            sealed = siv.seal(b"nonce", plaintext, b"ad")
            if siv.open(b"nonce", sealed, b"ad") != plaintext or sealed != reference.encrypt(
                plaintext, [b"ad", b"nonce"]
            ):
                wrong.append(i)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    try:
        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not wrong


def test_gcm_siv_nonce_must_be_twelve_bytes() -> None:
    gcm = GcmSiv(bytes(16))
    sealed = gcm.seal(bytes(12), b"x", b"ad")
    assert sealed == AESGCMSIV(bytes(16)).encrypt(bytes(12), b"x", b"ad")
    assert gcm.open(bytes(12), sealed, b"ad") == b"x"
    assert gcm.open(bytes(16), sealed, b"ad") is None
    assert gcm.open(bytes(12), sealed[:15], b"ad") is None


@needs_nettle
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_refused_key_leaves_nothing_behind() -> None:
    with pytest.raises(ValueError, match="no Nettle AES-SIV-CMAC for 16-byte keys"):
        nettle.Siv(bytes(16))  # (its __del__ must not fail on the half-made object)
    gc.collect()


@needs_nettle
def test_the_keyed_context_is_wiped_when_the_cipher_goes() -> None:
    siv = nettle.Siv(bytes(range(32)))
    context = siv._ctx  # the buffer Nettle keeps the key schedule in
    assert any(context.raw)
    del siv
    assert not any(context.raw)


@needs_nettle
def test_sizes_past_the_limit_never_reach_nettle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sizes go to Nettle as C ints: past the limit (1 GiB; ~100 bytes here) nothing is called."""
    siv = nettle.Siv(bytes(32))
    sealed = siv.seal(b"n" * 16, b"p" * 40, b"a" * 40)  # out: 56 bytes, so 16 + 40 + 56 = 112 in all
    monkeypatch.setattr(nettle, "_LIMIT", 111)
    with pytest.raises(ValueError, match="at most 1 GiB"):
        siv.seal(b"n" * 16, b"p" * 40, b"a" * 40)
    monkeypatch.setattr(nettle, "_LIMIT", 95)  # opening it: 16 + 40 + 40 (out) = 96
    assert siv.open(b"n" * 16, sealed, b"a" * 40) is None
    monkeypatch.setattr(nettle, "_LIMIT", 96)
    assert siv.open(b"n" * 16, sealed, b"a" * 40) == b"p" * 40
