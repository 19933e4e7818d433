"""The `mssntp` plugin: MS-SNTP requests signed by Samba, asynchronously.

Strategy: a request from a configured domain network whose trailer is the MS-SNTP shape (20
bytes: key id little-endian + 16 ignored bytes) is claimed firmly, unless the legacy MAC plugin
knows its key id (the pipeline weighs both claims). The extended 120-byte form is counted and
dropped, since Samba cannot sign it. Signed replies let anyone brute-force machine passwords
offline ("Timeroast"), so requests are rate-limited per client and each address may have only a
few machine accounts signed (`accounts.py`, with a global budget for accounts no one asked for
recently); refusals are counted and logged. Then the request is handed, as a Defer, to the
`SigndClient` (`signer.py`: a niced thread of its own with a plain epoll loop), which builds the
reply header, transmit time included, as the request goes to Samba, and sends the signed reply:
the UDP listener never waits, and under saturation signing takes only the CPU that serving
leaves. A failed or late signature means no reply at all, never an unsigned one.
With no `networks` configured the plugin claims nothing: MS-SNTP is off until you say where
the domain is.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

from nts.config import Node, Reader, boolean, integer, listof, network, number, path, read_settings
from nts.core.decisions import Answer, Defer, drop
from nts.core.handler import ReplyContext, Request, RequestHandler
from nts.core.policy import RATE_OK, Network, NetworkSet, RateLimiter, RateSettings, Shared
from nts.core.stats import CounterHelp, Counters, GaugeHelp, SeriesHelp
from nts.logutil import RateLimitedLog

from .accounts import NEW_BUDGET, PER_CLIENT, RID_MASK, AccountGuard, AccountLimits
from .signer import NICE, SigndClient

log = logging.getLogger("ntsd.mssntp")
DEFAULT_SOCKET = "/var/lib/samba/ntp_signd/socket"
_KEY_LE = struct.Struct("<I")
_D_EXTENDED = drop("mssntp_extended_unsupported")
_D_RATE = drop("mssntp_rate_limited")
_D_ACCOUNTS = {reason: drop(f"mssntp_{reason}") for reason in (PER_CLIENT, NEW_BUDGET)}


@dataclass(frozen=True, slots=True)
class MsSntpSettings:
    socket: Path = Path(DEFAULT_SOCKET)
    networks: tuple[Network, ...] = ()
    connections: int = 4
    queue_size: int = 256
    deadline: float = 1.0
    rate: float = 1.0
    burst: int = 8
    max_clients: int = 100_000
    compensate: bool = True
    accounts_per_client: int = 4
    accounts_window: float = 3600.0
    new_accounts_rate: float = 2.0
    new_accounts_burst: int = 500

    @property
    def rate_settings(self) -> RateSettings:
        return RateSettings(rate=self.rate, burst=self.burst, max_clients=self.max_clients, kod=False)

    @property
    def account_limits(self) -> AccountLimits:
        return AccountLimits(self.accounts_per_client, self.accounts_window, self.new_accounts_rate,
                             self.new_accounts_burst, self.max_clients)  # fmt: skip


_READERS: dict[str, Reader] = {
    "socket": path,
    "networks": listof(network),
    "connections": integer(1, 64),
    "queue_size": integer(1, 100_000),
    "deadline": number(0.01, 30),
    "rate": number(0.001, 1e6),
    "burst": integer(1, 1_000_000),
    "max_clients": integer(16, 10_000_000),
    "compensate": boolean,
    "accounts_per_client": integer(1, 1_000_000),
    "accounts_window": number(1, 30 * 86400),
    "new_accounts_rate": number(0.001, 1e6),
    "new_accounts_burst": integer(1, 10_000_000),
}


def parse_mssntp(node: Node) -> MsSntpSettings:
    return read_settings(node, MsSntpSettings, _READERS)


class MsSntpPlugin(RequestHandler):
    """[MS-SNTP] authentication for Windows domain members, signed by Samba's ntp_signd. A
    `RequestHandler` for the pipeline and, structurally, an `nts.server.plugin.Plugin` for the shell."""

    name: ClassVar[str] = "mssntp"
    section: ClassVar[str] = "mssntp"
    order: ClassVar[int] = 30
    listens: ClassVar[bool] = False
    COUNTERS: ClassVar[CounterHelp] = {
        "mssntp_sign": (("outcome",), "MS-SNTP signing through Samba, by outcome."),
        "mssntp_sign_delay_us": ((), "Sum of MS-SNTP signing delays (queue + Samba), seconds."),
    }
    SERIES: ClassVar[SeriesHelp] = {
        "mssntp_sign": tuple(
            (o,) for o in ("signed", "refused", "connection_closed", "connection_lost", "protocol_error")
        ),
        "mssntp_sign_delay_us": ((),),
        "deferred": (("mssntp",),),
        "replies": (("mssntp",),),
    }
    GAUGES: ClassVar[GaugeHelp] = {
        "mssntp_rate_limit_clients": "Addresses in the MS-SNTP rate limiter (bounded by mssntp.max_clients).",
        "mssntp_account_clients": "Addresses whose signed machine accounts are remembered (mssntp.max_clients bounds).",
    }
    may_bind = True

    @classmethod
    def parse_config(cls, node: Node) -> MsSntpSettings:
        return parse_mssntp(node)

    @classmethod
    def listen_addresses(cls, settings: MsSntpSettings) -> tuple[tuple[str, int], ...]:
        return ()

    @classmethod
    def restart_only(cls, running: MsSntpSettings, new: MsSntpSettings) -> list[str]:
        return []

    @classmethod
    def check(cls, settings: MsSntpSettings) -> list[tuple[bool, str]]:
        if settings.socket.exists():
            return []
        return [(False, f"mssntp: {settings.socket} does not exist (yet): is Samba running with ntp_signd?")]

    @classmethod
    def describe(cls, settings: MsSntpSettings) -> list[str]:
        networks = ", ".join(str(n) for n in settings.networks) or "no one"
        return [f"mssntp: signing through {settings.socket} for {networks} (rate {settings.rate:g}/s, burst "
                f"{settings.burst}; {settings.accounts_per_client} machine accounts per address per "
                f"{settings.accounts_window:g} s)"]  # fmt: skip

    def __init__(self, settings: MsSntpSettings) -> None:
        self.stats = Counters()
        self.settings = settings
        self.networks = NetworkSet(settings.networks)
        self.limiter = RateLimiter(settings.rate_settings)
        self._workers = 1  # that share the budget for new accounts (share())
        self.accounts = AccountGuard(self._account_limits(settings))
        self._sweeps = RateLimitedLog(log, 60.0, logging.WARNING)
        self.client = SigndClient(settings.socket, self.stats, settings.connections, settings.queue_size,
                                  settings.deadline)  # fmt: skip
        self._last_extended_log = 0.0
        if not settings.networks:
            log.warning("mssntp.networks is empty: MS-SNTP requests are answered for no one")

    def matches(self, request: Request) -> int:
        if len(request.trailer) not in (20, 72) or request.client[0] not in self.networks:
            return 0
        return 2

    def respond(self, request: Request, ctx: ReplyContext) -> Answer:
        if len(request.trailer) == 72:
            now = time.monotonic()
            if now - self._last_extended_log > 60:
                self._last_extended_log = now
                log.info("MS-SNTP extended-authenticator requests (from %s and maybe others) are dropped: Samba "
                         "cannot sign them", request.client[0])  # fmt: skip
            return _D_EXTENDED
        if self.limiter.check(request.client[0], request.rx_ns) != RATE_OK:
            return _D_RATE
        (key_id,) = _KEY_LE.unpack_from(request.trailer)
        refused = self.accounts.check(request.client[0], key_id, request.rx_ns)
        if refused is not None:
            self._refused(refused, request.client[0], key_id & RID_MASK)
            return _D_ACCOUNTS[refused]
        # The header, and so the transmit timestamp, is made by the signer as the request goes to
        # Samba, not when the datagram arrived: the hand-over and the queue are not counted in T3.
        # With `compensate`, T3 is moved on by the recent signing delay, the time the signed reply
        # takes to come back from Samba before it leaves (measured: README).
        build = partial(_compensated if self.settings.compensate else _uncompensated, ctx, request.data, request.rx_ns)
        return Defer(self.client, (key_id, build), self.name, request.client)

    def _account_limits(self, settings: MsSntpSettings) -> AccountLimits:
        """The account limits this process enforces: with workers, its share of the new-account budget."""
        limits, workers = settings.account_limits, self._workers
        return replace(limits, new_rate=limits.new_rate / workers, new_burst=max(1, limits.new_burst // workers))

    def _refused(self, reason: str, ip: str, rid: int) -> None:
        limits = self.settings.account_limits
        if reason == PER_CLIENT:
            self._sweeps(reason, "MS-SNTP: %s asked for a machine account (RID %d) beyond %d per %g s, refused: "
                         "a password-harvesting sweep (Timeroast)?", ip, rid, limits.per_client,
                         limits.window)  # fmt: skip
        else:
            self._sweeps(reason, "MS-SNTP: more machine accounts asked for than new_accounts_rate allows (%g/s), "
                         "refused (RID %d from %s): a password-harvesting sweep (Timeroast)?", limits.new_rate, rid,
                         ip)  # fmt: skip

    async def start(self) -> None:
        await self.client.start()
        self._announce()

    def _announce(self) -> None:
        log.info("MS-SNTP signing through %s for %s (on a thread of its own%s)", self.settings.socket,
                 ", ".join(map(str, self.settings.networks)) or "no networks",
                 f", at nice +{NICE}" if self.client.niced else "")  # fmt: skip

    async def stop(self) -> None:
        await self.client.stop()

    def reconfigure(self, settings: MsSntpSettings) -> bool:
        """Applied in place, so a reload keeps the connections to Samba, the requests waiting for a
        signature and the counters; a new socket, connection count or queue size needs a new client."""
        new, old = settings, self.settings
        if (new.socket, new.connections, new.queue_size) != (old.socket, old.connections, old.queue_size):
            return False
        if new.rate_settings != old.rate_settings:
            self.limiter = RateLimiter(new.rate_settings)
        if new.account_limits != old.account_limits:
            self.accounts = AccountGuard(self._account_limits(new))
        self.networks = NetworkSet(new.networks)
        self.client.deadline = new.deadline
        self.settings = new
        if new.networks != old.networks:
            self._announce()
        return True

    def counters(self) -> Mapping[tuple[str, ...], int]:
        return self.stats.snapshot()

    def reports(self) -> Mapping[str, Any]:
        return {}

    def close(self) -> None:
        """Nothing to release: stop() closed the connections to Samba."""

    def share(self, shared: Shared) -> None:
        """Each worker takes its share of the budget for new accounts (the other limits are per
        client, and each client reaches one worker)."""
        if shared.workers != self._workers:
            self._workers = shared.workers
            self.accounts = AccountGuard(self._account_limits(self.settings))

    def gauges(self) -> Mapping[str, float]:
        return {"mssntp_rate_limit_clients": len(self.limiter), "mssntp_account_clients": len(self.accounts)}


def _compensated(ctx: ReplyContext, data: bytes, rx_ns: int, compensation_ns: int) -> bytes:
    return ctx.reply_header(data, rx_ns, compensation_ns)


def _uncompensated(ctx: ReplyContext, data: bytes, rx_ns: int, _compensation_ns: int) -> bytes:
    return ctx.reply_header(data, rx_ns)
