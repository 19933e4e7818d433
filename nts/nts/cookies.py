"""NTS cookies and the key ring that seals them.

Strategy: cookie keys are derived, not stored: key(period) = HKDF-SHA256(master secret, period
number), where period = unix time // rotate_interval. So every worker process, a restarted server
and every member of a fleet that holds the same master secret file agree on all keys with no
coordination, and rotation needs no writes. Cookies from the current period, `keep_keys` previous
periods and one future period (clock skew between fleet members) are accepted. The master secret
is the only thing persisted (mode 0600, written atomically). Trade-off, documented in the README:
whoever steals the secret can open past cookies, so rotate the secret file (clients then simply
redo NTS-KE) when a server may have been compromised.

Cookie layout: key id u32 (the period, in clear) | 16-byte nonce | AES-SIV-CMAC-256 over (AEAD
id u16 | zero u16 | C2S key | S2C key) with the key id as associated data and the nonce as nonce,
tag first: 104 bytes for AES-SIV-CMAC-256 sessions, 72 for AES-128-GCM-SIV, always a multiple of 4
as extension fields require. Cookies of the one-component format, which versions before Nettle
support sealed (key id with the top bit set; key id and nonce as AES-SIV's only associated-data
component, which saved a CMAC pass in OpenSSL's AES-SIV, while Nettle takes exactly two
components), are still opened; periods stay below 2**31 (the interval is at least 60 s), so the
two never collide. A compact format (key id with bit 30 set, a 12-byte nonce, the two keys alone:
96 bytes for AES-SIV-CMAC-256 sessions, 64 for AES-128-GCM-SIV) replaces cookies shorter than ours
(chrony's), so a reply is never longer than its request. Sealing is sans-IO: time (and, in tests,
the nonce) comes in. A chrony server's keys (`foreign`, from its ntskeys file: `chrony_keys.py`)
open the cookies it issued; they seal nothing.
"""

from __future__ import annotations

import os
import secrets
import struct
from hmac import compare_digest
from pathlib import Path
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..files import hand_over, read_private_file
from .aead import AEADS, AeadId, Cipher
from .chrony_keys import contents_of, open_cookie

SECRET_LEN = 32
_COOKIE_AEAD = AEADS[AeadId.AES_SIV_CMAC_256]
_NONCE_LEN = 16
_HEAD = struct.Struct(">I")
_KEYS_HEAD = struct.Struct(">HH")
_FIELD_HEAD = struct.Struct(">HH")
_COOKIE_FIELD = 0x0204  # NTS Cookie extension field type
_ONE_COMPONENT = 0x80000000  # key id flag of the one-component format (opened, no longer sealed)
_COMPACT = 0x40000000  # key id flag of the compact format (periods stay below 2**30 for 2,000 years)
_COMPACT_NONCE_LEN = 12
_PERIOD_MASK = 0x7FFFFFFF
MASTER_FILE = "nts-master.key"
# what sealed contents start with (AEAD id u16, zero u16) -> their whole length (two keys follow)
_CONTENTS_LEN = {_KEYS_HEAD.pack(aead_id, 0): 4 + 2 * aead.key_len for aead_id, aead in AEADS.items()}
# the compact format's sessions: their AEAD follows from the key length, as in chrony's cookies
_COMPACTABLE = {_KEYS_HEAD.pack(aead_id, 0) for aead_id in (AeadId.AES_SIV_CMAC_256, AeadId.AES_128_GCM_SIV)}


class _Tables(NamedTuple):
    """What the hot path needs for one rotation period, replaced whole (one attribute, so a thread
    never sees the tables of one period with the span of another)."""

    start: float  # the wall-clock span these hold for
    end: float
    accepting: dict[bytes, Cipher]  # key id (4 bytes, as cookies carry it) -> cipher
    one_component: dict[bytes, AESSIV]  # the same for the one-component format
    compact: dict[bytes, Cipher]  # the same for the compact format
    sealing_id: bytes
    sealing: Cipher


