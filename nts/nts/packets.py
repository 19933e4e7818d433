"""NTS-protected NTP (RFC 8915 section 5): the `nts` plugin's packet logic.

Strategy: a request carries a Unique Identifier, exactly one cookie, optional placeholders and, as
its last field, the NTS Authenticator. The cookie yields the session keys; the authenticator is
verified with the C2S key over everything before it. The reply echoes the UID and carries, inside
a field sealed with the S2C key, one fresh cookie per cookie and placeholder (at most 8), padded
so the reply is exactly as long as the request. One walk over the raw fields finds them (no field
objects: this is the hot path, shared by the pipeline's fast path and `respond`). Fresh cookies
are sealed and the reply's authenticator laid out before the answer is returned as a Seal, whose
finish reads the transmit timestamp and seals the reply, so the timestamp comes after the
expensive part. A cookie that cannot be opened or an authenticator that does not verify gets an
NTS NAK (KoD NTSN, UID only).
"""

from __future__ import annotations

import os
import struct
from collections import deque
from collections.abc import Callable
from functools import partial

from ..core.decisions import Drop, Nak, Seal, drop
from ..core.handler import ReplyContext, Request
from ..wire.errors import ParseError
from ..wire.extensions import MIN_FIELD_LEN, FieldType, iter_extensions
from ..wire.packet import HEADER_LEN, KISS_NTSN, MAX_MAC_LEN
from .aead import AEADS, TAG_LEN, Aead, Cipher
from .cookies import CookieError, KeyRing

MAX_COOKIES = 8
MIN_UID = 32
MIN_UNPADDED_NONCE = 16  # RFC 8915 section 5.6
SERVER_NONCE_LEN = 16
_U16_PAIR = struct.Struct(">HH")  # a field's type and length; an authenticator's nonce and ciphertext lengths
_AUTH_FIELD = struct.Struct(">HHHH")
_UID = FieldType.UNIQUE_IDENTIFIER.value
_COOKIE = FieldType.NTS_COOKIE.value
_PLACEHOLDER = FieldType.NTS_COOKIE_PLACEHOLDER.value
_AUTHENTICATOR = FieldType.NTS_AUTHENTICATOR.value

# Randomness for the usual reply (one cookie): 16 bytes of cookie nonce + 16 of reply nonce, drawn
# from the OS CSPRNG 128 replies at a time (one getrandom call instead of one per reply). Each draw
# is handed out once (deque.popleft is atomic across threads); a forked worker starts empty, so
# no two processes share a draw. Nonces are public once sent; drawing them early reveals nothing.
_DRAW = SERVER_NONCE_LEN + 16
_DRAWS: deque[bytes] = deque()
if hasattr(os, "register_at_fork"):  # POSIX; elsewhere there is no fork
    os.register_at_fork(after_in_child=_DRAWS.clear)


def _draw() -> bytes:
    try:
        return _DRAWS.popleft()
    except IndexError:
        block = os.urandom(_DRAW * 128)
        _DRAWS.extend([block[i : i + _DRAW] for i in range(_DRAW, len(block), _DRAW)])
        return block[:_DRAW]


_D_MALFORMED = drop("nts_malformed")
_D_PLACEHOLDER = drop("nts_placeholder_length")


def open_auth(data: bytes, start: int, end: int) -> tuple[bytes, bytes] | None:
    """(nonce, ciphertext) from the authenticator field body at data[start:end] (read in place, no
    slice of the body: the NTS hot path uses it too), or None if its lengths are wrong."""
    if end - start < 4:
        return None
    nonce_len, ct_len = _U16_PAIR.unpack_from(data, start)
    ct_at = start + 4 + ((nonce_len + 3) & -4)  # each padded to a multiple of 4
    if nonce_len < 1 or ct_len < TAG_LEN or ct_at + ((ct_len + 3) & -4) > end:
        return None
    return data[start + 4 : start + 4 + nonce_len], data[ct_at : ct_at + ct_len]


def auth_field(aead: Aead, key: bytes | Cipher, nonce: bytes, plaintext: bytes, ad: bytes, min_length: int) -> bytes:
    """A serialized NTS Authenticator field, at least `min_length` bytes long (padded)."""
    if aead.nonce_len is not None:
        nonce = nonce[: aead.nonce_len]
    before, after = auth_frame(aead, nonce, len(plaintext) + TAG_LEN, min_length)
    return before + aead.encrypt(key, nonce, plaintext, ad) + after


