"""One process's serving: UDP listeners with their pipelines, the plugins, the clock-state refresh.

Strategy: the plugins, access lists and rate limiter are shared by the listeners' pipelines; each
listener owns its counters (one writer each), which it hands to every pipeline it is given, and
they are summed on demand. A reload builds the new parts first, reuses plugins that can take their
new section in place, then gives each listener a new pipeline between two datagrams. The plain
mode is the core's own handler, always in the pipeline, after every plugin that answers requests.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Mapping
from typing import Any

from ..config import Config, PluginError
from ..core.clockstate import server_state
from ..core.handler import RequestHandler
from ..core.interleave import TxTimestamps
from ..core.pipeline import Pipeline
from ..core.plain import PlainHandler
from ..core.policy import AccessPolicy, KissLimiter, NetworkSet, RateLimiter, RateSettings, Shared
from ..core.stats import Counters, Key, add
from ..logutil import ALIKE, RateLimitedLog
from ..net import format_addr
from .hwstamp import PhcClock
from .kernelclock import read_kernel_clock
from .plugin import Plugin
from .udp import UdpListener, open_udp_socket

log = logging.getLogger("ntsd")


def build_plugins(
    config: Config,
    plugins: Mapping[str, type[Plugin]],
    old: list[Plugin] | None = None,
    may_bind: bool = True,
) -> tuple[list[Plugin], list[Plugin]]:
    """The plugins `config` enables, and those of `old` no longer in use.

    An existing instance is kept when it can apply its new section in place (`reconfigure`), so
    its listeners and connections survive a reload. Raises PluginError when a new one cannot start.
    A worker (`may_bind` False) keeps the plugins that listen as they started: it neither builds
    nor retires one (the main process says that a restart applies such a change).
    """
    previous = {a.name: a for a in old or []}
    current: list[Plugin] = []
    retired: list[Plugin] = []
    for cls in plugins.values():
        enabled = cls.section in config.plugins
        section = config.plugins.get(cls.section)
        if cls.listens and not may_bind:
            kept = previous.pop(cls.name, None)
            if kept is not None:
                kept.may_bind = False  # so that it keeps its sockets while it reconfigures
                if enabled:
                    kept.reconfigure(section)
                current.append(kept)
            continue
        if not enabled:
            continue
        existing = previous.pop(cls.name, None)
        if existing is not None and existing.reconfigure(section):
            current.append(existing)
            continue
        if existing is not None:
            retired.append(existing)
        current.append(cls(section))
    retired.extend(previous.values())
    return current, retired


class DropLog:
    """One log line per drop reason per interval (every drop is counted in the metrics anyway)."""

    def __init__(self, interval: float = 10.0) -> None:
        self._log = RateLimitedLog(log, interval)

    def __call__(self, reason: str, addr: tuple[str, int]) -> None:
        self._log(reason, "dropped a request from %s: %s", format_addr(addr), reason)


class Server:
    """One process's serving: UDP listeners, each with a pipeline, and the clock-state refresh."""

    def __init__(
        self,
        config: Config,
        plugins: Mapping[str, type[Plugin]],
        precision: int,
        authenticators: list[Plugin],
        phc: PhcClock | None = None,
    ) -> None:
        self.plugins = plugins
        self.precision = precision
        self.phc = phc  # hardware timestamps' clock (ntp.hwtimestamp), measured with the clock state
        self.listeners: dict[tuple[str, int], UdpListener] = {}
        self.drop_log = DropLog()
        self.config = config
        self.authenticators = authenticators
        self.plain = PlainHandler()
        self._kernel_drops_closed = 0  # those of sockets a reload closed
        self._kernel_drops_seen = 0  # at the last state refresh, to log an increase
        self._kernel_drops_logged = -60.0
        self._folded: dict[tuple[str, ...], int] = {}
        self._alarm: bool | None = None
        self._deny_kods_settings: tuple[float, int] | None = None
        self._parts(config, keep_rate=None)

    async def start_plugins(self) -> None:
        for auth in self.authenticators:
            await auth.start()

    async def stop_plugins(self, auths: list[Plugin] | None = None) -> None:
        for auth in self.authenticators if auths is None else auths:
            try:
                await auth.stop()
            finally:
                auth.close()

    def _parts(self, config: Config, keep_rate: RateLimiter | None) -> None:
        self.access = AccessPolicy(config.access.allow, config.access.deny)
        kisses = config.rate_limit or RateSettings()  # DENY/RSTR KoDs limited like RATE KoDs, always
        if (kisses.kod_interval, kisses.max_clients) != self._deny_kods_settings:  # else kept, as the rate table
            self._deny_kods_settings = (kisses.kod_interval, kisses.max_clients)
            self.deny_kods = KissLimiter(kisses.kod_interval, kisses.max_clients)
        shared = Shared(self.access, config.ntp.workers, tuple(port for _, port in config.ntp.listen))
        for plugin in self.authenticators:
            plugin.share(shared)
        self.require_auth = NetworkSet(config.access.require_auth)
        if keep_rate is not None:
            self.rate: RateLimiter | None = keep_rate
        else:
            self.rate = RateLimiter(config.rate_limit) if config.rate_limit is not None else None
        self.state = server_state(config.clock, read_kernel_clock(), self.precision, time.time_ns())
        self._log_state()

    def new_pipeline(
        self,
        stats: Counters | None = None,
        deferred_stats: Counters | None = None,
        timestamps: TxTimestamps | None = None,
    ) -> Pipeline:
        """A pipeline over the running parts, counting into the sinks given (a listener's), with the
        listener's interleaved-mode table."""
        handlers = [a for a in self.authenticators if isinstance(a, RequestHandler)]
        return Pipeline(
            state=self.state,
            authenticators=[*handlers, self.plain],
            clock=time.time_ns,
            stats=stats,
            deferred_stats=deferred_stats,
            access=self.access,
            deny_kod=self.config.access.deny_kod,
            deny_kods=self.deny_kods,
            rate=self.rate,
            require_auth=self.require_auth,
            timestamps=timestamps,
        )

    def adopt(self, sockets: Mapping[tuple[str, int], socket.socket], loop: asyncio.AbstractEventLoop) -> None:
        for addr, sock in sockets.items():
            ntp = self.config.ntp
            listener = UdpListener(sock, self.new_pipeline, self.drop_log, ntp.batch, ntp.max_hold_us * 1000,
                                   ntp.correct_transmit, self.phc)  # fmt: skip
            listener.start(loop)
            self.listeners[addr] = listener

    async def reload(self, config: Config, loop: asyncio.AbstractEventLoop, may_bind: bool) -> bool:
        """Apply `config`; False when it was refused (the running configuration stays)."""
        try:
            auths, retired = build_plugins(config, self.plugins, self.authenticators, may_bind)
        except PluginError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            return False
        running = self.authenticators
        same_rate = self.config.rate_limit == config.rate_limit
        self.config = config
        self.authenticators = auths
        self._parts(config, keep_rate=self.rate if same_rate else None)  # (plugins get the access lists)
        for auth in auths:
            if auth not in running:
                await auth.start()
        for listener in self.listeners.values():
            listener.renew(self.new_pipeline)
            listener.hold_ns = config.ntp.max_hold_us * 1000  # (a new ntp.batch waits for a restart)
            listener.correct(config.ntp.correct_transmit)
        await self.stop_plugins(retired)
        if not may_bind:  # a worker: the supervisor says it once every worker is done
            log.debug("configuration reloaded from %s in this worker", config.source)
            return True
        log.info("configuration reloaded from %s", config.source)
        wanted = set(config.ntp.listen)
        for addr in list(self.listeners):
            if addr not in wanted:
                listener = self.listeners.pop(addr)
                self._kernel_drops_closed += listener.kernel_drops()
                listener.stop()
                add(self._folded, listener.counters())
                log.info("stopped listening on %s", format_addr(addr))
        for addr in sorted(wanted - set(self.listeners)):
            try:
                sock = open_udp_socket(*addr, hardware=self.phc is not None)
            except OSError as exc:
                log.error("cannot listen on %s: %s", format_addr(addr), exc.strerror)
                continue
            self.adopt({addr: sock}, loop)
            log.info("listening on %s", format_addr(addr))
        return True

    def refresh_state(self) -> None:
        if self.phc is not None:
            self.phc.measure()
        self.state = server_state(self.config.clock, read_kernel_clock(), self.precision, time.time_ns())
        self._log_state()
        self._log_kernel_drops()
        for listener in self.listeners.values():
            listener.pipeline.set_state(self.state)

    def _kernel_drops(self) -> int:
        return self._kernel_drops_closed + sum(listener.kernel_drops() for listener in list(self.listeners.values()))

    def _log_kernel_drops(self) -> None:
        """A warning, at most once a minute, when the kernel dropped requests we never saw."""
        now = time.monotonic()
        if now - self._kernel_drops_logged < 60:
            return
        drops = self._kernel_drops()
        if drops > self._kernel_drops_seen:
            log.warning(
                "the kernel dropped %d requests since the last report: the receive buffers were full (more load "
                "than this server takes; see ntp.workers)",
                drops - self._kernel_drops_seen,
            )
            self._kernel_drops_logged = now
        self._kernel_drops_seen = drops

    def _log_state(self) -> None:
        """Say so when the clock state changes whether clients will use our time."""
        alarm = self.state.leap == 3
        if alarm == self._alarm:
            return
        self._alarm = alarm
        if alarm:
            log.warning(
                "the kernel clock is not synchronised: replies say leap 3 (alarm), stratum 16, and clients "
                "will not use them; run a synchronising daemon, or set clock.local_reference for a lab",
                extra=ALIKE,
            )
        else:
            log.info("serving time as stratum %d (reference %s)", self.state.stratum, _refid(self.state.reference_id))

    def counters(self) -> dict[Key, int]:
        total = dict(self._folded)
        for listener in list(self.listeners.values()):
            add(total, listener.counters())
        total[("kernel_drops",)] = self._kernel_drops()
        for auth in self.authenticators:
            add(total, auth.counters())
        return total

    def reports(self) -> dict[str, Any]:
        """Plugin reports by name; lists from several plugins under one name are joined."""
        merged: dict[str, Any] = {}
        for auth in self.authenticators:
            for name, value in auth.reports().items():
                merged[name] = merged.get(name, []) + value if isinstance(value, list) else value
        return merged

    def gauges(self) -> dict[str, float]:
        out: dict[str, float] = {
            "leap": self.state.leap,
            "stratum": self.state.stratum,
            "rate_limit_clients": len(self.rate) if self.rate is not None else 0,
        }
        for auth in self.authenticators:
            out.update(auth.gauges())
        for listener in list(self.listeners.values()):  # the largest lag, the largest table of this process's
            for name, value in listener.gauges().items():
                out[name] = max(out.get(name, value), value)
        return out

    def close(self) -> None:
        for listener in self.listeners.values():
            listener.stop()
        self.listeners.clear()


def _refid(ref: bytes) -> str:
    """A reference id as operators write it: ASCII text (LOCL, GPS) or an IPv4 address's dotted quad."""
    text = ref.rstrip(b"\0")
    if text and text.isascii() and text.decode().isprintable():
        return text.decode()
    return ".".join(str(b) for b in ref)
