"""NTS-protected NTP (RFC 8915 section 5): the `nts` authenticator plugin's packet logic.

Strategy: a request carries a Unique Identifier, exactly one cookie, optional placeholders and, as
its last field, the NTS Authenticator. The cookie yields the session keys; the authenticator is
verified with the C2S key over everything before it. The reply echoes the UID and carries, inside
a field sealed with the S2C key, one fresh cookie per cookie and placeholder (at most 8), padded
so the reply is exactly as long as the request. Fresh cookies are sealed before the header is
built, so the transmit timestamp is taken after the expensive part. A cookie that cannot be
opened or an authenticator that does not verify gets an NTS NAK (KoD NTSN, UID only).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from .aead import AEADS, TAG_LEN, Aead, AeadError, Cipher
from .cookies import CookieError, KeyRing
from .core.auth import ReplyContext, Request
from .core.decisions import Drop, Nak, drop
from .wire.errors import ParseError
from .wire.extensions import ExtensionField, FieldType, parse_extension, serialize_extension
from .wire.packet import HEADER_LEN, KISS_NTSN

MAX_COOKIES = 8
MIN_UID = 32
MIN_UNPADDED_NONCE = 16  # RFC 8915 section 5.6
SERVER_NONCE_LEN = 16
_AUTH_HEAD = struct.Struct(">HH")
_COOKIE_HEAD = struct.Struct(">HH")

_D_MALFORMED = drop("nts_malformed")
_D_PLACEHOLDER = drop("nts_placeholder_length")


def _pad4(n: int) -> int:
    return n + (-n % 4)


@dataclass(frozen=True, slots=True)
class _Parsed:
    uid: ExtensionField
    cookie: bytes
    placeholders: int
    auth_start: int
    auth_body: bytes


def _parse(request: Request) -> _Parsed | Drop:
    uid: ExtensionField | None = None
    cookie: bytes | None = None
    placeholders = 0
    size: int | None = None
    pos = HEADER_LEN
    fields = request.extensions
    for i, field in enumerate(fields):
        start = pos
        pos += 4 + len(field.value)
        if field.type == FieldType.UNIQUE_IDENTIFIER:
            if uid is not None or len(field.value) < MIN_UID:
                return _D_MALFORMED
            uid = field
        elif field.type in (FieldType.NTS_COOKIE, FieldType.NTS_COOKIE_PLACEHOLDER):
            if size is not None and size != len(field.value):
                return _D_PLACEHOLDER
            size = len(field.value)
            if field.type == FieldType.NTS_COOKIE:
                if cookie is not None:
                    return _D_MALFORMED
                cookie = field.value
            else:
                placeholders += 1
        elif field.type == FieldType.NTS_AUTHENTICATOR:
            if i != len(fields) - 1 or uid is None or cookie is None or request.trailer:
                return _D_MALFORMED
            return _Parsed(uid, cookie, placeholders, start, field.value)
    return _D_MALFORMED


def _open_auth(body: bytes) -> tuple[bytes, bytes] | None:
    """(nonce, ciphertext) from an authenticator field body, or None if its lengths are wrong."""
    if len(body) < 4:
        return None
    nonce_len, ct_len = _AUTH_HEAD.unpack_from(body)
    if nonce_len < 1 or ct_len < TAG_LEN or 4 + _pad4(nonce_len) + _pad4(ct_len) > len(body):
        return None
    nonce = body[4 : 4 + nonce_len]
    start = 4 + _pad4(nonce_len)
    return nonce, body[start : start + ct_len]


def auth_field(aead: Aead, key: bytes | Cipher, nonce: bytes, plaintext: bytes, ad: bytes, min_length: int) -> bytes:
    """A serialized NTS Authenticator field, at least `min_length` bytes long (padded)."""
    if aead.nonce_len is not None:
        nonce = nonce[: aead.nonce_len]
    ciphertext = aead.encrypt(key, nonce, plaintext, ad)
    body = _AUTH_HEAD.pack(len(nonce), len(ciphertext)) + nonce + bytes(-len(nonce) % 4)
    body += ciphertext + bytes(-len(ciphertext) % 4)
    minimum_nonce_area = min(MIN_UNPADDED_NONCE, aead.nonce_len or MIN_UNPADDED_NONCE)
    floor = 4 + minimum_nonce_area + _pad4(len(ciphertext))  # section 5.6 padding rule
    length = max(4 + len(body), 4 + floor, min_length)
    length += -length % 4
    return struct.pack(">HH", FieldType.NTS_AUTHENTICATOR, length) + body + bytes(length - 4 - len(body))


CIPHER_CACHE = 8192  # keyed session ciphers kept (a client's cookies all carry the same keys)


class NtsPacketAuth:
    """The packet side of NTS: verify a request and build its reply (used by the plugin).

    Keyed ciphers for session keys are cached (bounded, cleared when full): every cookie a client
    holds carries the same C2S/S2C keys, and setting up an AES-SIV key costs more than using it.
    """

    def __init__(self, keyring: KeyRing, supported: tuple[int, ...], wall_clock: Callable[[], float]) -> None:
        self.keyring = keyring
        self.supported = supported
        self.wall_clock = wall_clock
        self._ciphers: dict[bytes, Cipher] = {}

    def _cipher(self, aead: Aead, key: bytes) -> Cipher:
        c = self._ciphers.get(key)
        if c is None:
            if len(self._ciphers) >= CIPHER_CACHE:
                self._ciphers.clear()
            c = self._ciphers[key] = aead.cipher(key)
        return c

    def respond(self, request: Request, ctx: ReplyContext) -> bytes | Nak | Drop:
        parsed = _parse(request)
        if isinstance(parsed, Drop):
            return parsed
        data = request.data
        now = self.wall_clock()
        try:
            keys = self.keyring.open(parsed.cookie, now)
        except CookieError as exc:
            return self._nak(request, ctx, parsed.uid, exc.reason)
        aead = AEADS.get(keys.aead)
        if aead is None or keys.aead not in self.supported:  # disabled since: make the client redo NTS-KE
            return self._nak(request, ctx, parsed.uid, "aead_disabled")
        opened = _open_auth(parsed.auth_body)
        if opened is None:
            return _D_MALFORMED
        nonce, ciphertext = opened
        try:
            plaintext = aead.decrypt(self._cipher(aead, keys.c2s), nonce, ciphertext, data[: parsed.auth_start])
        except AeadError:
            return self._nak(request, ctx, parsed.uid, "authenticator_invalid")
        wanted = 1 + parsed.placeholders
        pos = 0
        try:
            while pos < len(plaintext):
                inner, pos = parse_extension(plaintext, pos)
                if inner.type == FieldType.NTS_COOKIE_PLACEHOLDER:
                    if len(inner.value) != len(parsed.cookie):
                        return _D_PLACEHOLDER
                    wanted += 1
        except ParseError:
            return _D_MALFORMED
        count = min(wanted, MAX_COOKIES)
        randomness = os.urandom(SERVER_NONCE_LEN + 16 * count)  # one draw for all nonces (CSPRNG)
        cookies = b"".join(
            _COOKIE_HEAD.pack(FieldType.NTS_COOKIE, 4 + len(c)) + c  # cookies are multiples of 4 bytes
            for c in self.keyring.seal_many(keys, now, count, randomness[SERVER_NONCE_LEN:])
        )
        head = ctx.reply_header(data, request.rx_ns) + serialize_extension(parsed.uid)
        s2c = self._cipher(aead, keys.s2c)
        return head + auth_field(aead, s2c, randomness[:SERVER_NONCE_LEN], cookies, head, len(data) - len(head))

    @staticmethod
    def _nak(request: Request, ctx: ReplyContext, uid: ExtensionField, reason: str) -> Nak:
        return Nak(ctx.kiss(request.data, KISS_NTSN, request.rx_ns) + serialize_extension(uid), reason)