def auth_frame(aead: Aead, nonce: bytes, ct_len: int, min_length: int) -> tuple[bytes, bytes]:
    """What surrounds a `ct_len`-byte ciphertext in an Authenticator field of at least `min_length`
    bytes: (field and body headers, nonce and its padding; the padding after the ciphertext). Known
    before the ciphertext is, so a reply's field is laid out before its transmit time is read."""
    n = len(nonce)
    padded = ct_len + (-ct_len % 4)
    used = 8 + n + (-n % 4) + padded  # field and body headers, nonce and ciphertext, each padded to 4
    floor = 8 + min(MIN_UNPADDED_NONCE, aead.nonce_len or MIN_UNPADDED_NONCE) + padded  # section 5.6 rule
    length = max(used, floor, min_length)
    length += -length % 4
    return _AUTH_FIELD.pack(_AUTHENTICATOR, length, n, ct_len) + nonce + bytes(-n % 4), bytes(
        length - used + padded - ct_len
    )


CIPHER_CACHE = 8192  # sessions whose keyed ciphers are kept (a client's cookies all carry the same keys)
FRAME_CACHE = 1024  # authenticator layouts kept (one per AEAD, reply and request size seen)


def _finish(
    ctx: ReplyContext,
    data: bytes,
    rx_ns: int,
    uid: bytes,
    before: bytes,
    s2c: Cipher,
    nonce: bytes,
    cookies: bytes,
    after: bytes,
) -> bytes:
    """A verified request's reply, at send time: the transmit timestamp, then the seal over it."""
    head = ctx.reply_header(data, rx_ns) + uid
    return head + before + s2c.seal(nonce, cookies, head) + after


