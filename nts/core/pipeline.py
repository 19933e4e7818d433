"""The association core: one pipeline for every datagram, whatever its authentication mode.

Strategy: `handle(data, client, rx_ns)` runs parse -> access -> rate -> handler -> reply -> length
guard and returns a Decision (reply bytes, a Drop, a Defer, or with `late` a Seal the shell
completes right before sending), counting the outcome in the stats sink it was given. Client
(mode 3) requests of versions 1-4 are answered in server mode, symmetric active ones (mode 1) in
symmetric passive mode with no association kept (`clockstate.Replies` picks the mode; NTS, defined
for client/server only, drops them). The common case (a bare 48-byte request in plain mode) takes
the same steps without building a Packet: the header's first byte gives mode and version, and the
reply header comes from bytes prebuilt whenever the server state changes (`clockstate.Replies`,
which is also what handlers build their answers with). Handlers' fast paths (chosen by datagram length) come
next, and only then the general path: split fields, weigh claims, `respond`. Every handler's
answer becomes a decision in one place, `_finish`. Time comes in: `rx_ns` per call, and the
injected `clock()` for the transmit timestamp, read as the last step before the reply is returned
(or, for a Seal, when it is completed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..wire.errors import ParseError
from ..wire.packet import HEADER_LEN, KISS_DENY, KISS_RATE, KISS_RSTR, split_body
from .clockstate import Replies, ServerState
from .decisions import D_TOO_LONG, Answer, Decision, Defer, Drop, Nak, Seal, drop
from .handler import Client, Request, RequestHandler
from .interleave import TxTimestamps
from .policy import ALLOW, DENIED, RATE_KOD, RATE_OK, AccessPolicy, KissLimiter, NetworkSet, RateLimiter
from .stats import Counters, Key, add

# Stable drops and counter keys, prebuilt so the hot path does not build tuples.
_MODE_DROPS = {m: drop(f"mode_{m}") for m in range(8)}
_D_SHORT = drop("too_short")
_D_VERSION = drop("bad_version")
_D_ACCESS = drop("access_denied")
_D_RATE = drop("rate_limited")
_D_NOAUTH = drop("no_authenticator")
_D_REQUIRE_AUTH = drop("auth_required")
_Fast = tuple[RequestHandler, Callable[[bytes, Client, int, "Replies"], "Answer | None"]]
_FAST_TABLE = 4097  # datagram lengths whose list of fast paths is kept (the shell's largest + 1)


class Pipeline:
    """Turns datagrams into decisions. Not thread-safe; one per serving thread.

    `stats` is the sink for what `handle` decides (the serving thread's); `deferred_stats` the one
    for `check_deferred`, which runs on the event loop's thread. Both are the shell's to give.
    """

    def __init__(
        self,
        *,
        state: ServerState,
        authenticators: Sequence[RequestHandler],
        clock: Callable[[], int],
        stats: Counters | None = None,
        deferred_stats: Counters | None = None,
        access: AccessPolicy | None = None,
        deny_kod: bool = True,
        deny_kods: KissLimiter | None = None,
        rate: RateLimiter | None = None,
        require_auth: NetworkSet | None = None,
        fast_paths: bool = True,
        timestamps: TxTimestamps | None = None,
    ) -> None:
        self.stats = stats if stats is not None else Counters()
        self.timestamps = timestamps  # interleaved mode and the transmit-time correction (one socket's)
        self.deferred_stats = deferred_stats if deferred_stats is not None else Counters()
        self.clock = clock
        self._auths = sorted(authenticators, key=lambda a: a.order)
        self._bare = next((a for a in self._auths if a.bare), None)
        self._bare_replies = self.stats.tally(("replies", self._bare.name if self._bare is not None else "none"))
        self._access = None if access is None or access.open else access
        self._deny_kod = deny_kod
        # DENY/RSTR KoDs at most one per address per interval (shared by the server's pipelines)
        self._deny_kods = deny_kods if deny_kods is not None else KissLimiter(1.0, 100_000)
        self._rate = rate
        self._require_auth = require_auth if require_auth is not None and require_auth.networks else None
        self._k_replies = {a.name: ("replies", a.name) for a in self._auths}
        fast: list[_Fast] = [(a, a.fast) for a in self._auths if type(a).fast is not RequestHandler.fast]
        if not fast_paths:  # every datagram takes the general path (tests compare the two)
            fast = []
        self._fast = tuple(fast)
        # The fast paths that may take each datagram length, asked once per length seen.
        self._fast_by_len: dict[int, tuple[_Fast, ...]] = {}
        self.set_state(state)

    @property
    def authenticators(self) -> tuple[RequestHandler, ...]:
        return tuple(self._auths)

    def set_state(self, state: ServerState) -> None:
        """Serve `state` from the next datagram on (the reply bytes that depend on it are prebuilt)."""
        self.replies = Replies(state, self.clock, self.timestamps)
        self._reply_header = self.replies.reply_header

    def handle(self, data: bytes, client: Client, rx_ns: int, late: bool = False) -> Decision:
        """Decide what to answer. With `late`, a verified authenticated request comes back as a
        `Seal` for the caller to complete right before sending; otherwise it is completed here."""
        n = len(data)
        if not n:
            return self._drop(_D_SHORT)
        b0 = data[0]
        if b0 & 7 != 3 and b0 & 7 != 1:  # before the length check: a 12-byte ntpq probe is counted as mode 6
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
                if not self._deny_kod or not self._deny_kods.allow(ip, rx_ns):
                    return self._drop(_D_ACCESS)
                self._count(("kod", "DENY" if verdict == DENIED else "RSTR"))
                self._drop(_D_ACCESS)
                return self.replies.kiss(data, KISS_DENY if verdict == DENIED else KISS_RSTR, rx_ns)
        if self._rate is not None:
            limited = self._rate.check(ip, rx_ns)
            if limited != RATE_OK:
                self._drop(_D_RATE)
                if limited == RATE_KOD:
                    self._count(("kod", "RATE"))
                    return self.replies.kiss(data, KISS_RATE, rx_ns)
                return _D_RATE
        self.replies.client = ip  # (interleaved mode: a reply may only quote its own client's timestamps)
        if n == HEADER_LEN and self._bare is not None:
            if self._require_auth is not None and ip in self._require_auth:
                return self._drop(_D_REQUIRE_AUTH)
            self._bare_replies.n += 1
            return self._reply_header(data, rx_ns)
        fasts = self._fast_by_len.get(n)
        if fasts is None:
            fasts = tuple(f for f in self._fast if f[0].fast_takes(n))
            if n < _FAST_TABLE:
                self._fast_by_len[n] = fasts
        for handler, fast in fasts:
            answer = fast(data, client, rx_ns, self.replies)
            if answer is not None:
                return self._finish(handler, answer, n, late)
        return self._general(data, client, rx_ns, version, late)

    def _general(self, data: bytes, client: Client, rx_ns: int, version: int, late: bool) -> Decision:
        try:
            fields, trailer = split_body(data, version)
        except ParseError as exc:
            return self._drop(drop(f"malformed_{exc.code}"))
        request = Request(data, fields, trailer, client, rx_ns)
        handler, best = None, 0
        for candidate in self._auths:  # the firmest claim wins; on a tie, the earlier handler
            claim = candidate.matches(request)
            if claim > best:
                handler, best = candidate, claim
                if claim >= 2:
                    break
        if handler is None:
            return self._drop(_D_NOAUTH)
        if handler.bare and self._require_auth is not None and client[0] in self._require_auth:
            return self._drop(_D_REQUIRE_AUTH)
        return self._finish(handler, handler.respond(request, self.replies), len(data), late)

    def _finish(self, handler: RequestHandler, answer: Answer, limit: int, late: bool) -> Decision:
        """The one place a handler's answer becomes a decision: guard the reply's length, count it."""
        kind = type(answer)
        if kind is bytes:  # a finished time reply (MAC)
            if len(answer) > limit:  # type: ignore[arg-type]
                return self._drop(D_TOO_LONG)
            self._count(self._k_replies[handler.name])
            return answer  # type: ignore[return-value]
        if kind is Seal:  # verified (NTS): completed by the caller right before sending, or now
            answer.key, answer.limit, answer.stats = self._k_replies[handler.name], limit, self.stats  # type: ignore[union-attr]
            return answer if late else answer.complete()  # type: ignore[return-value,union-attr]
        if kind is Nak:
            if len(answer.data) > limit:  # type: ignore[union-attr]
                return self._drop(D_TOO_LONG)
            self._count(("naks", handler.name, answer.reason))  # type: ignore[union-attr]
            return answer.data  # type: ignore[union-attr]
        if kind is Drop:
            return self._drop(answer)  # type: ignore[arg-type]
        assert kind is Defer
        self._count(("deferred", handler.name))
        return answer  # type: ignore[return-value]

    def check_deferred(self, request: bytes, reply: bytes | None, name: str, reason: str = "failed") -> bytes | None:
        """Apply the final guard and counters to a deferred reply when it arrives (or fails)."""
        stats = self.deferred_stats
        if reply is None:
            stats.inc(("drops", f"{name}_{reason}"))
            return None
        if len(reply) > len(request):
            stats.inc(("drops", D_TOO_LONG.reason))
            return None
        stats.inc(self._k_replies[name])
        return reply

    def counters(self) -> dict[Key, int]:
        """A merged copy of both sinks; safe to call from another thread (nothing is reset)."""
        merged = self.stats.snapshot()
        add(merged, self.deferred_stats.snapshot())
        return merged

    def _count(self, key: Key) -> None:
        counts = self.stats.counts
        counts[key] = counts.get(key, 0) + 1

    def _drop(self, d: Drop) -> Drop:
        self._count(("drops", d.reason))
        return d
