"""The association core: one pipeline for every datagram, whatever its authentication mode.

Strategy: `handle(data, client, rx_ns, local)` runs parse -> access -> rate -> authenticator ->
reply -> length guard and returns a Decision (reply bytes, a Drop, a Defer, or with `late` a Seal
that `seal()` finishes), counting the outcome in `stats`. Only mode-3 requests of versions 1-4 are
answered. The common case (a bare 48-byte request in plain mode) takes the same steps without
building a Packet: the header's first byte gives mode and version, and the reply is assembled
from bytes prebuilt whenever the server state changes. Plugins' fast paths (chosen by datagram
length) come next, and only then the general path: split fields, weigh claims, `respond`. Time
comes in: `rx_ns` per call, and the injected `clock()` for the transmit timestamp, read as the
last step before the reply is returned (or, for a Seal, when it is finished).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

from ..wire.errors import ParseError
from ..wire.packet import HEADER_LEN, KISS_DENY, KISS_RATE, KISS_RSTR, kiss_of_death, split_body
from ..wire.timestamps import NTP_UNIX_OFFSET
from .auth import Authenticator, Request
from .clockstate import ServerState
from .decisions import Decision, Defer, Drop, Nak, Seal, Stats, drop
from .policy import ALLOW, DENIED, RATE_KOD, RATE_OK, AccessPolicy, NetworkSet, RateLimiter

_REPLY = struct.Struct(">2s1s21s8sQQ")  # LI/VN/mode+stratum, poll, state bytes, origin, receive, transmit
_NS = 1_000_000_000
_MASK64 = (1 << 64) - 1
_OFFSET_SCALED = NTP_UNIX_OFFSET * _NS << 32  # (unix_ns << 32) + this, // _NS, is the NTP timestamp

# Stable counter keys, prebuilt so the hot path does not build tuples.
K_REQUESTS = ("requests",)
_MODE_DROPS = {m: drop(f"mode_{m}") for m in range(8)}
_D_SHORT = drop("too_short")
_D_VERSION = drop("bad_version")
_D_ACCESS = drop("access_denied")
_D_RATE = drop("rate_limited")
_D_NOAUTH = drop("no_authenticator")
_D_REQUIRE_AUTH = drop("auth_required")
_D_TOO_LONG = drop("reply_too_long")
_Fast = tuple[Authenticator, Callable[..., "bytes | Nak | Drop | Seal | None"], tuple[str, ...]]
_FAST_TABLE = 4097  # datagram lengths whose list of fast paths is kept (the shell's largest + 1)


def ntp64(ns: int) -> int:
    """Unix ns -> NTP 64-bit timestamp (era folded), in one multiply and one divide."""
    return (((ns << 32) + _OFFSET_SCALED) // _NS) & _MASK64


class Pipeline:
    """Turns datagrams into decisions. Not thread-safe; one per event loop."""

    def __init__(
        self,
        *,
        state: ServerState,
        authenticators: Sequence[Authenticator],
        clock: Callable[[], int],
        stats: Stats | None = None,
        access: AccessPolicy | None = None,
        deny_kod: bool = True,
        rate: RateLimiter | None = None,
        require_auth: NetworkSet | None = None,
        fast_paths: bool = True,
    ) -> None:
        self.stats = stats if stats is not None else Stats()
        self.clock = clock
        self._auths = sorted(authenticators, key=lambda a: a.order)
        self._bare = next((a for a in self._auths if a.bare), None)
        self._access = None if access is None or access.open else access
        self._deny_kod = deny_kod
        self._rate = rate
        self._require_auth = require_auth if require_auth is not None and require_auth.networks else None
        self._k_replies = {a.name: ("replies", a.name) for a in self._auths}
        fast: list[_Fast] = [
            (a, a.fast, self._k_replies[a.name]) for a in self._auths if type(a).fast is not Authenticator.fast
        ]
        if not fast_paths:  # every datagram takes the general path (tests compare the two)
            fast = []
        self._fast = tuple(fast)
        # The fast paths that may take each datagram length, asked once per length seen.
        self._fast_by_len: dict[int, tuple[_Fast, ...]] = {}
        # Plain ints are cheaper than dict entries on the hot path; counters() merges them.
        self.requests = 0  # incremented by the shell for every datagram
        self.bare_replies = 0
        # check_deferred runs on the event loop thread, apart from the thread calling handle().
        self.deferred_stats = Stats()
        self.set_state(state)

    @property
    def authenticators(self) -> tuple[Authenticator, ...]:
        return tuple(self._auths)

    def set_state(self, state: ServerState) -> None:
        """Rebuild the reply bytes that depend only on the server state."""
        self.state = state
        self._first = [bytes(((state.leap << 6) | (v << 3) | 4, state.stratum)) for v in range(8)]
        self._middle = struct.pack(
            ">bII4sQ", state.precision, state.root_delay, state.root_dispersion, state.reference_id, state.reference_ts
        )

    # -- the ReplyContext plugins use ------------------------------------------------------------
    def reply_header(self, request: bytes, rx_ns: int, tx_delay_ns: int = 0) -> bytes:
        return _REPLY.pack(
            self._first[(request[0] >> 3) & 7],
            request[2:3],
            self._middle,
            request[40:48],
            (((rx_ns << 32) + _OFFSET_SCALED) // _NS) & _MASK64,
            ((((self.clock() + tx_delay_ns) << 32) + _OFFSET_SCALED) // _NS) & _MASK64,
        )

    def kiss(self, request: bytes, code: bytes, rx_ns: int) -> bytes:
        return kiss_of_death(request, code, ntp64(rx_ns), ntp64(self.clock()))

    # -- the pipeline -------------------------------------------------------------------------------
    def handle(
        self, data: bytes, client: tuple[str, int], rx_ns: int, local: object = None, late: bool = False
    ) -> Decision:
        """Decide what to answer. The caller counts datagrams in `requests`. With `late`, a verified
        authenticated request comes back as a `Seal` for the caller to finish with `seal()` right
        before sending; otherwise it is finished here."""
        n = len(data)
        if not n:
            return self._drop(_D_SHORT)
        b0 = data[0]
        if b0 & 7 != 3:  # before the length check: a 12-byte ntpq probe is counted as mode 6
            return self._drop(_MODE_DROPS[b0 & 7])
        if n < HEADER_LEN:
            return self._drop(_D_SHORT)
        version = (b0 >> 3) & 7
        if version < 1 or version > 4:
            return self._drop(_D_VERSION)
        ip = client[0]
        if self._access is not None:
            verdict = self._access.check(ip)
            if verdict != ALLOW:
                if not self._deny_kod:
                    return self._drop(_D_ACCESS)
                self._count(("kod", "DENY" if verdict == DENIED else "RSTR"))
                self._drop(_D_ACCESS)
                return self.kiss(data, KISS_DENY if verdict == DENIED else KISS_RSTR, rx_ns)
        if self._rate is not None:
            limited = self._rate.check(ip, rx_ns)
            if limited != RATE_OK:
                self._drop(_D_RATE)
                if limited == RATE_KOD:
                    self._count(("kod", "RATE"))
                    return self.kiss(data, KISS_RATE, rx_ns)
                return _D_RATE
        if n == HEADER_LEN and self._bare is not None:
            if self._require_auth is not None and ip in self._require_auth:
                return self._drop(_D_REQUIRE_AUTH)
            self.bare_replies += 1
            return _REPLY.pack(
                self._first[version],
                data[2:3],
                self._middle,
                data[40:48],
                (((rx_ns << 32) + _OFFSET_SCALED) // _NS) & _MASK64,
                (((self.clock() << 32) + _OFFSET_SCALED) // _NS) & _MASK64,
            )
        fasts = self._fast_by_len.get(n)
        if fasts is None:
            fasts = tuple(f for f in self._fast if f[0].fast_takes(n))
            if n < _FAST_TABLE:
                self._fast_by_len[n] = fasts
        for auth, fast, k_replies in fasts:
            result = fast(data, client, rx_ns, self)
            if result is not None:
                if type(result) is bytes and len(result) <= n:  # a finished reply (MAC), counted here
                    counts = self.stats.counts
                    counts[k_replies] = counts.get(k_replies, 0) + 1
                    return result
                if late and type(result) is Seal:  # verified, to be finished by the caller (NTS)
                    result.key, result.limit = k_replies, n
                    return result
                return self._finish(auth, result, n, late)
        return self._authenticated(data, client, rx_ns, local, version, late)

    def _authenticated(
        self, data: bytes, client: tuple[str, int], rx_ns: int, local: object, version: int, late: bool
    ) -> Decision:
        try:
            fields, trailer = split_body(data, version)
        except ParseError as exc:
            return self._drop(drop(f"malformed_{exc.code}"))
        request = Request(data, fields, trailer, client, rx_ns, local)
        auth, best = None, 0
        for candidate in self._auths:  # the firmest claim wins; on a tie, the earlier plugin
            claim = candidate.matches(request)
            if claim > best:
                auth, best = candidate, claim
                if claim >= 2:
                    break
        if auth is None:
            return self._drop(_D_NOAUTH)
        if auth.bare and self._require_auth is not None and client[0] in self._require_auth:
            return self._drop(_D_REQUIRE_AUTH)
        return self._finish(auth, auth.respond(request, self), len(data), late)

    def _finish(
        self, auth: Authenticator, result: bytes | Nak | Drop | Defer | Seal, limit: int, late: bool
    ) -> Decision:
        """Guard the reply length and count the outcome of a plugin's answer."""
        if type(result) is Seal:
            result.key, result.limit = self._k_replies[auth.name], limit
            return result if late else self.seal(result)
        if isinstance(result, bytes):
            if len(result) > limit:
                return self._drop(_D_TOO_LONG)
            self._count(self._k_replies[auth.name])
            return result
        if isinstance(result, Nak):
            if len(result.data) > limit:
                return self._drop(_D_TOO_LONG)
            self._count(("naks", auth.name, result.reason))
            return result.data
        if isinstance(result, Drop):
            return self._drop(result)
        assert isinstance(result, Defer)
        self._count(("deferred", auth.name))
        return result

    def seal(self, pending: Seal) -> bytes | Drop:
        """Finish a verified request's reply (transmit time read now), guard its length, count it."""
        reply = pending.finish()
        if len(reply) > pending.limit:
            return self._drop(_D_TOO_LONG)
        counts = self.stats.counts
        counts[pending.key] = counts.get(pending.key, 0) + 1
        return reply

    def check_deferred(self, request: bytes, reply: bytes | None, name: str, reason: str = "failed") -> bytes | None:
        """Apply the final guard and counters to a deferred reply when it arrives (or fails)."""
        stats = self.deferred_stats
        if reply is None:
            stats.inc(("drops", f"{name}_{reason}"))
            return None
        if len(reply) > len(request):
            stats.inc(("drops", _D_TOO_LONG.reason))
            return None
        stats.inc(self._k_replies[name])
        return reply

    def counters(self) -> dict[tuple[str, ...], int]:
        """A merged copy of every counter; safe to call from another thread (nothing is reset)."""
        merged = dict(self.stats.counts)
        for key, value in tuple(self.deferred_stats.counts.items()):
            merged[key] = merged.get(key, 0) + value
        if self.requests:
            merged[K_REQUESTS] = merged.get(K_REQUESTS, 0) + self.requests
        if self.bare_replies and self._bare is not None:
            key = self._k_replies[self._bare.name]
            merged[key] = merged.get(key, 0) + self.bare_replies
        return merged

    def _count(self, key: tuple[str, ...]) -> None:
        counts = self.stats.counts
        counts[key] = counts.get(key, 0) + 1

    def _drop(self, d: Drop) -> Drop:
        self._count(("drops", d.reason))
        return d