class NtsPackets:
    """The packet side of NTS: verify a request and build its reply (used by the plugin).

    Keyed ciphers are cached per session (bounded, cleared when full): every cookie a client holds
    carries the same C2S/S2C keys, and setting up an AES-SIV key costs more than using it. The
    reply authenticator's layout depends only on the AEAD and the sizes, and is cached too.
    """

    def __init__(self, keyring: KeyRing, supported: tuple[int, ...], wall_clock: Callable[[], float]) -> None:
        self.keyring = keyring
        self.supported = supported
        self.wall_clock = wall_clock
        self._sessions: dict[bytes, tuple[Aead, Cipher, Cipher]] = {}  # cookie contents -> AEAD, C2S, S2C
        self._frames: dict[tuple[int, int, int], tuple[bytes, bytes, bytes]] = {}  # -> head, nonce padding, tail

    def _session(self, contents: bytes) -> tuple[Aead, Cipher, Cipher]:
        """The AEAD and keyed C2S and S2C ciphers of an opened cookie's contents (checked by the key
        ring), made and cached when `_sessions` does not have them yet."""
        if len(self._sessions) >= CIPHER_CACHE:
            self._sessions.clear()
        aead = AEADS[contents[0] << 8 | contents[1]]
        split = 4 + aead.key_len
        session = self._sessions[contents] = (aead, aead.cipher(contents[4:split]), aead.cipher(contents[split:]))
        return session

    def _frame(self, aead: Aead, nonce_len: int, ct_len: int, min_length: int) -> tuple[bytes, bytes, bytes]:
        """`auth_frame` split around the nonce (head, nonce padding, tail), cached by AEAD and sizes:
        the server's nonce length is fixed per AEAD, so only the nonce's bytes change."""
        if len(self._frames) >= FRAME_CACHE:
            self._frames.clear()
        before, after = auth_frame(aead, bytes(nonce_len), ct_len, min_length)
        frame = self._frames[(aead.id, ct_len, min_length)] = (before[:8], before[8 + nonce_len :], after)
        return frame

    def respond(self, request: Request, ctx: ReplyContext) -> Nak | Drop | Seal:
        """The general path: a request the pipeline has split and given to this plugin."""
        answer = self.answer(request.data, request.rx_ns, ctx, general=True)
        assert answer is not None
        return answer

    def answer(self, data: bytes, rx_ns: int, ctx: ReplyContext, general: bool = False) -> Nak | Drop | Seal | None:
        """Verify an NTPv4 request from its raw bytes and build the reply: one walk over the fields,
        no field objects (this is the NTS hot path, for the pipeline's fast path and for `respond`).
        On the fast path (`general` false) it answers None unless the fields are well formed and end
        with the authenticator, so anything else is split and judged by the general path."""
        end = len(data)
        pos = HEADER_LEN
        uid_at = uid_end = cookie_at = -1
        size = placeholders = flen = 0
        problem: Drop | None = None  # the first one found; reported only once the layout is known good
        unpack = _U16_PAIR.unpack_from
        while end - pos > MAX_MAC_LEN:  # as split_body: what is left at the end may be a MAC
            ftype, flen = unpack(data, pos)
            if flen < MIN_FIELD_LEN or flen & 3 or pos + flen > end:
                return _D_MALFORMED if general else None
            if ftype == _AUTHENTICATOR:
                break
            if problem is not None:
                pass
            elif ftype == _UID:
                if uid_at >= 0 or flen - 4 < MIN_UID:
                    problem = _D_MALFORMED
                uid_at, uid_end = pos, pos + flen
            elif ftype == _COOKIE or ftype == _PLACEHOLDER:
                if size and size != flen:
                    problem = _D_PLACEHOLDER
                size = flen
                if ftype == _COOKIE:
                    if cookie_at >= 0:
                        problem = _D_MALFORMED
                    cookie_at = pos
                else:
                    placeholders += 1
            pos += flen
        else:  # no authenticator among the fields
            return (problem or _D_MALFORMED) if general else None
        if pos + flen != end:  # fields or a trailer after the authenticator
            return (problem or _D_MALFORMED) if general else None
        if problem is not None:
            return problem
        if uid_at < 0 or cookie_at < 0:
            return _D_MALFORMED
        now = self.wall_clock()
        try:
            contents = self.keyring.open_contents(data[cookie_at + 4 : cookie_at + size], now)
        except CookieError as exc:
            return self._nak(data, rx_ns, ctx, data[uid_at:uid_end], exc.reason)
        session = self._sessions.get(contents)
        aead, c2s, s2c = session if session is not None else self._session(contents)
        if aead.id not in self.supported:  # disabled since: make the client redo NTS-KE
            return self._nak(data, rx_ns, ctx, data[uid_at:uid_end], "aead_disabled")
        opened = open_auth(data, pos + 4, end)
        if opened is None:
            return _D_MALFORMED
        nonce, ciphertext = opened
        plaintext = c2s.open(nonce, ciphertext, data[:pos])
        if plaintext is None:
            return self._nak(data, rx_ns, ctx, data[uid_at:uid_end], "authenticator_invalid")
        wanted = 1 + placeholders
        if plaintext:  # chrony and ntpd-rs send nothing inside; placeholders here count too
            try:
                for inner in iter_extensions(plaintext):
                    if inner.type == FieldType.NTS_COOKIE_PLACEHOLDER:
                        if len(inner.value) != size - 4:
                            return _D_PLACEHOLDER
                        wanted += 1
            except ParseError:
                return _D_MALFORMED
        count = min(wanted, MAX_COOKIES)
        # the cookies' nonces, then the reply's (all from the CSPRNG)
        randomness = _draw() if count == 1 else os.urandom(SERVER_NONCE_LEN + 16 * count)
        cookies = self.keyring.seal_fields(contents, now, count, randomness, size - 4)
        nonce = randomness[-(aead.nonce_len or SERVER_NONCE_LEN) :]
        uid = data[uid_at:uid_end]
        ct_len, min_length = len(cookies) + TAG_LEN, end - HEADER_LEN - len(uid)
        frame = self._frames.get((aead.id, ct_len, min_length))
        if frame is None:
            frame = self._frame(aead, len(nonce), ct_len, min_length)
        return Seal(partial(_finish, ctx, data, rx_ns, uid, frame[0] + nonce + frame[1], s2c, nonce, cookies, frame[2]))

    @staticmethod
    def _nak(data: bytes, rx_ns: int, ctx: ReplyContext, uid_field: bytes, reason: str) -> Nak:
        return Nak(ctx.kiss(data, KISS_NTSN, rx_ns) + uid_field, reason)
