"""The AEAD algorithms NTS uses (IANA AEAD registry), keyed once and used per message.

Strategy: one table maps the IANA id to key length and nonce rule, so the key exchange, cookies
and the NTP authenticator all agree, and `Aead.cipher(key)` gives a keyed object with one shape
for every algorithm: `seal(nonce, plaintext, ad)` and `open(nonce, ciphertext, ad)` (None when not
authentic). AES-SIV takes the associated data and then the nonce as its two S2V components (RFC
5297 / RFC 8915 section 5.6) and puts the tag first; AES-GCM-SIV takes exactly 12 bytes of nonce
and puts the tag last. Both tags are 16 bytes. AES-SIV-CMAC-256 and -512 are Nettle's where it is
installed (nettle.py: a quarter of the cost per message), `cryptography`'s otherwise; the rest are
always `cryptography`'s. Both give the same bytes (checked at import and by the tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV, AESSIV

from . import nettle

TAG_LEN = 16


class AeadId(IntEnum):
    AES_SIV_CMAC_256 = 15  # RFC 5297; mandatory for NTS
    AES_SIV_CMAC_384 = 16
    AES_SIV_CMAC_512 = 17
    AES_128_GCM_SIV = 30  # RFC 8452
    AES_256_GCM_SIV = 31


class AeadError(Exception):
    """Authentication failed or the input cannot be decrypted."""


class CryptographySiv:
    """AES-SIV-CMAC on `cryptography` (OpenSSL)."""

    __slots__ = ("_c",)

    def __init__(self, key: bytes) -> None:
        self._c = AESSIV(key)

    def seal(self, nonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
        if not nonce:
            raise ValueError("AES-SIV needs a nonce here")
        return self._c.encrypt(plaintext, [ad, nonce])

    def open(self, nonce: bytes, ciphertext: bytes, ad: bytes) -> bytes | None:
        if len(ciphertext) < TAG_LEN or not nonce:
            return None
        try:
            return self._c.decrypt(ciphertext, [ad, nonce])
        except InvalidTag:
            return None


class GcmSiv:
    """AES-GCM-SIV on `cryptography` (OpenSSL); the nonce is exactly 12 bytes."""

    __slots__ = ("_c",)

    def __init__(self, key: bytes) -> None:
        self._c = AESGCMSIV(key)

    def seal(self, nonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
        return self._c.encrypt(nonce, plaintext, ad)

    def open(self, nonce: bytes, ciphertext: bytes, ad: bytes) -> bytes | None:
        if len(ciphertext) < TAG_LEN or len(nonce) != 12:
            return None
        try:
            return self._c.decrypt(nonce, ciphertext, ad)
        except InvalidTag:
            return None


Cipher = nettle.Siv | CryptographySiv | GcmSiv


@dataclass(frozen=True, slots=True)
class Aead:
    id: int
    key_len: int
    nonce_len: int | None  # None: any length (SIV); else exactly this many bytes

    def cipher(self, key: bytes) -> Cipher:
        """The keyed cipher (setting a key costs more than a message: reuse it where a key repeats)."""
        if self.nonce_len is not None:
            return GcmSiv(key)
        if nettle.AVAILABLE and self.key_len in (32, 64):
            return nettle.Siv(key)
        return CryptographySiv(key)

    def encrypt(self, key: bytes | Cipher, nonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
        return (self.cipher(key) if isinstance(key, bytes) else key).seal(nonce, plaintext, ad)

    def decrypt(self, key: bytes | Cipher, nonce: bytes, ciphertext: bytes, ad: bytes) -> bytes:
        plaintext = (self.cipher(key) if isinstance(key, bytes) else key).open(nonce, ciphertext, ad)
        if plaintext is None:
            raise AeadError("authentication failed (or a nonce or ciphertext of impossible length)")
        return plaintext


AEADS: dict[int, Aead] = {
    AeadId.AES_SIV_CMAC_256: Aead(AeadId.AES_SIV_CMAC_256, 32, None),
    AeadId.AES_SIV_CMAC_384: Aead(AeadId.AES_SIV_CMAC_384, 48, None),
    AeadId.AES_SIV_CMAC_512: Aead(AeadId.AES_SIV_CMAC_512, 64, None),
    AeadId.AES_128_GCM_SIV: Aead(AeadId.AES_128_GCM_SIV, 16, 12),
    AeadId.AES_256_GCM_SIV: Aead(AeadId.AES_256_GCM_SIV, 32, 12),
}
DEFAULT_AEADS: tuple[int, ...] = tuple(
    int(a) for a in (AeadId.AES_SIV_CMAC_256, AeadId.AES_SIV_CMAC_512, AeadId.AES_128_GCM_SIV, AeadId.AES_256_GCM_SIV,
                     AeadId.AES_SIV_CMAC_384)
)  # fmt: skip
# The names operators write (config `nts.aeads`, `ntsd query --aead`), as the IANA registry spells them.
AEAD_NAMES: dict[str, int] = {member.name.replace("_", "-"): int(member) for member in AeadId}
