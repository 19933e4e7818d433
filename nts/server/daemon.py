"""The daemon: binds sockets, runs the pipeline, reloads on SIGHUP, stops cleanly on SIGTERM/SIGINT.

Strategy: everything privileged happens first (bind every socket, for every worker), then the
process optionally drops to an unprivileged user. With `workers > 1` the parent forks that many
children that share the listen ports through SO_REUSEPORT; each child publishes a snapshot of its
counters to a shared memory slot every second and the parent serves their sum as metrics. A reload
validates the new file first and keeps the running configuration when it is broken; sockets whose
addresses did not change are kept, so no packet is lost across a reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import logging
import mmap
import os
import pwd
import signal
import socket
import struct
import sys
import time
from collections.abc import Mapping
from typing import Any

from .. import __version__
from ..config import Config, ConfigError, format_addr, load_config
from ..core.auth import Authenticator, PluginError, discover
from ..core.clockstate import server_state
from ..core.pipeline import Pipeline
from ..core.policy import AccessPolicy, NetworkSet, RateLimiter
from ..logutil import RateLimitedLog
from .kernelclock import measure_precision, read_kernel_clock
from .metrics import MetricsServer
from .udp import UdpListener, open_tcp_listener, open_udp_socket

log = logging.getLogger("ntsd")

STATE_INTERVAL = 1.0  # seconds between kernel clock reads
SLOT_SIZE = 1 << 18  # shared memory per worker for its counter snapshot
_SLOT_HEAD = struct.Struct("<II")  # generation, length


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


def plugin_sections(plugins: Mapping[str, type[Authenticator]]) -> dict[str, type[Authenticator]]:
    return {cls.section: cls for cls in plugins.values() if cls.section}


def build_authenticators(
    config: Config, plugins: Mapping[str, type[Authenticator]], old: list[Authenticator] | None = None
) -> tuple[list[Authenticator], list[Authenticator]]:
    """The authenticators `config` enables, and those of `old` no longer in use.

    An existing instance is kept when it can apply its new section in place (`reconfigure`), so
    its listeners and connections survive a reload. Raises PluginError when a new one cannot start.
    """
    previous = {a.name: a for a in old or []}
    current: list[Authenticator] = []
    retired: list[Authenticator] = []
    for cls in plugins.values():
        if cls.section is not None and cls.section not in config.plugins:
            continue
        section = config.plugins.get(cls.section) if cls.section else None
        existing = previous.pop(cls.name, None)
        if existing is not None and (cls.section is None or existing.reconfigure(section)):
            current.append(existing)
            continue
        if existing is not None:
            retired.append(existing)
        current.append(cls() if cls.section is None else cls(section))  # type: ignore[call-arg]
    retired.extend(previous.values())
    return current, retired


class DropLog:
    """One log line per drop reason per interval (every drop is counted in the metrics anyway)."""

    def __init__(self, interval: float = 10.0) -> None:
        self._log = RateLimitedLog(log, interval)

    def __call__(self, reason: str, addr: tuple[str, int]) -> None:
        self._log(reason, "dropped a request from %s: %s", format_addr(addr), reason)


class Server:
    """One process's serving: UDP listeners, each with a pipeline, and the clock-state refresh.

    Authenticators, access lists and the rate limiter are shared by the listeners' pipelines;
    counters are per pipeline and summed here. Pipelines replaced by a reload are summed for a
    grace period (a listener may be finishing one datagram on the old one) and then folded.
    """

    RETIRE_GRACE = 5.0

    def __init__(
        self,
        config: Config,
        plugins: Mapping[str, type[Authenticator]],
        precision: int,
        authenticators: list[Authenticator],
    ) -> None:
        self.plugins = plugins
        self.precision = precision
        self.listeners: dict[tuple[str, int], UdpListener] = {}
        self.drop_log = DropLog()
        self.config = config
        self.authenticators = authenticators
        self._retiring: list[tuple[float, Pipeline]] = []
        self._folded: dict[tuple[str, ...], int] = {}
        self._alarm: bool | None = None
        self._parts(config, keep_rate=None)

    async def start_plugins(self) -> None:
        for auth in self.authenticators:
            await auth.start()

    async def stop_plugins(self, auths: list[Authenticator] | None = None) -> None:
        for auth in self.authenticators if auths is None else auths:
            try:
                await auth.stop()
            finally:
                auth.close()

    def _parts(self, config: Config, keep_rate: RateLimiter | None) -> None:
        self.access = AccessPolicy(config.access.allow, config.access.deny)
        self.require_auth = NetworkSet(config.access.require_auth)
        if keep_rate is not None:
            self.rate: RateLimiter | None = keep_rate
        else:
            self.rate = RateLimiter(config.rate_limit) if config.rate_limit is not None else None
        self.state = server_state(config.clock, read_kernel_clock(), self.precision, time.time_ns())
        self._log_state()

    def new_pipeline(self) -> Pipeline:
        return Pipeline(
            state=self.state,
            authenticators=self.authenticators,
            clock=time.time_ns,
            access=self.access,
            deny_kod=self.config.access.deny_kod,
            rate=self.rate,
            require_auth=self.require_auth,
        )

    def adopt(self, sockets: Mapping[tuple[str, int], socket.socket], loop: asyncio.AbstractEventLoop) -> None:
        for addr, sock in sockets.items():
            listener = UdpListener(sock, self.new_pipeline(), self.drop_log)
            listener.start(loop)
            self.listeners[addr] = listener

    async def reload(self, config: Config, loop: asyncio.AbstractEventLoop, may_bind: bool) -> None:
        try:
            auths, retired = build_authenticators(config, self.plugins, self.authenticators)
        except PluginError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            return
        for auth in auths:
            if auth not in self.authenticators:
                await auth.start()
        same_rate = self.config.rate_limit == config.rate_limit
        self.config = config
        self.authenticators = auths
        self._parts(config, keep_rate=self.rate if same_rate else None)
        now = time.monotonic()
        for listener in self.listeners.values():
            self._retiring.append((now, listener.pipeline))
            listener.pipeline = self.new_pipeline()
        await self.stop_plugins(retired)
        log.info("configuration reloaded from %s", config.source)
        if not may_bind:
            return
        wanted = set(config.ntp.listen)
        for addr in list(self.listeners):
            if addr not in wanted:
                listener = self.listeners.pop(addr)
                listener.stop()
                self._retiring.append((now, listener.pipeline))
                log.info("stopped listening on %s", format_addr(addr))
        for addr in sorted(wanted - set(self.listeners)):
            try:
                sock = open_udp_socket(*addr)
            except OSError as exc:
                log.error("cannot listen on %s: %s", format_addr(addr), exc.strerror)
                continue
            self.adopt({addr: sock}, loop)
            log.info("listening on %s", format_addr(addr))

    def refresh_state(self) -> None:
        self.state = server_state(self.config.clock, read_kernel_clock(), self.precision, time.time_ns())
        self._log_state()
        for listener in self.listeners.values():
            listener.pipeline.set_state(self.state)

    def _log_state(self) -> None:
        """Say so when the clock state changes whether clients will use our time."""
        alarm = self.state.leap == 3
        if alarm == self._alarm:
            return
        self._alarm = alarm
        if alarm:
            log.warning(
                "the kernel clock is not synchronised: replies say leap 3 (alarm), stratum 16, and clients "
                "will not use them; run a synchronising daemon, or set clock.local_reference for a lab"
            )
        else:
            log.info("serving time as stratum %d (reference %r)", self.state.stratum, self.state.reference_id)

    def counters(self) -> dict[tuple[str, ...], int]:
        now = time.monotonic()
        while self._retiring and now - self._retiring[0][0] > self.RETIRE_GRACE:
            _, old = self._retiring.pop(0)
            _add(self._folded, old.counters())
        total = dict(self._folded)
        for _, old in self._retiring:
            _add(total, old.counters())
        for listener in list(self.listeners.values()):
            _add(total, listener.pipeline.counters())
        for auth in self.authenticators:
            _add(total, auth.counters())
        return total

    def reports(self) -> dict[str, Any]:
        """Plugin reports by name; lists from several plugins under one name are joined."""
        merged: dict[str, Any] = {}
        for auth in self.authenticators:
            for name, value in auth.reports().items():
                merged[name] = merged.get(name, []) + value if isinstance(value, list) else value
        return merged

    def gauges(self) -> dict[str, float]:
        return {
            "leap": self.state.leap,
            "stratum": self.state.stratum,
            "rate_limit_clients": len(self.rate) if self.rate is not None else 0,
        }

    def close(self) -> None:
        for listener in self.listeners.values():
            listener.stop()
        self.listeners.clear()


def _add(total: dict[tuple[str, ...], int], more: Mapping[tuple[str, ...], int]) -> None:
    for key, value in more.items():
        total[key] = total.get(key, 0) + value


def bind_all(config: Config, copies: int) -> list[dict[tuple[str, int], socket.socket]]:
    """Bind every listen address `copies` times (SO_REUSEPORT when more than one)."""
    sets: list[dict[tuple[str, int], socket.socket]] = [{} for _ in range(copies)]
    try:
        for addr in config.ntp.listen:
            for i in range(copies):
                sets[i][addr] = open_udp_socket(*addr, reuse_port=copies > 1)
    except OSError as exc:
        for s in sets:
            for sock in s.values():
                sock.close()
        hint = ""
        if exc.errno in (13, 1) and addr[1] < 1024:
            hint = " (ports below 1024 need root or CAP_NET_BIND_SERVICE; or set ntp.listen to a higher port)"
        elif exc.errno == 98:
            hint = " (another NTP server is probably running on it)"
        elif exc.errno == 99:
            hint = " (no such local address on this host)"
        raise StartupError(f"cannot listen on {format_addr(addr)}: {exc.strerror}{hint}") from None
    return sets


def drop_privileges(user: str | None, group: str | None) -> None:
    if user is None and group is None:
        return
    try:
        pw = pwd.getpwnam(user) if user else None
        gid = grp.getgrnam(group).gr_gid if group else (pw.pw_gid if pw else os.getgid())
    except KeyError as exc:
        raise StartupError(f"cannot drop privileges: no such user or group {exc.args[0]}") from None
    try:
        os.setgroups([gid])
        os.setgid(gid)
        if pw is not None:
            os.setuid(pw.pw_uid)
    except PermissionError:
        raise StartupError("cannot drop privileges: not running as root") from None
    log.info("running as user %s, group %s", user or os.getuid(), group or gid)


def setup_logging(config: Config) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    handler = logging.FileHandler(config.log.file) if config.log.file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s ntsd[%(process)d] %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(config.log.level)


class SharedCounters:
    """Per-worker counter snapshots in anonymous shared memory, summed by the parent."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.mem = mmap.mmap(-1, SLOT_SIZE * workers)
        self._last: list[dict[tuple[str, ...], int]] = [{} for _ in range(workers)]
        self._last_reports: list[dict[str, Any]] = [{} for _ in range(workers)]

    def publish(
        self,
        index: int,
        counts: Mapping[tuple[str, ...], int],
        gauges: Mapping[str, float],
        reports: Mapping[str, Any] | None = None,
    ) -> None:
        doc: dict[str, Any] = {"c": [[list(k), v] for k, v in counts.items()], "g": gauges, "r": reports or {}}
        blob = json.dumps(doc).encode()
        while len(blob) > SLOT_SIZE - _SLOT_HEAD.size and doc["r"]:
            # reports are the large part: keep the most recent half of each until the slot holds it
            doc["r"] = {k: v[: len(v) // 2] for k, v in doc["r"].items() if isinstance(v, list) and len(v) > 1}
            blob = json.dumps(doc).encode()
        if len(blob) > SLOT_SIZE - _SLOT_HEAD.size:
            return
        base = index * SLOT_SIZE
        gen = _SLOT_HEAD.unpack_from(self.mem, base)[0] + 1
        self.mem[base + _SLOT_HEAD.size : base + _SLOT_HEAD.size + len(blob)] = blob
        _SLOT_HEAD.pack_into(self.mem, base, gen, len(blob))

    def total(self) -> tuple[dict[tuple[str, ...], int], dict[str, float]]:
        counts: dict[tuple[str, ...], int] = {}
        gauges: dict[str, float] = {}
        for i in range(self.workers):
            base = i * SLOT_SIZE
            _, length = _SLOT_HEAD.unpack_from(self.mem, base)
            try:
                data = json.loads(self.mem[base + _SLOT_HEAD.size : base + _SLOT_HEAD.size + length])
                self._last[i] = {tuple(k): v for k, v in data["c"]}
                self._last_reports[i] = data.get("r", {})
                for k, v in data["g"].items():
                    gauges[k] = gauges.get(k, 0) + v if k == "rate_limit_clients" else v
            except (ValueError, KeyError, TypeError):
                pass  # torn read: use the previous snapshot
            for k, v in self._last[i].items():
                counts[k] = counts.get(k, 0) + v
        gauges["workers"] = self.workers
        return counts, gauges

    def reports(self) -> dict[str, Any]:
        self.total()  # refresh the snapshots
        merged: dict[str, Any] = {}
        for worker in self._last_reports:
            for name, value in worker.items():
                merged[name] = merged.get(name, []) + value if isinstance(value, list) else value
        return merged


class Daemon:
    """Process lifecycle around one or more Servers."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self.plugins = discover()
        self.stopping: asyncio.Event | None = None
        self.children: list[int] = []
        self.started = time.time()
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    def load(self) -> Config:
        return load_config(self.config_path, plugin_sections(self.plugins))

    def run(self) -> int:
        config = self.load()
        setup_logging(config)
        workers = config.ntp.workers
        socket_sets = bind_all(config, workers)
        metrics_sock = None
        if config.metrics_listen is not None:
            metrics_sock = _bind_tcp(config.metrics_listen)
        try:
            auths, _ = build_authenticators(config, self.plugins)
        except PluginError as exc:
            raise StartupError(str(exc)) from None
        drop_privileges(config.ntp.user, config.ntp.group)
        precision = measure_precision()
        log.info("ntsd %s starting (%s)", __version__, config.source)
        if workers == 1:
            return asyncio.run(self._serve_one(config, socket_sets[0], metrics_sock, precision, auths))
        shared = SharedCounters(workers)
        for index, sockets in enumerate(socket_sets):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    if metrics_sock is not None:
                        metrics_sock.close()
                    for other in socket_sets:
                        if other is not sockets:
                            for s in other.values():
                                s.close()
                    code = asyncio.run(self._serve_worker(config, sockets, precision, shared, index, auths))
                finally:
                    os._exit(code)
            self.children.append(pid)
        for sockets in socket_sets:
            for s in sockets.values():
                s.close()
        for auth in auths:
            auth.close()  # the workers hold their own copies
        return asyncio.run(self._supervise(config, metrics_sock, shared))

    def _signals(self, loop: asyncio.AbstractEventLoop, on_hup: Any) -> asyncio.Event:
        stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        loop.add_signal_handler(signal.SIGHUP, on_hup)
        return stopping

    async def _serve_one(
        self,
        config: Config,
        sockets: dict[tuple[str, int], socket.socket],
        metrics_sock: socket.socket | None,
        precision: int,
        auths: list[Authenticator],
    ) -> int:
        loop = asyncio.get_running_loop()
        server = Server(config, self.plugins, precision, auths)
        server.adopt(sockets, loop)
        for addr in sockets:
            log.info("serving NTP on %s", format_addr(addr))
        await server.start_plugins()
        stopping = self._signals(loop, lambda: self._reload(server, loop, may_bind=True))
        metrics = None
        if metrics_sock is not None:
            metrics = MetricsServer(lambda: (server.counters(), {**server.gauges(), **self._uptime()}), server.reports)
            await metrics.start_on(metrics_sock)
            log.info("metrics on http://%s/metrics", format_addr(metrics_sock.getsockname()))
        log.info("ready")
        await self._tick_until(stopping, server.refresh_state)
        log.info("shutting down")
        if metrics is not None:
            await metrics.stop()
        server.close()
        await server.stop_plugins()
        log.info("stopped")
        return 0

    def _reload(self, server: Server, loop: asyncio.AbstractEventLoop, may_bind: bool) -> None:
        """SIGHUP: validate the file, then apply it (one reload at a time)."""
        try:
            new = self.load()
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            return
        if may_bind:
            setup_logging(new)

        async def apply() -> None:
            async with self._reload_lock:
                await server.reload(new, loop, may_bind)

        task = loop.create_task(apply())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_worker(
        self,
        config: Config,
        sockets: dict[tuple[str, int], socket.socket],
        precision: int,
        shared: SharedCounters,
        index: int,
        auths: list[Authenticator],
    ) -> int:
        loop = asyncio.get_running_loop()
        server = Server(config, self.plugins, precision, auths)
        server.adopt(sockets, loop)
        await server.start_plugins()
        stopping = self._signals(loop, lambda: self._reload(server, loop, may_bind=False))

        def tick() -> None:
            server.refresh_state()
            shared.publish(index, server.counters(), server.gauges(), server.reports())

        await self._tick_until(stopping, tick)
        tick()
        server.close()
        await server.stop_plugins()
        return 0

    async def _supervise(self, config: Config, metrics_sock: socket.socket | None, shared: SharedCounters) -> int:
        loop = asyncio.get_running_loop()

        def on_hup() -> None:
            try:
                new = self.load()
            except ConfigError as exc:
                log.error("reload refused, keeping the running configuration: %s", exc)
                return
            if new.ntp.listen != config.ntp.listen or new.ntp.workers != config.ntp.workers:
                log.warning("ntp.listen and ntp.workers changes need a restart when workers > 1")
            for pid in self.children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGHUP)
            log.info("configuration reloaded from %s", new.source)

        stopping = self._signals(loop, on_hup)
        metrics = None
        if metrics_sock is not None:
            metrics = MetricsServer(lambda: _merge(shared.total(), self._uptime()), shared.reports)
            await metrics.start_on(metrics_sock)
        log.info("ready with %d workers", len(self.children))
        code = 0
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), 1.0)
            for pid in list(self.children):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    log.error("worker %d exited unexpectedly (status %d); shutting down", pid, status)
                    self.children.remove(pid)
                    stopping.set()
                    code = 1
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in self.children:
            os.waitpid(pid, 0)
        if metrics is not None:
            await metrics.stop()
        log.info("stopped")
        return code

    def _uptime(self) -> dict[str, float]:
        return {"uptime_seconds": round(time.time() - self.started, 3)}

    @staticmethod
    async def _tick_until(stopping: asyncio.Event, tick: Any) -> None:
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), STATE_INTERVAL)
            if not stopping.is_set():
                tick()


def _merge(
    totals: tuple[dict[tuple[str, ...], int], dict[str, float]], extra: dict[str, float]
) -> tuple[dict[tuple[str, ...], int], dict[str, float]]:
    counts, gauges = totals
    return counts, {**gauges, **extra}


def _bind_tcp(addr: tuple[str, int]) -> socket.socket:
    try:
        return open_tcp_listener(*addr, backlog=64)
    except OSError as exc:
        raise StartupError(f"cannot listen for metrics on {format_addr(addr)}: {exc.strerror}") from None
