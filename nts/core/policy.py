"""Access lists and per-client rate limiting.

Strategy: both are asked once per datagram, so both are built for the hot path. Access verdicts are
cached per address string (parsing an address costs more than the rest of a reply); the cache is
bounded and cleared wholesale when full. The rate limiter is GCRA (one integer "theoretical arrival
time" per client): a client may run `burst` requests ahead of its average `rate`. Its table is
bounded by `max_clients`; when full, the older half is discarded in one O(n) pass, so memory stays
bounded under a flood from spoofed addresses and eviction stays amortised O(1).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOW = 0
DENIED = 1  # matched the deny list
RESTRICTED = 2  # not in a non-empty allow list
_CACHE_MAX = 65536


def _address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a client string names (zone dropped; v4-mapped IPv6 judged as IPv4)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _contains(networks: tuple[Network, ...], addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return any(addr.version == n.version and addr in n for n in networks)


class NetworkSet:
    """A set of CIDR networks with a cached membership test keyed by address string."""

    __slots__ = ("_cache", "networks")

    def __init__(self, networks: Iterable[Network]) -> None:
        self.networks = tuple(networks)
        self._cache: dict[str, bool] = {}

    def __contains__(self, ip: str) -> bool:
        hit = self._cache.get(ip)
        if hit is None:
            addr = _address(ip)
            if addr is None:
                return False
            hit = _contains(self.networks, addr)
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[ip] = hit
        return hit


class AccessPolicy:
    """allow/deny lists: deny wins; a non-empty allow list admits only its networks."""

    __slots__ = ("_allow", "_cache", "_deny")

    def __init__(self, allow: Iterable[Network] = (), deny: Iterable[Network] = ()) -> None:
        self._allow = tuple(allow)
        self._deny = tuple(deny)
        self._cache: dict[str, int] = {}

    @property
    def open(self) -> bool:
        """True when every address is allowed (the pipeline then skips the check)."""
        return not self._allow and not self._deny

    def check(self, ip: str) -> int:
        verdict = self._cache.get(ip)
        if verdict is None:
            verdict = self._decide(ip)
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[ip] = verdict
        return verdict

    def _decide(self, ip: str) -> int:
        addr = _address(ip)
        if addr is None:
            return DENIED
        if _contains(self._deny, addr):
            return DENIED
        if self._allow and not _contains(self._allow, addr):
            return RESTRICTED
        return ALLOW


@dataclass(frozen=True, slots=True)
class Shared:
    """What the server shares with a plugin's own services (NTS-KE, say): its access lists, the
    worker processes that divide the plugin's budgets (each worker enforces its share), and the
    ports NTP is served on."""

    access: AccessPolicy
    workers: int = 1
    ntp_ports: tuple[int, ...] = (123,)  # where the server answers NTP (ntp.listen)

    def share(self, budget: float) -> float:
        """One worker's part of a budget (a rate) for the whole server."""
        return budget / self.workers

    def count(self, budget: int) -> int:
        """One worker's part of a whole-server count (a burst, a connection limit), at least 1."""
        return max(1, budget // self.workers)


@dataclass(frozen=True, slots=True)
class RateSettings:
    rate: float = 2.0  # sustained requests per second per client address
    burst: int = 16  # requests a client may send back to back
    max_clients: int = 100_000  # bound on tracked addresses
    kod: bool = True  # answer excess requests with RATE KoD (else drop silently)
    kod_interval: float = 1.0  # at most one RATE KoD per client per this many seconds


RATE_OK = 0
RATE_KOD = 1
RATE_DROP = 2


class KissLimiter:
    """At most one Kiss-o'-Death per client address per interval, in a bounded table: a KoD goes to
    the request's source address, which a spoofer chooses, so unlimited KoDs make a reflector."""

    __slots__ = ("_at", "_interval", "_max")

    def __init__(self, interval_s: float, max_clients: int) -> None:
        self._interval = int(interval_s * 1e9)
        self._max = max_clients
        self._at: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._at)

    def allow(self, ip: str, now_ns: int) -> bool:
        last = self._at.get(ip)
        if last is not None and 0 <= now_ns - last < self._interval:  # (< 0: the clock went back)
            return False
        if last is None and len(self._at) >= self._max:
            self._at = _keep_newer_half(self._at)
        self._at[ip] = now_ns
        return True


class RateLimiter:
    """GCRA per client address with a bounded table."""

    __slots__ = ("_interval", "_kod", "_kods", "_max", "_stepped", "_tat", "_tolerance")

    def __init__(self, settings: RateSettings) -> None:
        self._interval = int(1e9 / settings.rate)
        self._tolerance = self._interval * (settings.burst - 1)
        self._stepped = self._tolerance + self._interval  # a TAT further ahead than this: the clock went back
        self._max = settings.max_clients
        self._kod = settings.kod
        self._kods = KissLimiter(settings.kod_interval, settings.max_clients)
        self._tat: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._tat)

    def check(self, ip: str, now_ns: int) -> int:
        tat = self._tat.get(ip)
        if tat is None or tat - now_ns > self._stepped:  # new, or the clock was stepped back
            if tat is None and len(self._tat) >= self._max:
                self._tat = _keep_newer_half(self._tat)
            self._tat[ip] = now_ns + self._interval
            return RATE_OK
        if tat < now_ns:
            tat = now_ns
        if tat - now_ns > self._tolerance:
            return self._excess(ip, now_ns)
        self._tat[ip] = tat + self._interval
        return RATE_OK

    def _excess(self, ip: str, now_ns: int) -> int:
        return RATE_KOD if self._kod and self._kods.allow(ip, now_ns) else RATE_DROP


def _keep_newer_half(table: dict[str, int]) -> dict[str, int]:
    return dict(islice(table.items(), len(table) // 2, None))