class CookieError(Exception):
    """A cookie that cannot be opened: `reason` is a stable metrics label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CookieKeys(NamedTuple):
    """What a cookie carries: the negotiated AEAD and the two session keys (a tuple: the NTS hot
    path unpacks it, and building one costs less than a dataclass)."""

    aead: int
    c2s: bytes
    s2c: bytes


class KeyRing:
    """Seals and opens cookies with keys derived per rotation period from a master secret."""

    def __init__(self, secret: bytes, rotate_interval: int = 3600, keep_keys: int = 24) -> None:
        if len(secret) < SECRET_LEN:
            raise ValueError("master secret too short")
        self._secret = secret
        self._current: _Tables | None = None  # the hot path's tables, rebuilt on next use
        self.set_rotation(rotate_interval, keep_keys)
        self._ciphers: dict[int, tuple[Cipher, AESSIV]] = {}  # per period, both formats' (keyed once)
        self.foreign: dict[bytes, tuple[Cipher, int]] = {}  # another server's keys (chrony's), by key id

    def set_secret(self, secret: bytes) -> bool:
        """Use another master secret from now on (a reload after the file was replaced); cookies
        sealed with the old one are no longer opened. True when it differs from the one in use."""
        if len(secret) < SECRET_LEN:
            raise ValueError("master secret too short")
        if compare_digest(secret, self._secret):
            return False
        self._secret = secret
        self._ciphers = {}  # a new dict: tables being built from the old one are not kept (below)
        self._current = None
        return True

    def set_rotation(self, rotate_interval: int, keep_keys: int) -> None:
        """Set the rotation interval and the number of past periods accepted (also on reload)."""
        if rotate_interval < 60 or keep_keys < 0:
            raise ValueError("bad rotation settings")
        self.rotate_interval = rotate_interval
        self.keep_keys = keep_keys
        self._current = None

    def period(self, now_s: float) -> int:
        return int(now_s // self.rotate_interval) & _PERIOD_MASK

    def _cipher(self, period: int, cache: dict[int, tuple[Cipher, AESSIV]], secret: bytes) -> tuple[Cipher, AESSIV]:
        ciphers = cache.get(period)
        if ciphers is None:
            if len(cache) > 4 * (self.keep_keys + 2):
                cache.clear()
            kdf = HKDF(hashes.SHA256(), _COOKIE_AEAD.key_len, salt=b"ntsd cookie key v1", info=_HEAD.pack(period))
            key = kdf.derive(secret)
            ciphers = cache[period] = (_COOKIE_AEAD.cipher(key), AESSIV(key))
        return ciphers

    def _tables(self, now_s: float) -> _Tables:
        """The hot path's tables for the period `now_s` falls in (built once a period)."""
        tables = self._current
        if tables is None or not tables.start <= now_s < tables.end:
            tables = self._build_tables(now_s)
        return tables

    def _build_tables(self, now_s: float) -> _Tables:
        """Build and keep the tables for the period `now_s` falls in."""
        cache, secret = self._ciphers, self._secret  # one consistent pair, whatever set_secret does meanwhile
        period = self.period(now_s)
        start = (now_s // self.rotate_interval) * self.rotate_interval
        # accepted: this period, keep_keys before it, one after it (clock skew within a fleet)
        accepting, one_component, compact = {}, {}, {}
        for age in range(-1, self.keep_keys + 1):
            p = (period - age) & _PERIOD_MASK
            accepting[_HEAD.pack(p)], one_component[_HEAD.pack(p | _ONE_COMPONENT)] = self._cipher(p, cache, secret)
            compact[_HEAD.pack(p | _COMPACT)] = accepting[_HEAD.pack(p)]
        current = _Tables(
            start,
            start + self.rotate_interval,
            accepting,
            one_component,
            compact,
            _HEAD.pack(period),
            self._cipher(period, cache, secret)[0],
        )
        if self._ciphers is cache:  # not if the secret was replaced while these were built
            self._current = current
        return current

    def seal(self, keys: CookieKeys, now_s: float, nonce: bytes | None = None) -> bytes:
        return self.seal_many(keys, now_s, 1, nonce)[0]  # `nonce`: tests pin it for vectors

    def seal_many(self, keys: CookieKeys, now_s: float, count: int, nonces: bytes | None = None) -> list[bytes]:
        """`count` unlinkable cookies for the same keys; `nonces` (the first 16 bytes per cookie are
        used) default to random."""
        plaintext = _KEYS_HEAD.pack(keys.aead, 0) + keys.c2s + keys.s2c
        return self._seal(plaintext, now_s, count, os.urandom(_NONCE_LEN * count) if nonces is None else nonces, b"")

    def seal_fields(self, contents: bytes, now_s: float, count: int, nonces: bytes, fit: int = 0) -> bytes:
        """`count` fresh cookies with the `contents` of an opened one, as NTS Cookie fields (hot path).
        `fit`: the length of the cookie they replace; when ours would be longer (a chrony cookie of
        an AES-SIV-CMAC-256 or AES-128-GCM-SIV session), the compact format keeps the reply no
        longer than the request."""
        if fit and fit < 4 + _NONCE_LEN + 16 + len(contents) and contents[:4] in _COMPACTABLE:
            return self._seal_compact(contents[4:], now_s, count, nonces)
        field = _FIELD_HEAD.pack(_COOKIE_FIELD, 4 + 4 + _NONCE_LEN + 16 + len(contents))
        if count == 1:  # the usual request (one cookie, no placeholders): no list to build and join
            tables = self._tables(now_s)
            key_id, nonce = tables.sealing_id, nonces[:_NONCE_LEN]
            return field + key_id + nonce + tables.sealing.seal(nonce, contents, key_id)
        return b"".join(self._seal(contents, now_s, count, nonces, field))

    def _seal(self, plaintext: bytes, now_s: float, count: int, nonces: bytes, prefix: bytes) -> list[bytes]:
        # cookie: key id (the period), nonce, then AES-SIV's tag and ciphertext
        if len(nonces) < _NONCE_LEN * count:
            raise ValueError("need 16 bytes of nonce per cookie")
        tables = self._tables(now_s)
        key_id, seal = tables.sealing_id, tables.sealing.seal
        out = []
        for i in range(0, _NONCE_LEN * count, _NONCE_LEN):
            nonce = nonces[i : i + _NONCE_LEN]
            out.append(prefix + key_id + nonce + seal(nonce, plaintext, key_id))
        return out

    def _seal_compact(self, keys: bytes, now_s: float, count: int, nonces: bytes) -> bytes:
        """Key id (the period, flagged compact) | 12-byte nonce | AES-SIV over C2S | S2C: no longer
        than chrony's cookies of the same sessions (96 bytes to its 100; 64 to its 64)."""
        tables = self._tables(now_s)
        key_id = _HEAD.pack(_HEAD.unpack(tables.sealing_id)[0] | _COMPACT)
        field = _FIELD_HEAD.pack(_COOKIE_FIELD, 4 + 4 + _COMPACT_NONCE_LEN + 16 + len(keys))
        out = []
        for i in range(0, _NONCE_LEN * count, _NONCE_LEN):
            nonce = nonces[i : i + _COMPACT_NONCE_LEN]
            out.append(field + key_id + nonce + tables.sealing.seal(nonce, keys, key_id))
        return b"".join(out)

    def open(self, cookie: bytes, now_s: float) -> CookieKeys:
        contents = self.open_contents(cookie, now_s)
        key_len = (len(contents) - 4) // 2
        return CookieKeys(_KEYS_HEAD.unpack_from(contents)[0], contents[4 : 4 + key_len], contents[4 + key_len :])

    def open_contents(self, cookie: bytes, now_s: float) -> bytes:
        """What the cookie seals, checked: AEAD id u16, zero u16, C2S key, S2C key (hot path)."""
        if len(cookie) < 4 + _NONCE_LEN + 16 + 4:
            raise CookieError("cookie_malformed")
        tables = self._tables(now_s)
        key_id = cookie[:4]
        cipher = tables.accepting.get(key_id)
        if cipher is not None:
            contents = cipher.open(cookie[4 : 4 + _NONCE_LEN], cookie[4 + _NONCE_LEN :], key_id)
        elif key_id in tables.compact:
            contents = self._open_compact(tables.compact[key_id], key_id, cookie)
        elif key_id in self.foreign:  # a cookie a chrony server issued (nts.chrony_keys)
            contents = open_cookie(*self.foreign[key_id], cookie)
        else:
            contents = self._open_one_component(tables, cookie)
        if contents is None:
            raise CookieError("cookie_forged")
        if _CONTENTS_LEN.get(contents[:4]) != len(contents):  # a known AEAD id, zero, both keys
            raise CookieError("cookie_malformed")
        return contents

    @staticmethod
    def _open_compact(cipher: Cipher, key_id: bytes, cookie: bytes) -> bytes | None:
        keys = cipher.open(cookie[4 : 4 + _COMPACT_NONCE_LEN], cookie[4 + _COMPACT_NONCE_LEN :], key_id)
        return None if keys is None else contents_of(keys)

    @staticmethod
    def _open_one_component(tables: _Tables, cookie: bytes) -> bytes | None:
        cipher = tables.one_component.get(cookie[:4])
        if cipher is None:
            raise CookieError("cookie_key_unknown")
        try:
            return cipher.decrypt(cookie[4 + _NONCE_LEN :], [cookie[: 4 + _NONCE_LEN]])
        except InvalidTag:
            return None


def check_secret(key_dir: Path) -> str | None:
    """Why the master secret in key_dir could not be used or created, without creating it."""
    if not (key_dir / MASTER_FILE).exists():
        existing = next((p for p in (key_dir, *key_dir.parents) if p.exists()), None)
        if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            return f"{key_dir}: the master secret cannot be created there"
        return None
    try:
        _read_secret(key_dir / MASTER_FILE)
    except (OSError, ValueError) as exc:
        return str(exc)
    return None


def _read_secret(path: Path) -> bytes:
    data = read_private_file(path, 4096)
    try:
        secret = bytes.fromhex(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"{path}: not a hex-encoded secret") from None
    if len(secret) < SECRET_LEN:
        raise ValueError(f"{path}: the secret must be at least {SECRET_LEN} bytes (64 hex digits)")
    return secret


def load_or_create_secret(key_dir: Path) -> tuple[bytes, bool]:
    """The master secret from key_dir (created, 0600, if absent). Returns (secret, created)."""
    path = key_dir / MASTER_FILE
    try:
        return _read_secret(path), False
    except FileNotFoundError:
        if not key_dir.exists():
            key_dir.mkdir(mode=0o700, parents=True)
            hand_over(key_dir)  # the user the server drops to must read it at reload
        secret = secrets.token_bytes(SECRET_LEN)
        # Written whole to a file of its own, then linked into place: a crash leaves no partial
        # secret behind, and a reader sees no file or all of it (link, unlike rename, never replaces).
        tmp = key_dir / f".{MASTER_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secret.hex().encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())
            hand_over(tmp)
            os.link(tmp, path)
        except FileExistsError:  # another process created it first: use that one
            return load_or_create_secret(key_dir)
        finally:
            tmp.unlink(missing_ok=True)
        return secret, True
