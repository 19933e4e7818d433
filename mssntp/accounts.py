"""Which machine accounts a client may have signed replies for: the bound on "Timeroast" sweeps.

Strategy: a signed MS-SNTP reply lets anyone who receives it brute-force that machine account's
password offline, so a sweep asks for many accounts (RIDs). A real domain member asks for one, its
own. Sans-IO (time comes in): each client address may have at most `per_client` distinct RIDs
signed per `window`, and RIDs that no one asked for recently ("new" ones, what a sweep from many
addresses is made of) come from one global token bucket. A RID seen recently is not new: after a
restart every member's first request spends from the bucket, which its burst is sized for. Tables
are bounded (the older half is forgotten when one is full). The outcome is a reason or None.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice

RID_MASK = 0x7FFFFFFF  # the key id's low 31 bits; the high bit selects the current or previous password
PER_CLIENT = "accounts_per_client"  # reasons (metrics labels, after "mssntp_")
NEW_BUDGET = "new_accounts_budget"


@dataclass(frozen=True, slots=True)
class AccountLimits:
    per_client: int = 4  # distinct accounts one address may have signed per window
    window: float = 3600.0  # seconds
    new_rate: float = 2.0  # accounts per second not asked for recently, for all clients together
    new_burst: int = 500
    max_clients: int = 100_000  # addresses remembered (and as many recent accounts)


class AccountGuard:
    """Decides whether a request for account `rid` from `ip` may be signed."""

    __slots__ = ("_clients", "_known", "_last_ns", "_tokens", "limits")

    def __init__(self, limits: AccountLimits) -> None:
        self.limits = limits
        self._clients: dict[str, tuple[int, tuple[int, ...]]] = {}  # address -> (window start, RIDs)
        self._known: dict[int, None] = {}  # RIDs signed for recently, oldest first
        self._tokens = float(limits.new_burst)
        self._last_ns: int | None = None

    def __len__(self) -> int:
        return len(self._clients)

    def check(self, ip: str, key_id: int, now_ns: int) -> str | None:
        """None: sign it. Else the reason it is refused (PER_CLIENT or NEW_BUDGET)."""
        rid = key_id & RID_MASK
        limits = self.limits
        start, rids = self._clients.get(ip, (now_ns, ()))
        if not 0 <= now_ns - start < limits.window * 1e9:  # a new window (or the clock went back)
            start, rids = now_ns, ()
        if rid in rids:
            return None
        if len(rids) >= limits.per_client:
            return PER_CLIENT
        if rid not in self._known:
            if not self._spend(now_ns):
                return NEW_BUDGET
            if len(self._known) >= limits.max_clients:
                self._known = dict.fromkeys(islice(self._known, len(self._known) // 2, None))
            self._known[rid] = None
        if ip not in self._clients and len(self._clients) >= limits.max_clients:
            self._clients = dict(islice(self._clients.items(), len(self._clients) // 2, None))
        self._clients[ip] = (start, (*rids, rid))
        return None

    def _spend(self, now_ns: int) -> bool:
        limits = self.limits
        if self._last_ns is not None and now_ns > self._last_ns:
            self._tokens = min(float(limits.new_burst), self._tokens + (now_ns - self._last_ns) * limits.new_rate / 1e9)
        self._last_ns = now_ns
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True
