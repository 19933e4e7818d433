"""A chrony server's NTS cookie keys (the `ntskeys` file in its `ntsdumpdir`), read-only, sans-IO.

Strategy: a site that moves a server from chrony to ntsd points `nts.chrony_keys` at the file
chrony left, and ntsd opens the cookies chrony issued, so no client has to redo NTS-KE at the
switch (each reply already hands out ntsd's own cookies). The file is text: a format line
("NKS0" or "NKS1"), a line with the age of the newest key (NKS0: the AEAD first), then one line
per key: its id in hex, the key in hex and (NKS1) its AEAD. A chrony cookie is the key id (u32,
big-endian), a nonce (16 bytes for AES-SIV-CMAC-256, 12 for AES-128-GCM-SIV), then the AEAD's
output over C2S key | S2C key with empty associated data; the session's AEAD follows from the key
length (chrony does the same). `parse` raises ParseError on anything else; `open_cookie` returns
the contents in the key ring's format (AEAD id, zero, C2S, S2C) or None when it does not verify.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from ..wire.errors import ParseError
from .aead import AEADS, AeadId, Cipher

_ALGORITHMS = {int(AeadId.AES_SIV_CMAC_256): 16, int(AeadId.AES_128_GCM_SIV): 12}  # AEAD -> nonce length
_SESSION_AEAD = {16: int(AeadId.AES_128_GCM_SIV), 32: int(AeadId.AES_SIV_CMAC_256)}  # key length -> AEAD
_HEX = re.compile(r"[0-9A-Fa-f]+")
_HEAD = struct.Struct(">HH")
MAX_KEYS = 16  # chrony keeps 4


@dataclass(frozen=True, slots=True)
class ChronyKey:
    key_id: int
    aead: int
    key: bytes = b""

    def __repr__(self) -> str:  # (never the key itself)
        return f"ChronyKey(key_id={self.key_id:08X}, aead={self.aead})"


def parse(text: str) -> tuple[ChronyKey, ...]:
    lines = text.splitlines()
    if len(lines) < 3 or lines[0] not in ("NKS0", "NKS1"):
        raise ParseError("chrony_keys_format", "not a chrony ntskeys file (its first line is NKS0 or NKS1)")
    old = lines[0] == "NKS0"
    second = lines[1].split()
    if len(second) != (2 if old else 1):
        raise ParseError("chrony_keys_format", "the second line of a chrony ntskeys file is malformed")
    default_aead = _integer(second[0], "AEAD") if old else 0
    keys = []
    for number, line in enumerate(lines[2:], 3):
        words = line.split()
        if not words:
            continue
        if len(words) != (2 if old else 3) or not _HEX.fullmatch(words[0]) or len(words[0]) > 8:
            raise ParseError("chrony_keys_format", f"line {number}: expected a key id, a key and (NKS1) an AEAD")
        aead = default_aead if old else _integer(words[2], "AEAD")
        if aead not in _ALGORITHMS:
            raise ParseError("chrony_keys_aead", f"line {number}: AEAD {aead} (chrony seals cookies with 15 or 30)")
        if not _HEX.fullmatch(words[1]) or len(words[1]) != 2 * AEADS[aead].key_len:
            raise ParseError("chrony_keys_format", f"line {number}: the key is not {AEADS[aead].key_len} bytes of hex")
        keys.append(ChronyKey(int(words[0], 16), aead, bytes.fromhex(words[1])))
    if not keys or len(keys) > MAX_KEYS:
        raise ParseError("chrony_keys_format", f"a chrony ntskeys file holds 1 to {MAX_KEYS} keys, not {len(keys)}")
    return tuple(keys)


def _integer(word: str, what: str) -> int:
    if not word.isdigit() or len(word) > 6:
        raise ParseError("chrony_keys_format", f"{what} {word[:12]!r} is not a number")
    return int(word)


def key_ids(keys: tuple[ChronyKey, ...]) -> dict[bytes, tuple[Cipher, int]]:
    """The ciphers to open cookies with, by key id as cookies carry it: (cipher, nonce length)."""
    return {struct.pack(">I", k.key_id): (AEADS[k.aead].cipher(k.key), _ALGORITHMS[k.aead]) for k in keys}


def open_cookie(cipher: Cipher, nonce_len: int, cookie: bytes) -> bytes | None:
    """The contents of a chrony cookie (key id already matched), as the key ring's cookies hold them."""
    nonce, sealed = cookie[4 : 4 + nonce_len], cookie[4 + nonce_len :]
    if len(nonce) != nonce_len:
        return None
    keys = cipher.open(nonce, sealed, b"")
    return None if keys is None else contents_of(keys)


def contents_of(keys: bytes) -> bytes | None:
    """C2S | S2C as the key ring's cookies hold them (AEAD id, zero, the keys), the AEAD implied by
    the key length as chrony implies it: 16 bytes AES-128-GCM-SIV, 32 AES-SIV-CMAC-256; else None."""
    if len(keys) % 2 or len(keys) // 2 not in _SESSION_AEAD:
        return None
    return _HEAD.pack(_SESSION_AEAD[len(keys) // 2], 0) + keys
