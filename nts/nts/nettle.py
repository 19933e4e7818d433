"""AES-SIV-CMAC through the system's Nettle library (ctypes), where it is installed.

Strategy: OpenSSL's AES-SIV, which `cryptography` wraps, duplicates, allocates and wipes several
contexts on every message (~16k instructions for a 100-byte message, measured with callgrind),
which made the four SIV operations of an NTS request nearly half its cost. Nettle, the library
chrony uses for the same job, keeps a keyed context that a message only reads, so one call does
the whole message in ~2k instructions. Three of its functions per key size are bound with ctypes
(no compiled code of ours): `set_key` once per key into a buffer this module owns, then one
`encrypt_message` or `decrypt_message` call per message, with the associated data and the nonce
as Nettle takes them (exactly two S2V components, RFC 5297 section 3: AD, then nonce).

Used only where libnettle.so.8 (Nettle 3.6 or later: the release that added SIV-CMAC) loads on
64-bit Linux on x86-64 or aarch64 and agrees with `cryptography` on a cross-check at import;
otherwise `AVAILABLE` is False, `WHY` says why, and the AEAD table keeps `cryptography`.
Arguments go without ctypes prototypes (a prototype's conversions cost as much as Nettle's own
work): pointers as bytes or c_void_p, sizes as Python ints, which ctypes passes as C ints and
libffi widens to the full register on those two architectures. Every size is checked here first:
Nettle asserts on an empty nonce and writes exactly the number of bytes it is told, and a size
past 2**31 would not survive the conversion, so all of a message stays under 1 GiB. Output goes to
a per-thread scratch buffer (the listener threads and the event loop thread may seal at once).
"""

from __future__ import annotations

import ctypes
import platform
import sys
import threading
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESSIV

TAG_LEN = 16
_CTX_SIZE = 1024  # struct siv_cmac_aes256_ctx is 32 + 2 * 240 = 512 bytes; twice that, for slack
_SCRATCH = 8192  # per-thread output buffer; longer messages get a buffer of their own
_LIMIT = 2**30  # nonce + AD + message: the sizes go to Nettle as C ints (ctypes would truncate past 2**31)


class _Scratch(threading.local):
    def __init__(self) -> None:
        self.buf = ctypes.create_string_buffer(_SCRATCH)


_scratch = _Scratch()
_FUNCS: dict[int, tuple[Any, Any, Any]] = {}  # key length -> (set_key, encrypt_message, decrypt_message)


class Siv:
    """AES-SIV-CMAC keyed once (32-byte key: AES-SIV-CMAC-256, 64: AES-SIV-CMAC-512); the same
    object may be used from several threads at once (Nettle only reads the keyed context)."""

    __slots__ = ("_ctx", "_decrypt", "_encrypt")

    def __init__(self, key: bytes) -> None:
        funcs = _FUNCS.get(len(key))
        if funcs is None:
            raise ValueError(f"no Nettle AES-SIV-CMAC for {len(key)}-byte keys ({WHY or 'only 32 and 64'})")
        set_key, self._encrypt, self._decrypt = funcs
        self._ctx = ctypes.create_string_buffer(_CTX_SIZE)
        set_key(self._ctx, key)

    def __del__(self) -> None:
        ctx = getattr(self, "_ctx", None)  # None when __init__ refused the key
        if ctx is not None:
            ctypes.memset(ctx, 0, _CTX_SIZE)  # the key schedule does not outlive the key's use

    def seal(self, nonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
        """Tag then ciphertext, as RFC 5297 and `cryptography` lay them out."""
        n, nonce_len, ad_len = len(plaintext) + TAG_LEN, len(nonce), len(ad)
        if not nonce_len or n + nonce_len + ad_len > _LIMIT:
            raise ValueError("AES-SIV here needs a nonce, and at most 1 GiB in all")
        buf = _scratch.buf if n <= _SCRATCH else ctypes.create_string_buffer(n)
        self._encrypt(self._ctx, nonce_len, nonce, ad_len, ad, n, buf, plaintext)
        return buf[:n]  # type: ignore[return-value]  # (a char array slice is bytes)

    def open(self, nonce: bytes, ciphertext: bytes, ad: bytes) -> bytes | None:
        """The plaintext, or None if the message is not authentic (or too short to be)."""
        n, nonce_len, ad_len = len(ciphertext) - TAG_LEN, len(nonce), len(ad)
        if n < 0 or not nonce_len or n + nonce_len + ad_len > _LIMIT:
            return None
        buf = _scratch.buf if n <= _SCRATCH else ctypes.create_string_buffer(n)
        if not self._decrypt(self._ctx, nonce_len, nonce, ad_len, ad, n, buf, ciphertext):
            return None  # what Nettle wrote to buf is discarded
        return buf[:n]  # type: ignore[return-value]  # (a char array slice is bytes)


def _load() -> str:
    """Bind Nettle's SIV-CMAC functions and check them against `cryptography`: the version bound
    ("Nettle 3.8") on success; else raises _Unusable saying why not."""
    if sys.platform != "linux" or sys.maxsize <= 2**32 or platform.machine() not in ("x86_64", "aarch64"):
        raise _Unusable("only bound on 64-bit Linux on x86-64 or aarch64")
    try:
        lib = ctypes.PyDLL("libnettle.so.8")  # the GIL stays held: the calls are short
        major, minor = lib.nettle_version_major(), lib.nettle_version_minor()
        if (major, minor) < (3, 6):
            raise _Unusable(f"Nettle {major}.{minor} has no SIV-CMAC (3.6 or later needed)")
        for key_len, bits in ((32, 128), (64, 256)):
            names = ("set_key", "encrypt_message", "decrypt_message")
            funcs = tuple(getattr(lib, f"nettle_siv_cmac_aes{bits}_{name}") for name in names)
            funcs[0].restype = funcs[1].restype = None
            funcs[2].restype = ctypes.c_int
            _FUNCS[key_len] = funcs
    except (OSError, AttributeError) as exc:
        _FUNCS.clear()
        raise _Unusable(f"libnettle.so.8 not usable: {exc}") from None
    for key_len in (32, 64):  # agree with cryptography, both ways, and refuse a forgery
        key, nonce, ad, plaintext = bytes(range(key_len)), b"\x01" * 16, b"ad" * 30, b"plaintext" * 5
        expected = AESSIV(key).encrypt(plaintext, [ad, nonce])
        siv = Siv(key)
        forged = bytes([expected[0] ^ 1]) + expected[1:]
        agrees = siv.seal(nonce, plaintext, ad) == expected and siv.open(nonce, expected, ad) == plaintext
        if not agrees or siv.open(nonce, forged, ad) is not None:
            _FUNCS.clear()
            raise _Unusable("libnettle.so.8 disagrees with cryptography's AES-SIV")
    return f"Nettle {major}.{minor}"


class _Unusable(Exception):
    pass


WHY = ""  # why Nettle is not used ("" when it is)
try:
    VERSION = _load()
except _Unusable as exc:
    VERSION, WHY = "", str(exc)
AVAILABLE = not WHY
