"""The AEAD algorithms NTS uses (IANA AEAD registry), on `cryptography`'s implementations.

Strategy: one table maps the IANA id to key length, nonce rule and the two operations, so the
key exchange, cookies and the NTP authenticator all agree. AES-SIV takes the nonce as the last
associated-data component (RFC 5297 / RFC 8915 section 5.6) and puts the tag first; AES-GCM-SIV
takes exactly 12 bytes of nonce and puts the tag last. Both tags are 16 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV, AESSIV

TAG_LEN = 16
Cipher = AESSIV | AESGCMSIV


class AeadId(IntEnum):
    AES_SIV_CMAC_256 = 15  # RFC 5297; mandatory for NTS
    AES_SIV_CMAC_384 = 16
    AES_SIV_CMAC_512 = 17
    AES_128_GCM_SIV = 30  # RFC 8452
    AES_256_GCM_SIV = 31


class AeadError(Exception):
    """Authentication failed or the input cannot be decrypted."""


@dataclass(frozen=True, slots=True)
class Aead:
    id: int
    key_len: int
    nonce_len: int | None  # None: any length (SIV); else exactly this many bytes

    def cipher(self, key: bytes) -> Cipher:
        """The keyed cipher (its key schedule is most of the cost: reuse it where a key repeats)."""
        return AESSIV(key) if self.nonce_len is None else AESGCMSIV(key)

    def encrypt(self, key: bytes | Cipher, nonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
        c = self.cipher(key) if isinstance(key, bytes) else key
        if isinstance(c, AESSIV):
            return c.encrypt(plaintext, [ad, nonce])
        return c.encrypt(nonce, plaintext, ad)

    def decrypt(self, key: bytes | Cipher, nonce: bytes, ciphertext: bytes, ad: bytes) -> bytes:
        if len(ciphertext) < TAG_LEN or (self.nonce_len is not None and len(nonce) != self.nonce_len) or not nonce:
            raise AeadError("bad nonce or ciphertext length")
        c = self.cipher(key) if isinstance(key, bytes) else key
        try:
            if isinstance(c, AESSIV):
                return c.decrypt(ciphertext, [ad, nonce])
            return c.decrypt(nonce, ciphertext, ad)
        except InvalidTag:
            raise AeadError("authentication failed") from None


AEADS: dict[int, Aead] = {
    AeadId.AES_SIV_CMAC_256: Aead(15, 32, None),
    AeadId.AES_SIV_CMAC_384: Aead(16, 48, None),
    AeadId.AES_SIV_CMAC_512: Aead(17, 64, None),
    AeadId.AES_128_GCM_SIV: Aead(30, 16, 12),
    AeadId.AES_256_GCM_SIV: Aead(31, 32, 12),
}
DEFAULT_AEADS = (15, 17, 30, 31, 16)
